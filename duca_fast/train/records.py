"""What a run leaves behind: metrics.jsonl, TensorBoard events, transcripts and plots."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Figures: (file, title, [metric key prefix or exact key]); every matching metric gets its own panel.
PLOTS = [
    (
        "rewards_per_horizon.png",
        "Rewards per horizon",
        ["reward/turn/", "reward/session/", "reward/turn_total/mean", "reward/session_total/mean"],
    ),
    (
        "advantages.png",
        "Advantage spread per horizon (std)",
        ["advantage/turn_horizon/std", "advantage/session_horizon/std", "advantage/fused/std"],
    ),
    ("task_metrics.png", "Task metrics (rates in [0, 1])", ["task/"]),
    ("loss.png", "Loss and diagnostics", ["loss/", "grad_norm", "sync/logprob_gap"]),
    (
        "rollout.png",
        "Rollout: engine and customers",
        [
            "rollout/wall_s",
            "rollout/generate_s",
            "rollout/customer_wait_s",
            "rollout/engine_idle_share",
            "rollout/sessions_in_flight",
            "rollout/prefix_cache_hit_rate",
            "rollout/generated_tokens_per_s",
            "rollout/preemptions",
        ],
    ),
]
RATE_SUFFIX = ("_rate", "_share")
"""Metrics whose name ends so are shares: their panels get a fixed [0, 1] axis."""
TIME_KEYS = ("time/rollout", "time/advantage", "time/train", "time/sync")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def strict_json(value: Any, indent: int | None = 2) -> str:
    """JSON that every parser reads: an undefined statistic (NaN, inf) is written as null."""
    return json.dumps(_finite_or_none(value), indent=indent, allow_nan=False) + "\n"


class RunRecords:
    """Appends one JSON object per step to metrics.jsonl and mirrors it to TensorBoard."""

    def __init__(
        self, run_dir: str | Path, *, resume_step: int | None = None, tensorboard: bool = True
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ModuleNotFoundError as error:  # torch's writer needs the tensorboard package
                logger.warning("TensorBoard events skipped (%s); metrics.jsonl has every metric", error)
                return
            self._writer = SummaryWriter(
                str(self.run_dir / "events"), purge_step=resume_step + 1 if resume_step else None
            )

    def _truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (written after the checkpoint a run resumes from)."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.read() if line["step"] <= step]
        self.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def write_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> Path:
        path = self.run_dir / "samples" / f"step_{step}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples))
        return path

    def plot(self) -> list[Path]:
        """Write plots/*.png from metrics.jsonl; returns the files written. Without matplotlib (a bare
        GPU image) the run still ends normally, with a warning."""
        try:
            return write_plots(self.read(), self.run_dir / "plots")
        except ModuleNotFoundError as error:
            if error.name != "matplotlib":
                raise
            logger.warning(
                "plots skipped: matplotlib is not installed (pip install matplotlib; "
                "duca_fast.train.records.write_plots draws them from %s later)",
                self.metrics_path,
            )
            return []

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (fewer at the start)."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def write_plots(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [row["step"] for row in rows]
    keys = sorted({k for row in rows for k in row if k != "step"})
    window = max(1, len(rows) // 10)
    written = []
    for filename, title, selectors in PLOTS:
        chosen = [
            k for sel in selectors for k in keys if k == sel or (sel.endswith("/") and k.startswith(sel))
        ]
        if not chosen:
            continue
        columns = min(3, len(chosen))
        lines = -(-len(chosen) // columns)
        fig, axes = plt.subplots(lines, columns, figsize=(4 * columns, 2.8 * lines), squeeze=False)
        for ax, key in zip(axes.flat, chosen):
            points = [(s, row[key]) for s, row in zip(steps, rows) if isinstance(row.get(key), (int, float))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, "o", markersize=2.5, alpha=0.35, color="tab:blue")
                ax.plot(xs, _smoothed(list(ys), window), color="tab:blue", linewidth=1.8)
            if key.endswith(RATE_SUFFIX):
                ax.set_ylim(-0.03, 1.03)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(chosen) :]:
            ax.set_visible(False)
        fig.suptitle(f"{title}: points per step, line = mean of the last {window}", fontsize=10)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    timed = [(s, row) for s, row in zip(steps, rows) if any(k in row for k in TIME_KEYS)]
    if timed:
        fig, ax = plt.subplots(figsize=(7, 4))
        bottom = [0.0] * len(timed)
        for key in TIME_KEYS:
            heights = [float(row.get(key) or 0.0) for _, row in timed]
            ax.bar([s for s, _ in timed], heights, bottom=bottom, label=key.split("/")[1])
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title("Time per step by phase (s)")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "time_split.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_before_after(
    before: Mapping[str, float], after: Mapping[str, float], keys: Sequence[str], run_dir: Path
) -> str:
    """The held-out before/after table (``eval/before_after.md``) and its bar plot; returns the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if k in before and k in after]
    lines = ["| held-out metric | before | after | change |", "|---|---|---|---|"]
    lines += [f"| {k} | {before[k]:.3f} | {after[k]:.3f} | {after[k] - before[k]:+.3f} |" for k in keys]
    table = "\n".join(lines) + "\n"
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval" / "before_after.md").write_text(table)
    fig, axes = plt.subplots(1, len(keys), figsize=(2.3 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        ax.bar(["before", "after"], [before[key], after[key]], color=["tab:gray", "tab:green"])
        if key.endswith(RATE_SUFFIX):
            ax.set_ylim(0, 1)
        ax.set_title(key, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Held-out evaluation ({int(after.get('num_sessions', 0))} sessions, greedy)", fontsize=10)
    fig.tight_layout()
    (run_dir / "plots").mkdir(exist_ok=True)
    fig.savefig(run_dir / "plots" / "eval_before_after.png", dpi=100)
    plt.close(fig)
    return table
