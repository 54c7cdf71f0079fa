"""A comparison study: several algorithms x seeds on one budget, evaluated, with statistics and plots.

Every run ``label x seed`` trains under the shared config (``train_fn(config) -> run_dir``), then its
final checkpoint is evaluated on ``eval_sessions`` held-out sessions for each of ``eval_seeds`` (different
customers), greedy and sampled at the rollout temperature (both tasks). Per run and mode the metrics
are averaged over the eval seeds; over seeds the study reports the mean with a 95% percentile bootstrap
CI and, against ``baseline``, the paired mean difference with its CI and a paired permutation test
(``train/stats.py``). Optional phases: ``tune`` (the same learning-rate x entropy-coefficient grid for
every algorithm on separate tuning seeds; each algorithm then runs at its best greedy conversion) and
``tradeoff`` (every algorithm at several ``turn_weight:session_weight`` pairs). A run directory that
already holds its final checkpoint is evaluated without retraining, so a cut study can be rerun.

Outputs in ``out_dir``: ``compare.md`` (tables), ``compare.csv`` (one row per run), ``compare.json``
(runs, summary, tests, tuning choice), ``curves.png`` (learning curves with seed bands) and, with
``tradeoff``, ``tradeoff.png``.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from duca_fast.train import stats
from duca_fast.train.checkpoint import latest_checkpoint
from duca_fast.train.config import ALGORITHMS, ConfigError, TrainConfig, validate
from duca_fast.train.records import strict_json

TrainFn = Callable[[TrainConfig], Path]
EvalFn = Callable[..., Mapping[str, float]]
"""``eval_fn(config, checkpoint, num_sessions, seed, *, sampled) -> metrics``."""

TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("conversion_rate", "Conversion rate ↑"),
    ("repetition_rate", "Inter-sentence repetition rate ↓"),
    ("identity_detection_rate", "Identity detection rate ↓"),
    ("compliance_violation_rate", "Compliance violation rate ↓"),
    ("mean_turn_reward", "Mean turn reward ↑"),
    ("mean_turns", "Mean turns"),
)
"""(eval metric key, title) of the tables, in order; every eval_fn must return these keys."""
CURVES: tuple[tuple[str, str], ...] = (
    ("task/conversion_rate", "conversion (training batch)"),
    ("task/mean_turns", "mean turns"),
    ("reward/turn_total/mean", "turn reward (mean per turn)"),
)
"""(training metric, title) of the learning-curve panels."""
BASELINE = "grpo"
EVAL_SEEDS: tuple[int, ...] = (0, 1, 2)
"""Held-out customer seeds every run is evaluated on (the same for every run: a paired design)."""
TUNE_SEED_OFFSET = 10_000
"""Tuning runs use seeds ``TUNE_SEED_OFFSET + i``: never the seeds the study reports."""
TUNE_LRS: tuple[float, ...] = (2.5e-3, 5e-3, 1e-2)
TUNE_ENTROPY: tuple[float, ...] = (0.0, 0.01)
TRADEOFF_WEIGHTS: tuple[tuple[float, float], ...] = ((1.0, 0.25), (1.0, 1.0), (0.25, 1.0))
"""(turn_weight, session_weight) pairs of the trade-off phase."""


def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """``"10"`` or ``10`` -> seeds 0..9; ``"21,22,23"`` -> that list. Raises ValueError naming ``seeds``."""
    if isinstance(spec, int):
        spec = str(spec)
    if not isinstance(spec, str):
        seeds = [int(s) for s in spec]
    else:
        text = spec.strip()
        try:
            seeds = (
                list(range(int(text))) if "," not in text else [int(s) for s in text.split(",") if s.strip()]
            )
        except ValueError:
            raise ValueError(
                f"seeds must be a count or a comma-separated list of ints, got {spec!r}"
            ) from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be >= 1 distinct non-negative ints (or a count >= 1), got {spec!r}")
    return seeds


def parse_weights(spec: str) -> list[tuple[float, float]]:
    """``"1:0.25,1:1"`` -> [(1, 0.25), (1, 1)] (turn_weight:session_weight pairs)."""
    try:
        pairs = [tuple(float(x) for x in item.split(":")) for item in spec.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"tradeoff weights must look like 1:0.25,1:1, got {spec!r}") from None
    if not pairs or any(len(p) != 2 or min(p) < 0 for p in pairs):
        raise ValueError(f"tradeoff weights must be non-negative turn:session pairs, got {spec!r}")
    return pairs  # type: ignore[return-value]


@dataclass
class Run:
    """One training run of the study and what it produced."""

    phase: str
    """"tune", "main" or "tradeoff"."""
    label: str
    """Row name in the tables (the algorithm, or algorithm@setting)."""
    algo: str
    seed: int
    overrides: dict[str, Any]
    """Dotted config keys set for this run (on top of the shared config)."""
    run_dir: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)
    wall_s: float = 0.0


def _set(config: TrainConfig, key: str, value: Any) -> None:
    *path, last = key.split(".")
    node = config
    for part in path:
        node = getattr(node, part)
    if hasattr(node, last):
        setattr(node, last, value)
    else:  # frozen option dataclasses (algo.advantage, algo.loss)
        raise ConfigError(f"unknown config key {key!r}")


def _run_config(config: TrainConfig, run: Run, out_dir: Path) -> TrainConfig:
    import dataclasses

    run_config = copy.deepcopy(config)
    run_config.algo.name = run.algo
    run_config.seed = run.seed
    run_config.progress = False
    for key, value in run.overrides.items():
        head, _, last = key.rpartition(".")
        if head in ("algo.advantage", "algo.loss"):
            options = getattr(run_config.algo, head.split(".")[1])
            setattr(run_config.algo, head.split(".")[1], dataclasses.replace(options, **{last: value}))
        else:
            _set(run_config, key, value)
    run_config.run_dir = str(out_dir / run.phase / f"{run.label}_seed{run.seed}")
    validate(run_config)
    return run_config


def evaluate_policy(
    config: TrainConfig, checkpoint: Path, num_sessions: int, seed: int, *, sampled: bool
) -> dict[str, float]:
    """Held-out sessions of a checkpoint's policy, greedy or sampled (``loop.evaluate``)."""
    from duca_fast.train.loop import evaluate

    return evaluate(config, checkpoint, num_sessions, seed, sampled=sampled)


