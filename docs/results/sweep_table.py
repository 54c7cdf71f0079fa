"""The session-scale sweep table of docs/results.md from the compare.json files of the study.

    python docs/results/sweep_table.py runs/study > docs/results/session_scale.md

Scale 10 is the ``paper`` regime itself (its study, restricted to the sweep's seeds).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from duca_fast.train import stats

METRICS = (("conversion_rate", "conversion"), ("compliance_violation_rate", "compliance violations"))


def main(root: Path) -> str:
    studies = {float(p.name.removeprefix("paper_scale")): p for p in root.glob("paper_scale*") if p.is_dir()}
    studies[10.0] = root / "paper"
    lines = [
        "| session scale | mode | metric | duca [95% CI] | grpo [95% CI] | duca − grpo [95% CI] | p |",
        "|---|---|---|---|---|---|---|",
    ]
    sweep_seeds = None
    for scale in sorted(studies):
        path = studies[scale] / "compare.json"
        if not path.exists():
            lines.append(f"| {scale:g} | not run | | | | | |")
            continue
        report = json.loads(path.read_text())
        runs = [r for r in report["runs"] if r["phase"] == "main"]
        if scale != 10.0:
            sweep_seeds = sorted({r["seed"] for r in runs})
        for mode in report["modes"]:
            for key, title in METRICS:
                per = {
                    a: {r["seed"]: float(r[f"{mode}/{key}"]) for r in runs if r["algo"] == a}
                    for a in ("duca", "grpo")
                }
                seeds = sorted(set(per["duca"]) & set(per["grpo"]))
                if scale == 10.0 and sweep_seeds:
                    seeds = [s for s in seeds if s in sweep_seeds]
                duca, grpo = [per["duca"][s] for s in seeds], [per["grpo"][s] for s in seeds]
                diff = stats.paired_difference_ci(duca, grpo)
                test = stats.paired_permutation_test(duca, grpo)
                lines.append(
                    f"| {scale:g} | {mode} | {title} | {stats.mean_ci(duca).format()} | "
                    f"{stats.mean_ci(grpo).format()} | {diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] "
                    f"| {test.p_value:.3f} |"
                )
    lines.append("")
    lines.append(f"Seeds {sweep_seeds} per cell (paired by seed).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/study")), end="")
