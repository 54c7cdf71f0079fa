"""Same budget, several algorithms and seeds: train each, evaluate its final checkpoint, tabulate.

Generic over the task: ``train_fn(config) -> run_dir`` and ``eval_fn(config, checkpoint, num_sessions,
seed) -> metrics`` (``train`` and ``evaluate`` of ``train/loop.py``). Writes ``compare.md`` (a table
like the DuCA paper's: mean ± std over seeds, relative change vs GRPO), ``compare.csv`` (one row per run)
and ``compare.json`` (runs and summary).
"""

from __future__ import annotations

import copy
import csv
import json
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path

from duca_fast.train.checkpoint import latest_checkpoint
from duca_fast.train.config import ALGORITHMS, TrainConfig, validate

TrainFn = Callable[[TrainConfig], Path]
EvalFn = Callable[[TrainConfig, Path, int, int], Mapping[str, float]]

TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("conversion_rate", "Conversion rate ↑"),
    ("repetition_rate", "Inter-sentence repetition rate ↓"),
    ("identity_detection_rate", "Identity detection rate ↓"),
    ("compliance_violation_rate", "Compliance violation rate ↓"),
    ("mean_turn_reward", "Mean turn reward ↑"),
)
"""(eval metric key, column title) of the Markdown table, in order; every eval_fn must return these keys."""
BASELINE = "grpo"
"""The algorithm relative changes are measured against, when it is compared."""
EVAL_SEED = 0
"""Every run is evaluated on the same sessions, so differences come from training alone."""


def _run_config(config: TrainConfig, algo: str, seed: int, out_dir: Path) -> TrainConfig:
    run_config = copy.deepcopy(config)
    run_config.algo.name = algo
    run_config.seed = seed
    run_config.run_dir = str(out_dir / f"{algo}_seed{seed}")
    validate(run_config)
    return run_config


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and unbiased std over seeds (std 0 for a single seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _relative_change(value: float, baseline: float) -> float | None:
    """(value - baseline) / |baseline|; None when the baseline is 0 (no meaningful ratio)."""
    return (value - baseline) / abs(baseline) if baseline != 0 else None


def _markdown(summary: dict[str, dict[str, dict[str, float | None]]], num_seeds: int) -> str:
    header = ["Algorithm", *(title for _, title in TABLE_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for algo, columns in summary.items():
        cells = [algo]
        for key, _ in TABLE_COLUMNS:
            column = columns[key]
            cell = f"{column['mean']:.3f} ± {column['std']:.3f}"
            if "vs_grpo" in column:
                change = column["vs_grpo"]
                cell += f" ({change:+.1%})" if change is not None else " (n/a)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Mean ± std over {num_seeds} seed(s); each run evaluated on the same held-out sessions.",
    ]
    if any("vs_grpo" in column for columns in summary.values() for column in columns.values()):
        notes.append(
            "In parentheses: relative change of the mean vs grpo, (algo - grpo) / |grpo|; "
            "↑ higher is better, ↓ lower is better; n/a where grpo's mean is 0."
        )
    return "\n".join(lines + notes) + "\n"


def compare(
    config: TrainConfig,
    algos: list[str],
    seeds: list[int],
    out_dir: Path,
    train_fn: TrainFn,
    eval_fn: EvalFn,
    eval_sessions: int,
) -> str:
    """Train every algorithm with every seed under ``config``'s budget, evaluate, write and return the table.

    Run ``algo x seed`` lives in ``out_dir/{algo}_seed{seed}``; its final checkpoint (the latest one in
    its run directory) is evaluated with ``eval_sessions`` sessions and the shared ``EVAL_SEED``.
    """
    unknown = [algo for algo in algos if algo not in ALGORITHMS]
    if unknown or not algos:
        raise ValueError(f"algos must be a non-empty list drawn from {ALGORITHMS}, got {algos}")
    if len(set(algos)) != len(algos) or len(set(seeds)) != len(seeds):
        raise ValueError(f"algos and seeds must not repeat, got {algos} and {seeds}")
    if not seeds:
        raise ValueError("seeds must not be empty")
    if eval_sessions < 1:
        raise ValueError(f"eval_sessions must be >= 1, got {eval_sessions}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for algo in algos:
        for seed in seeds:
            run_config = _run_config(config, algo, seed, out_dir)
            run_dir = train_fn(run_config)
            checkpoint = latest_checkpoint(run_dir)
            if checkpoint is None:
                raise RuntimeError(f"training {algo} seed {seed} left no checkpoint in {run_dir}")
            metrics = dict(eval_fn(run_config, checkpoint, eval_sessions, EVAL_SEED))
            missing = [key for key, _ in TABLE_COLUMNS if key not in metrics]
            if missing:
                raise KeyError(f"eval_fn returned no {missing} for {algo} seed {seed}; got {sorted(metrics)}")
            runs.append({"algo": algo, "seed": seed, "run_dir": str(run_dir), **metrics})

    summary: dict[str, dict[str, dict[str, float | None]]] = {}
    for algo in algos:
        summary[algo] = {}
        for key, _ in TABLE_COLUMNS:
            mean, std = _mean_std([float(run[key]) for run in runs if run["algo"] == algo])
            summary[algo][key] = {"mean": mean, "std": std}
    if BASELINE in algos:
        for algo in algos:
            if algo == BASELINE:
                continue
            for key, _ in TABLE_COLUMNS:
                column = summary[algo][key]
                column["vs_grpo"] = _relative_change(column["mean"], summary[BASELINE][key]["mean"])

    markdown = _markdown(summary, len(seeds))
    (out_dir / "compare.md").write_text(markdown)
    fieldnames = list(dict.fromkeys(key for run in runs for key in run))
    with (out_dir / "compare.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(runs)
    report = {"algos": algos, "seeds": seeds, "eval_sessions": eval_sessions, "runs": runs}
    (out_dir / "compare.json").write_text(json.dumps({**report, "summary": summary}, indent=2) + "\n")
    return markdown