def _read_curves(run_dir: Path) -> dict[str, list[float]]:
    path = run_dir / "metrics.jsonl"
    rows = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )
    by_step = {int(row["step"]): row for row in rows if "step" in row}
    return {key: [float(by_step[s].get(key, float("nan"))) for s in sorted(by_step)] for key, _ in CURVES}


def _finished(run_config: TrainConfig) -> Path | None:
    checkpoint = latest_checkpoint(run_config.run_dir)
    return checkpoint if checkpoint is not None and checkpoint.name == f"step_{run_config.steps}" else None


def _execute(
    run: Run,
    run_config: TrainConfig,
    train_fn: TrainFn,
    eval_fn: EvalFn,
    eval_sessions: int,
    eval_seeds: Sequence[int],
    modes: Sequence[str],
) -> Run:
    """Train (unless already finished), evaluate in every mode and eval seed, read the curves."""
    if os.environ.get("DUCA_COMPARE_WORKER"):
        import torch

        torch.set_num_threads(1)
    started = time.perf_counter()
    checkpoint = _finished(run_config)
    if checkpoint is None:
        run_dir = train_fn(run_config)
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise RuntimeError(f"training {run.label} seed {run.seed} left no checkpoint in {run_dir}")
    run.run_dir = run_config.run_dir
    for mode in modes:
        per_seed = [
            dict(eval_fn(run_config, checkpoint, eval_sessions, s, sampled=mode == "sampled"))
            for s in eval_seeds
        ]
        for metrics in per_seed:
            missing = [key for key, _ in TABLE_COLUMNS if key not in metrics]
            # The rates are over finished sessions: none finished (all failed) leaves them undefined.
            if missing and metrics.get("failed_sessions", 0) < metrics.get("num_sessions", 1):
                raise KeyError(f"eval_fn returned no {missing} for {run.label} seed {run.seed}")
            metrics.update({key: float("nan") for key in missing})
        for key in per_seed[0]:
            values = [m[key] for m in per_seed if np.isfinite(m[key])]
            run.metrics[f"{mode}/{key}"] = float(np.mean(values)) if values else float("nan")
    run.curves = _read_curves(Path(run_config.run_dir))
    run.wall_s = time.perf_counter() - started
    return run


