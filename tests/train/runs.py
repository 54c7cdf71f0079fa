"""Helpers of the trainer tests: tiny LLM-task overrides, the CLI in a subprocess, metrics files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Wall-clock and throughput numbers differ between runs, and the engine's push counter restarts with the
# process (a resumed run pushes its checkpoint once at start); everything else must match exactly.
VOLATILE = (
    "time/",
    "tokens_per_s",
    "rollout/generated_tokens_per_s",
    "rollout/generate_s",
    "rollout/customer_wait_s",
    "rollout/engine_idle_share",
    "rollout/wall_s",
    "sync/seconds",
    "sync/weight_version",
)


def tiny_overrides(run_dir: Path, cache: Path, engine: str, steps: int = 2) -> list[str]:
    return [
        "model.path=tiny",
        f"model.cache_dir={cache}",
        "model.lora_rank=4",
        f"rollout.engine={engine}",
        "rollout.groups_per_step=2",
        "rollout.group_size=2",
        "rollout.max_new_tokens=8",
        "rollout.max_model_len=1024",
        "env.max_turns=2",
        "env.num_scenarios=8",
        f"steps={steps}",
        "checkpoint_every=1",
        "keep_checkpoints=5",
        f"run_dir={run_dir}",
        "progress=false",
        "optim.lr=1e-2",
        "eval_before_after=false",
    ]


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "duca_fast.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}
