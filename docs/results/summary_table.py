"""Compact tables of docs/results.md from a study's compare.json (the full tables are in its compare.md).

python docs/results/summary_table.py docs/results/classic/compare.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from duca_fast.train import stats

COLUMNS = (
    ("greedy/conversion_rate", "conversion (greedy)"),
    ("sampled/conversion_rate", "conversion (sampled)"),
    ("greedy/compliance_violation_rate", "compliance violations (greedy)"),
    ("greedy/identity_detection_rate", "identity detection (greedy)"),
    ("greedy/mean_turns", "turns (greedy)"),
)


def cell(entry: dict) -> str:
    if entry["mean"] is None:
        return "n/a"
    text = f"{entry['mean']:.3f} [{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}]"
    versus = entry.get("vs_baseline")
    if versus:
        text += f"<br>Δ {versus['difference']:+.3f}, p={versus['p_value']:.3f}"
    return text


def paired(report: dict, first: str, second: str) -> str:
    runs = [r for r in report["runs"] if r["phase"] == "main"]
    cells = []
    for key, _ in COLUMNS:
        # Undefined rates are null (newer compare.json) or NaN (older ones).
        a = {r["seed"]: float("nan" if r[key] is None else r[key]) for r in runs if r["algo"] == first}
        b = {r["seed"]: float("nan" if r[key] is None else r[key]) for r in runs if r["algo"] == second}
        seeds = [s for s in sorted(a) if s in b and np.isfinite(a[s]) and np.isfinite(b[s])]
        diff = stats.paired_difference_ci([a[s] for s in seeds], [b[s] for s in seeds])
        test = stats.paired_permutation_test([a[s] for s in seeds], [b[s] for s in seeds])
        cells.append(f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}], p={test.p_value:.3f}")
    return f"| {first} − {second} | " + " | ".join(cells) + " |"


def main(path: Path, pairs: list[str]) -> str:
    report = json.loads(path.read_text())
    summary = report["summary"]
    lines = [
        "| algorithm | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for algo in report["algos"]:
        lines.append(f"| {algo} | " + " | ".join(cell(summary[key][algo]) for key, _ in COLUMNS) + " |")
    lines += [paired(report, *pair.split(":")) for pair in pairs]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(main(Path(sys.argv[1]), sys.argv[2:]), end="")