def _worker_init() -> None:
    os.environ["DUCA_COMPARE_WORKER"] = "1"


def _execute_all(
    runs: list[Run], config: TrainConfig, out_dir: Path, args: tuple, workers: int, progress: bool, what: str
) -> list[Run]:
    from tqdm.auto import tqdm

    configs = [_run_config(config, run, out_dir) for run in runs]
    bar = tqdm(total=len(runs), desc=f"compare {what}", unit="run", disable=not progress, dynamic_ncols=True)
    done: list[Run] = []
    # The LLM task's runs each get a fresh process: the memory of a run's engines and models is not all
    # given back in-process (one process held 24 GiB after 8 demo runs and was killed for memory).
    fresh = config.env.name == "sales"
    try:
        if workers <= 1 and not fresh:
            for run, run_config in zip(runs, configs):
                done.append(_execute(run, run_config, *args))
                bar.update()
        else:
            context = get_context("spawn")
            with ProcessPoolExecutor(
                max(workers, 1),
                mp_context=context,
                initializer=_worker_init if workers > 1 else None,
                max_tasks_per_child=1 if fresh else None,
            ) as pool:
                futures = [pool.submit(_execute, run, c, *args) for run, c in zip(runs, configs)]
                for future in futures:
                    done.append(future.result())
                    bar.update()
    finally:
        bar.close()
    return done


def _summary(
    runs: list[Run], labels: list[str], modes: Sequence[str], baseline: str | None
) -> dict[str, Any]:
    """Per mode, metric and label: mean with CI; against the baseline: paired difference CI and p."""
    summary: dict[str, Any] = {}
    for mode in modes:
        for key, _ in TABLE_COLUMNS:
            name = f"{mode}/{key}"
            values = {label: {r.seed: r.metrics[name] for r in runs if r.label == label} for label in labels}
            entry: dict[str, Any] = {}
            for label in labels:
                # Seeds whose evaluation finished no session have no rate: left out, n says how many.
                seeds = sorted(s for s, v in values[label].items() if np.isfinite(v))
                column = [values[label][s] for s in seeds]
                if not column:
                    entry[label] = {"mean": None, "ci": [None, None], "std": None, "n": 0}
                    continue
                ci = stats.mean_ci(column)
                entry[label] = {
                    "mean": ci.mean,
                    "ci": [ci.low, ci.high],
                    "std": float(np.std(column, ddof=1)) if len(column) > 1 else 0.0,
                    "n": ci.n,
                }
                paired = [s for s in seeds if np.isfinite(values.get(baseline, {}).get(s, float("nan")))]
                if baseline is not None and label != baseline and paired:
                    column = [values[label][s] for s in paired]
                    base = [values[baseline][s] for s in paired]
                    diff = stats.paired_difference_ci(column, base)
                    test = stats.paired_permutation_test(column, base)
                    entry[label]["vs_baseline"] = {
                        "difference": diff.mean,
                        "ci": [diff.low, diff.high],
                        "p_value": test.p_value,
                        "exact": test.exact,
                        "n": len(paired),
                    }
            summary[name] = entry
    return summary


