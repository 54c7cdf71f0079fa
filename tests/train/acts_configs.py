"""Tiny sales-acts configs for the act-trainer and compare tests (a few steps of a few sessions each)."""

from __future__ import annotations

from pathlib import Path

from duca_fast.train.config import TrainConfig, load_config

ACTS_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "acts.yaml"


def tiny_acts_config(run_dir: Path, *overrides: str) -> TrainConfig:
    """configs/acts.yaml shrunk to 2 steps of 2 groups x 4 sessions; later ``key=value`` overrides win."""
    return load_config(
        ACTS_CONFIG,
        [
            f"run_dir={run_dir}",
            "steps=2",
            "rollout.groups_per_step=2",
            "rollout.group_size=4",
            "model.hidden_size=16",
            "checkpoint_every=1",
            "progress=false",
            *overrides,
        ],
    )
