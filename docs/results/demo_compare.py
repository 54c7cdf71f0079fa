"""Per-run table of a `compare --config configs/demo.yaml` study from its run directories (docs/results.md).

Reads each ``<out>/main/<algo>_seed<seed>/``: the demo's own held-out evaluation after training
(``eval/after.json``: 24 greedy sessions, the same for every run, before = ``eval/before.json``) and the
training curve (``metrics.jsonl``: conversion in the first and last third of the steps, training time).

python docs/results/demo_compare.py /path/to/compare-out
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from duca_fast.train import stats

ROWS = (
    ("conversion_rate", "held-out conversion"),
    ("mean_session_reward", "held-out mean session reward"),
    ("mean_turn_reward", "held-out mean turn reward"),
    ("repetition_rate", "held-out repetition"),
    ("identity_detection_rate", "held-out identity detection"),
    ("compliance_violation_rate", "held-out compliance violations"),
)


def run_summary(run_dir: Path) -> dict[str, float]:
    after = json.loads((run_dir / "eval" / "after.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    third = max(1, len(rows) // 3)
    conversion = [row["task/conversion_rate"] for row in rows]
    return {
        **{key: float(after[key]) for key, _ in ROWS},
        "train_conversion_first": float(np.mean(conversion[:third])),
        "train_conversion_last": float(np.mean(conversion[-third:])),
        "train_s": float(sum(row.get("time/step", 0.0) for row in rows)),
    }


def main(out: Path) -> None:
    runs: dict[str, dict[int, dict[str, float]]] = {}
    before = None
    for run_dir in sorted((out / "main").iterdir()):
        if not (run_dir / "eval" / "after.json").exists():
            print(f"{run_dir.name}: not finished (no eval/after.json), left out", file=sys.stderr)
            continue
        algo, _, seed = run_dir.name.rpartition("_seed")
        runs.setdefault(algo, {})[int(seed)] = run_summary(run_dir)
        before = before or json.loads((run_dir / "eval" / "before.json").read_text())
    algos = list(runs)
    seeds = sorted({seed for per_seed in runs.values() for seed in per_seed})
    header = ["", "before"] + [f"{algo} s{seed}" for algo in algos for seed in seeds]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key, title in ROWS:
        cells = [title, f"{before[key]:.3f}"]
        cells += [f"{runs[a][s][key]:.3f}" if s in runs[a] else "-" for a in algos for s in seeds]
        print("| " + " | ".join(cells) + " |")
    cells = ["training conversion, first / last third", ""]
    cells += [
        f"{runs[a][s]['train_conversion_first']:.3f} / {runs[a][s]['train_conversion_last']:.3f}"
        if s in runs[a]
        else "-"
        for a in algos
        for s in seeds
    ]
    print("| " + " | ".join(cells) + " |")
    cells = ["training time (steps only)", ""] + [
        f"{runs[a][s]['train_s']:.0f} s" if s in runs[a] else "-" for a in algos for s in seeds
    ]
    print("| " + " | ".join(cells) + " |")
    print()
    print(
        "| algorithm | held-out conversion: mean [95% CI] (per seed) | Δ vs grpo [CI], p "
        "| mean turn reward [CI] | seeds above before |"
    )
    print("|---|---|---|---|---|")
    baseline = "grpo"
    for algo in algos:
        done = [s for s in seeds if s in runs[algo]]
        conversion = [runs[algo][s]["conversion_rate"] for s in done]
        turn = [runs[algo][s]["mean_turn_reward"] for s in done]
        versus = "-"
        if algo != baseline and baseline in runs:
            paired = [s for s in done if s in runs[baseline]]
            mine = [runs[algo][s]["conversion_rate"] for s in paired]
            theirs = [runs[baseline][s]["conversion_rate"] for s in paired]
            gap = stats.paired_difference_ci(mine, theirs)
            test = stats.paired_permutation_test(mine, theirs)
            versus = f"{gap.mean:+.3f} [{gap.low:+.3f}, {gap.high:+.3f}], p={test.p_value:.2f}"
        above = sum(c > before["conversion_rate"] for c in conversion)
        per_seed = ", ".join(f"{c:.3f}" for c in conversion)
        print(
            f"| {algo} | {stats.mean_ci(conversion).format()} ({per_seed}) | {versus} | "
            f"{stats.mean_ci(turn).format()} | {above}/{len(done)} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
