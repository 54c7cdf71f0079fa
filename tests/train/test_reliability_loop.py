"""Issue 14 on the training loop: run-directory ownership, failing sessions, resume overrides, Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from duca_fast.train.checkpoint import latest_checkpoint, list_checkpoints
from duca_fast.train.config import ConfigError
from duca_fast.train.loop import Trainer, train
from duca_fast.train.rundir import read_run_id

from .acts_configs import tiny_acts_config
from .runs import ROOT, cli, read_metrics, tiny_overrides


def acts_args(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--config",
        "configs/acts.yaml",
        f"run_dir={run_dir}",
        f"steps={steps}",
        "rollout.groups_per_step=2",
        "rollout.group_size=4",
        "model.hidden_size=16",
        "checkpoint_every=1",
        "keep_checkpoints=5",
        "progress=false",
        *extra,
    ]


def manifest_run_id(checkpoint: Path) -> str:
    return json.loads((checkpoint / "manifest.json").read_text())["run_id"]


def test_a_reused_run_directory_through_the_cli(tmp_path):
    """Item 1: a new run in a used directory deleted the old metrics, pruning kept the old run's later
    checkpoints, ``eval --checkpoint latest`` scored the old run and ``--resume`` interleaved both."""
    run_dir = tmp_path / "run"
    assert cli("train", *acts_args(run_dir, 2)).returncode == 0
    old_id, old_metrics = read_run_id(run_dir), (run_dir / "metrics.jsonl").read_text()
    old_step_2 = tmp_path / "old_step_2"
    shutil.copytree(run_dir / "checkpoints" / "step_2", old_step_2)

    refused = cli("train", *acts_args(run_dir, 1))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-2000:]
    assert "is not empty (run " in refused.stderr and "--resume" in refused.stderr
    assert "--overwrite" in refused.stderr
    assert (run_dir / "metrics.jsonl").read_text() == old_metrics, "the old run is untouched"
    assert read_run_id(run_dir) == old_id

    replaced = cli("train", "--overwrite", *acts_args(run_dir, 1))
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    new_id = read_run_id(run_dir)
    assert new_id != old_id
    assert [row["step"] for row in read_metrics(run_dir)] == [1]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_1"]
    assert manifest_run_id(run_dir / "checkpoints" / "step_1") == new_id

    # The old run's later checkpoint back in the directory (as pruning used to leave it): never used.
    shutil.copytree(old_step_2, run_dir / "checkpoints" / "step_2")
    assert latest_checkpoint(run_dir).name == "step_1"
    scored = cli("eval", *acts_args(run_dir, 1), "--checkpoint", "latest", "--sessions", "2")
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert f"belongs to run {old_id}, not to this run ({new_id})" in scored.stderr

    resumed = cli("train", "--resume", *acts_args(run_dir, 3))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2, 3]
    assert {manifest_run_id(p) for p in list_checkpoints(run_dir)} == {new_id}
    assert json.loads((run_dir / "run.json").read_text())["owner"] is None, "released at the end"


def test_a_failed_start_releases_the_directory(tmp_path):
    config = tiny_acts_config(tmp_path / "run")
    train(config)
    with pytest.raises(ConfigError, match=r"algo\.name 'duca' -> 'grpo'"):
        train(tiny_acts_config(tmp_path / "run", "algo.name=grpo", "steps=3"), resume=True)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["owner"] is None


def test_resume_refuses_run_defining_overrides_unless_forced(tmp_path, capsys):
    """Item 4: algo.name / group_size on --resume were accepted silently; now one line naming the keys."""
    train(tiny_acts_config(tmp_path / "run"))
    changed = tiny_acts_config(tmp_path / "run", "algo.name=grpo", "rollout.group_size=2", "steps=3")
    with pytest.raises(ConfigError) as refused:
        train(changed, resume=True)
    message = str(refused.value)
    assert "algo.name 'duca' -> 'grpo'" in message and "rollout.group_size 4 -> 2" in message
    assert "--force" in message and "\n" not in message
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [1, 2], "nothing was trained"

    train(changed, resume=True, force=True)
    rows = read_metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert "resume: algo.name 'duca' -> 'grpo'" in capsys.readouterr().out
    assert "name: grpo" in (tmp_path / "run" / "config.yaml").read_text()


def test_resume_applies_the_new_learning_rate_to_the_restored_optimizer(tmp_path, capsys):
    """Item 4: ``optim.lr`` given with --resume was written to config.yaml, the optimizer kept the old one."""
    train(tiny_acts_config(tmp_path / "run", "optim.lr=5e-3", "optim.warmup_steps=4"))
    resumed = tiny_acts_config(tmp_path / "run", "optim.lr=1e-3", "optim.warmup_steps=4", "steps=4")
    trainer = Trainer(resumed, resume=True)
    try:
        # Two scheduler steps done of a 4-step warmup: the next update runs at 3/4 of the new rate.
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 3 / 4)
        assert "resume: optim.lr 0.005 -> 0.001" in capsys.readouterr().out
        trainer.run()
    finally:
        trainer.close()
    rows = read_metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[1]["optim/lr"] == pytest.approx(5e-3 * 2 / 4)
    assert rows[2]["optim/lr"] == pytest.approx(1e-3 * 3 / 4)
    assert rows[3]["optim/lr"] == pytest.approx(1e-3)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed): connections are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reliability_model_cache")


@pytest.fixture
def silent_port():
    """A loopback port that accepts connections (the kernel's backlog) and never answers: a hung server."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield server.getsockname()[1]


LLM_CUSTOMER = ["env.customer=llm", "env.customer_model=customer"]


@pytest.mark.parametrize(
    ("endpoint", "overrides", "reason", "detail"),
    [
        (
            "closed",
            [*LLM_CUSTOMER, "env.customer_max_attempts=1"],
            "customer_error",
            "could not connect",
        ),
        (
            "silent",
            [*LLM_CUSTOMER, "env.customer_timeout_s=0.5", "env.customer_max_attempts=2"],
            "customer_error",
            "timed out after 0.5 s; gave up after 2 attempts",
        ),
        ("closed", ["rollout.max_model_len=64"], "prompt_too_long", "prompt too long"),
    ],
    ids=["dead-customer-endpoint", "hung-customer-endpoint", "tiny-max-model-len"],
)
def test_a_run_whose_sessions_all_fail_stops(
    tmp_path, cache_dir, silent_port, endpoint, overrides, reason, detail
):
    """Item 2: every session failed, the run exited 0 with checkpoints and nothing on the console; a hung
    endpoint cost ~95 s a step, not configurable."""
    run_dir = tmp_path / "run"
    port = silent_port if endpoint == "silent" else closed_port()
    args = [*tiny_overrides(run_dir, cache_dir, "hf", steps=4), *overrides]
    args.append(f"env.customer_base_url=http://127.0.0.1:{port}/v1")
    result = cli("train", "--config", "configs/demo.yaml", *args)
    assert result.returncode == 1, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("duca-fast train: error: stopped at step 2: 2 steps in a row"), error
    assert f"4/4 sessions failed ({reason} 4)" in error and detail in error, error
    assert "Traceback" not in result.stderr
    # The console shows every failed step.
    assert f"step 1: 4/4 sessions failed ({reason} 4)" in result.stdout
    assert f"step 2: 4/4 sessions failed ({reason} 4)" in result.stdout
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2] and all(r["rollout/failed_sessions"] == 4 for r in rows)
    assert list_checkpoints(run_dir) == [], "failed steps are never checkpointed"


