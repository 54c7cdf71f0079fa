"""What a run leaves behind: metrics.jsonl, TensorBoard events, transcripts and plots."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Panels of the plots: (file, title, [(metric key prefix or exact key, label)]).
PLOTS = [
    (
        "rewards_per_horizon.png",
        "Rewards per horizon",
        [("reward/turn/", "turn: "), ("reward/session/", "session: ")],
    ),
    (
        "advantages.png",
        "Advantage spread per horizon (std)",
        [
            ("advantage/turn_horizon/std", "turn horizon"),
            ("advantage/session_horizon/std", "session horizon"),
            ("advantage/fused/std", "fused"),
        ],
    ),
    ("task_metrics.png", "Task metrics", [("task/", "")]),
    (
        "loss.png",
        "Loss and diagnostics",
        [("loss/", ""), ("grad_norm", "grad_norm"), ("sync/logprob_gap", "engine-trainer logprob gap")],
    ),
]
TIME_KEYS = ("time/rollout", "time/advantage", "time/train", "time/sync")


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
            from torch.utils.tensorboard import SummaryWriter

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
        """Write plots/*.png from metrics.jsonl; returns the files written."""
        return write_plots(self.read(), self.run_dir / "plots")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_plots(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [row["step"] for row in rows]
    keys = sorted({k for row in rows for k in row if k != "step"})
    written = []
    for filename, title, selectors in PLOTS:
        series = []
        for selector, label in selectors:
            for key in keys:
                if key == selector or (selector.endswith("/") and key.startswith(selector)):
                    series.append(
                        (label + key.removeprefix(selector) if selector.endswith("/") else label, key)
                    )
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, key in series:
            points = [(s, row[key]) for s, row in zip(steps, rows) if isinstance(row.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=label or key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
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