def _table(
    summary: dict[str, Any], labels: list[str], mode: str, baseline: str | None, seeds: list[int]
) -> str:
    header = ["Algorithm", *(title for _, title in TABLE_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        cells = [label]
        for key, _ in TABLE_COLUMNS:
            entry = summary[f"{mode}/{key}"][label]
            if entry["mean"] is None:
                cells.append("n/a (no finished session)")
                continue
            cell = f"{entry['mean']:.3f} [{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}]"
            if entry["n"] < len(seeds):
                cell += f" (n={entry['n']})"
            if "vs_baseline" in entry:
                versus = entry["vs_baseline"]
                cell += f"<br>Δ {versus['difference']:+.3f} [{versus['ci'][0]:+.3f}, {versus['ci'][1]:+.3f}]"
                cell += f" p={versus['p_value']:.3f}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot_curves(runs: list[Run], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
    for axis, (key, title) in zip(axes, CURVES):
        for label in labels:
            curves = [r.curves.get(key, []) for r in runs if r.label == label]
            length = min((len(c) for c in curves), default=0)
            if length == 0:
                continue
            data = np.array([c[:length] for c in curves], dtype=np.float64)
            steps = np.arange(1, length + 1)
            mean = np.nanmean(data, axis=0)
            low, high = np.nanpercentile(data, 25, axis=0), np.nanpercentile(data, 75, axis=0)
            (line,) = axis.plot(steps, mean, label=label, linewidth=1.4)
            axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    figure.suptitle("mean over seeds; band: 25-75th percentile over seeds", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_tradeoff(runs: list[Run], algos: list[str], mode: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4.2))
    for algo in algos:
        mine = [r for r in runs if r.algo == algo]
        settings = sorted(
            {
                (r.overrides["algo.advantage.turn_weight"], r.overrides["algo.advantage.session_weight"])
                for r in mine
            }
        )
        xs, ys = [], []
        for turn_weight, session_weight in settings:
            chosen = [
                r
                for r in mine
                if (r.overrides["algo.advantage.turn_weight"], r.overrides["algo.advantage.session_weight"])
                == (turn_weight, session_weight)
            ]
            xs.append(float(np.mean([r.metrics[f"{mode}/compliance_violation_rate"] for r in chosen])))
            ys.append(float(np.mean([r.metrics[f"{mode}/conversion_rate"] for r in chosen])))
        (line,) = axis.plot(xs, ys, marker="o", label=algo)
        for x, y, (turn_weight, session_weight) in zip(xs, ys, settings):
            axis.annotate(f"{turn_weight:g}:{session_weight:g}", (x, y), fontsize=6, color=line.get_color())
    axis.set_xlabel(f"compliance violation rate ({mode}) ↓")
    axis.set_ylabel(f"conversion rate ({mode}) ↑")
    axis.set_title("trade-off over turn_weight:session_weight (mean over seeds)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def compare(
    config: TrainConfig,
    algos: list[str],
    seeds: list[int],
    out_dir: Path,
    train_fn: TrainFn,
    eval_fn: EvalFn = evaluate_policy,
    eval_sessions: int = 100,
    *,
    eval_seeds: Sequence[int] = EVAL_SEEDS,
    baseline: str | None = BASELINE,
    tune: bool = False,
    tune_lrs: Sequence[float] = TUNE_LRS,
    tune_entropy: Sequence[float] = TUNE_ENTROPY,
    tune_seeds: int = 2,
    tradeoff: Sequence[tuple[float, float]] | None = None,
    workers: int = 1,
    progress: bool = True,
    command: str = "",
) -> str:
    """Run the study and write its outputs to ``out_dir``; returns the Markdown report."""
    unknown = [algo for algo in algos if algo not in ALGORITHMS]
    if unknown or not algos:
        raise ValueError(f"algos must be a non-empty list drawn from {ALGORITHMS}, got {algos}")
    if len(set(algos)) != len(algos):
        raise ValueError(f"algos must not repeat, got {algos}")
    seeds = parse_seeds(seeds)
    if eval_sessions < 1:
        raise ValueError(f"eval_sessions must be >= 1, got {eval_sessions}")
    if not eval_seeds:
        raise ValueError("eval_seeds must not be empty")
    if baseline is not None and baseline not in algos:
        baseline = None
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if tune and (not tune_lrs or not tune_entropy or tune_seeds < 1):
        raise ValueError("tune needs at least one lr, one entropy coefficient and tune_seeds >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modes = ("greedy", "sampled")
    args = (train_fn, eval_fn, eval_sessions, list(eval_seeds), modes)
    started = time.perf_counter()

    best: dict[str, dict[str, Any]] = {algo: {} for algo in algos}
    tune_runs: list[Run] = []
    if tune:
        grid = [{"optim.lr": lr, "algo.loss.entropy_coef": ent} for lr in tune_lrs for ent in tune_entropy]
        tune_runs = [
            Run(
                "tune",
                f"{algo}@lr{s['optim.lr']:g}_ent{s['algo.loss.entropy_coef']:g}",
                algo,
                TUNE_SEED_OFFSET + i,
                s,
            )
            for algo in algos
            for s in grid
            for i in range(tune_seeds)
        ]
        tune_runs = _execute_all(tune_runs, config, out_dir, args, workers, progress, "tune")
        for algo in algos:
            scores = {}
            for setting in grid:
                chosen = [r for r in tune_runs if r.algo == algo and r.overrides == setting]
                scores[json.dumps(setting)] = float(
                    np.mean([r.metrics["greedy/conversion_rate"] for r in chosen])
                )
            best[algo] = json.loads(max(scores, key=scores.get))

    main_runs = [Run("main", algo, algo, seed, dict(best[algo])) for algo in algos for seed in seeds]
    main_runs = _execute_all(main_runs, config, out_dir, args, workers, progress, "runs")
    trade_runs: list[Run] = []
    if tradeoff:
        trade_runs = [
            Run(
                "tradeoff",
                f"{algo}@tw{tw:g}_sw{sw:g}",
                algo,
                seed,
                {**best[algo], "algo.advantage.turn_weight": tw, "algo.advantage.session_weight": sw},
            )
            for algo in algos
            for tw, sw in tradeoff
            for seed in seeds
        ]
        trade_runs = _execute_all(trade_runs, config, out_dir, args, workers, progress, "tradeoff")
    wall = time.perf_counter() - started

    summary = _summary(main_runs, algos, modes, baseline)
    _plot_curves(main_runs, algos, out_dir / "curves.png")
    if tradeoff:
        _plot_tradeoff(trade_runs, algos, "greedy", out_dir / "tradeoff.png")

    regime = config.env.regime if config.env.name == "sales-acts" else "-"
    knobs = json.dumps(config.env.regime_knobs) if config.env.name == "sales-acts" else "-"
    lines = [
        f"# Comparison: {', '.join(algos)}",
        "",
        f"env {config.env.name}, regime {regime} {knobs}, {config.steps} steps of "
        f"{config.rollout.groups_per_step} x {config.rollout.group_size} sessions, seeds {seeds}; "
        f"evaluation: {eval_sessions} held-out sessions x eval seeds {list(eval_seeds)}, "
        f"modes {list(modes)}. "
        f"Wall time {wall:.0f} s.",
        "",
        "Cells: mean over seeds [95% percentile bootstrap CI]"
        + (
            f"; Δ: paired mean difference vs {baseline} [95% CI], p: paired permutation test."
            if baseline
            else "."
        ),
        "",
    ]
    if command:
        lines[2:2] = [f"Command: `{command}`", ""]
    if tune:
        lines += ["## Tuning (greedy conversion, mean over tuning seeds)", ""]
        lines += [f"- {algo}: best {best[algo]}" for algo in algos]
        lines.append("")
    for mode in modes:
        lines += [f"## {mode.capitalize()} evaluation", "", _table(summary, algos, mode, baseline, seeds)]
        values = {
            a: {r.seed: r.metrics[f"{mode}/conversion_rate"] for r in main_runs if r.algo == a} for a in algos
        }
        if all(np.isfinite(v) for per in values.values() for v in per.values()):
            lines += [
                f"Per-seed {mode} conversion rate:",
                "",
                stats.per_seed_table(values, baseline=baseline),
            ]
        else:
            lines += [
                f"Per-seed {mode} conversion rates: in compare.csv (some runs finished no session).",
                "",
            ]
    lines += ["![learning curves](curves.png)", ""]
    if tradeoff:
        lines += ["![trade-off](tradeoff.png)", ""]
    markdown = "\n".join(lines)
    (out_dir / "compare.md").write_text(markdown)

    every = tune_runs + main_runs + trade_runs
    rows = [
        {
            "phase": r.phase,
            "label": r.label,
            "algo": r.algo,
            "seed": r.seed,
            "wall_s": round(r.wall_s, 2),
            "overrides": json.dumps(r.overrides),
            "run_dir": r.run_dir,
            **r.metrics,
        }
        for r in every
    ]
    fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    with (out_dir / "compare.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    report = {
        "algos": algos,
        "seeds": seeds,
        "baseline": baseline,
        "eval_sessions": eval_sessions,
        "eval_seeds": list(eval_seeds),
        "modes": list(modes),
        "best": best,
        "wall_s": wall,
        "command": command,
        "runs": rows,
        "summary": summary,
    }
    (out_dir / "compare.json").write_text(strict_json(report))
    return markdown
