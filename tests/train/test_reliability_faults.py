"""Fault injection: SIGKILL a tiny twin run at 20 random points, resume each time, same metrics as a run
that was never interrupted. The table of cases and results is in docs/reliability.md."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from duca_fast.train.checkpoint import latest_checkpoint
from duca_fast.train.loop import FAULT_ENV, FAULT_PHASES, train

from .acts_configs import tiny_acts_config
from .runs import ROOT, read_metrics, stable

STEPS = 10
KILL_POINTS = 20
CHECKPOINT_DELAYS = ("0.002", "0.02")
"""Seconds after a checkpoint write starts: a kill inside the write, or just after it when it is quicker."""
PHASES = (*FAULT_PHASES, *(f"checkpoint:{delay}" for delay in CHECKPOINT_DELAYS))
SETTINGS = [
    f"steps={STEPS}",
    "checkpoint_every=1",
    "keep_checkpoints=2",
    "rollout.groups_per_step=2",
    "rollout.group_size=4",
    "model.hidden_size=16",
    "progress=false",
]


def kill_points(seed: int) -> list[tuple[int, str]]:
    """20 distinct (step, phase) points in run order, every phase among them (the last step is left out:
    a kill must leave something to resume)."""
    candidates = [(step, phase) for step in range(1, STEPS) for phase in PHASES]
    rng = random.Random(seed)
    while True:
        picked = sorted(rng.sample(candidates, KILL_POINTS), key=lambda p: (p[0], PHASES.index(p[1])))
        if {phase for _, phase in picked} == set(PHASES):
            return picked


def run_cli(run_dir: Path, *flags: str, fault: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(FAULT_ENV, None)
    if fault is not None:
        env[FAULT_ENV] = fault
    args = ["--config", "configs/acts.yaml", f"run_dir={run_dir}", *SETTINGS]
    return subprocess.run(
        [sys.executable, "-m", "duca_fast.cli", "train", *flags, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_sigkill_at_20_random_points_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = train(tiny_acts_config(tmp_path / "straight", *SETTINGS))
    expected = [stable(row) for row in read_metrics(straight)]

    run_dir, cases = tmp_path / "killed", []
    for step, phase in kill_points(seed=14):
        before = latest_checkpoint(run_dir) if (run_dir / "run.json").exists() else None
        # Killed before its first checkpoint: there is nothing to resume, the run starts again.
        flags = ("--resume",) if before is not None else (("--overwrite",) if run_dir.exists() else ())
        result = run_cli(run_dir, *flags, fault=f"{step}:{phase}")
        assert result.returncode == -9, f"{step}:{phase} was not reached: {result.stderr[-2000:]}"
        leftovers = sorted(p.name for p in (run_dir / "checkpoints").glob(".tmp-step_*"))
        cases.append((step, phase, flags[0] if flags else "(new)", before and before.name, leftovers))

    result = run_cli(run_dir, "--resume", fault=None)
    assert result.returncode == 0, result.stderr[-3000:]
    got = [stable(row) for row in read_metrics(run_dir)]
    assert [row["step"] for row in got] == list(range(1, STEPS + 1))
    assert got == expected
    assert not list((run_dir / "checkpoints").glob(".tmp-step_*")), "the dead writers' leftovers are gone"
    print("\n| # | killed at step | phase | started with | resumed from | temp dir left by the kill |")
    print("|---|---|---|---|---|---|")
    for n, (step, phase, flag, before, leftovers) in enumerate(cases, 1):
        print(f"| {n} | {step} | {phase} | {flag} | {before or '-'} | {', '.join(leftovers) or '-'} |")
