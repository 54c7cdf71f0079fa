"""The untrained policy under the study's evaluation, for scale: each seed's initial weights, evaluated
like the study's runs (configs/study.yaml, 50 held-out sessions x eval seeds 0 and 1, greedy and sampled).

    python docs/results/untrained.py > docs/results/untrained.md
"""

from __future__ import annotations

import numpy as np

from duca_fast.train import stats
from duca_fast.train.config import load_config
from duca_fast.train.distributed import DistContext
from duca_fast.train.loop import build_task, held_out_sessions, seed_everything
from duca_fast.train.task import evaluation_metrics

KEYS = ("conversion_rate", "compliance_violation_rate", "identity_detection_rate", "mean_turns")


def main() -> str:
    lines = ["| regime | mode | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 2) + "|"]
    for regime in ("classic", "paper"):
        for mode in ("greedy", "sampled"):
            per_seed = {key: [] for key in KEYS}
            for seed in range(10):
                config = load_config("configs/study.yaml", [f"env.regime={regime}", f"seed={seed}"])
                seed_everything(config.seed)
                task = build_task(config, DistContext())
                runs = []
                for eval_seed in (0, 1):
                    scenarios, customers = held_out_sessions(config, 50, eval_seed)
                    kwargs = {"sample_seed": eval_seed} if mode == "sampled" else {}
                    runs.append(evaluation_metrics(task.evaluate(scenarios, customers, **kwargs), 50))
                for key in KEYS:
                    per_seed[key].append(float(np.mean([r[key] for r in runs])))
            cells = [stats.mean_ci(per_seed[key]).format() for key in KEYS]
            lines.append(f"| {regime} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nMean over seeds 0-9 of the initial policy [95% bootstrap CI].\n"


if __name__ == "__main__":
    print(main(), end="")