def test_the_failure_limits_are_configurable(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = [*tiny_overrides(run_dir, cache_dir, "hf", steps=2), "rollout.max_model_len=64"]
    result = cli("train", "--config", "configs/demo.yaml", *args, "train.max_failed_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2: 4/4 sessions failed (prompt_too_long 4)" in result.stdout
    assert list_checkpoints(run_dir) == []


def test_ctrl_c_stops_at_a_clean_point_and_resumes(tmp_path):
    """Item 9: Ctrl-C printed a KeyboardInterrupt traceback."""
    run_dir = tmp_path / "run"
    args = acts_args(run_dir, 500, "checkpoint_every=0")
    process = subprocess.Popen(
        [sys.executable, "-m", "duca_fast.cli", "train", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("duca-fast train: interrupted at step ") and last.endswith(
        "; resume with --resume"
    )
    step = int(last.split("interrupted at step ")[1].split(";")[0])
    assert 2 <= step < 500
    assert [p.name for p in list_checkpoints(run_dir)] == [f"step_{step}"], "the step was checkpointed"
    assert read_metrics(run_dir)[-1]["step"] == step

    resumed = cli("train", "--resume", *acts_args(run_dir, step + 1, "checkpoint_every=0"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [row["step"] for row in read_metrics(run_dir)] == list(range(1, step + 2))
