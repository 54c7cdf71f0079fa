"""The one loop with either task: resume after SIGKILL, the same CLI errors, eval --checkpoint none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from duca_fast.train.checkpoint import latest_checkpoint
from duca_fast.train.config import load_config
from duca_fast.train.loop import NonFiniteGradientError, clip_gradients, evaluate
from duca_fast.train.task import derive_seed

from .runs import ROOT, cli, read_metrics, stable, tiny_overrides

TASKS = ("sales", "sales-acts")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("loop_model_cache")


def task_args(task: str, run_dir: Path, cache: Path, steps: int) -> list[str]:
    """A tiny run of either task: its config file and overrides."""
    if task == "sales":
        return ["--config", "configs/demo.yaml", *tiny_overrides(run_dir, cache, "hf", steps=steps)]
    return [
        "--config",
        "configs/acts.yaml",
        f"run_dir={run_dir}",
        f"steps={steps}",
        "rollout.groups_per_step=2",
        "rollout.group_size=4",
        "model.hidden_size=16",
        "checkpoint_every=1",
        "keep_checkpoints=10",
        "progress=false",
    ]


@pytest.mark.parametrize("task", TASKS)
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, cache_dir, task):
    steps = 4 if task == "sales" else 12
    straight = tmp_path / "straight"
    result = cli("train", *task_args(task, straight, cache_dir, steps))
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "duca_fast.cli", "train", *task_args(task, killed, cache_dir, steps)],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoints" / "step_2").exists():
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert latest_checkpoint(killed) is not None, "the run died before its first checkpoint"
    resumed_from = int(latest_checkpoint(killed).name.split("_")[1])
    assert resumed_from < steps, "the run finished before it could be killed; nothing was tested"

    result = cli("train", "--resume", *task_args(task, killed, cache_dir, steps))
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [stable(r) for r in read_metrics(straight)]
    got = [stable(r) for r in read_metrics(killed)]
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for want, have in zip(expected, got):
        differing = {
            k: (want.get(k), have.get(k)) for k in want.keys() | have.keys() if want.get(k) != have.get(k)
        }
        assert not differing, f"step {want['step']} differs after resume from {resumed_from}: {differing}"


@pytest.mark.parametrize("config", ["configs/demo.yaml", "configs/acts.yaml"])
@pytest.mark.parametrize(
    "args,message",
    [
        (["--resume"], "is empty; start without --resume (or with --overwrite to replace it)"),
        (["optim.lrr=1e-4"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
        (["optim.lr=-1"], "optim.lr must be a positive number"),
        (["steps=many"], "invalid value for 'steps'"),
        (["rollout.group_size=1"], "rollout.group_size must be >= 2"),
        (["algo.loss.kl_type=k9"], "algo.loss.kl_type must be one of"),
        (["algo.advantage.scale=wide"], "algo.advantage.scale must be one of"),
        (["algo.loss.clip_hig=0.3"], "did you mean 'algo.loss.clip_high'"),
        (["algo.loss.temperature=0.5"], "use rollout.temperature"),
        (["optim.warmup_steps=-5"], "optim.warmup_steps must be >= 0"),
    ],
)
def test_both_tasks_give_the_same_one_line_errors(tmp_path, config, args, message):
    result = cli("train", "--config", config, f"run_dir={tmp_path / 'run'}", *args, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr[-2000:]
    assert result.stderr.startswith("duca-fast train: error: ")


@pytest.mark.parametrize("task", TASKS)
def test_eval_checkpoint_none_is_the_initial_policy(tmp_path, cache_dir, task):
    args = task_args(task, tmp_path / "never-trained", cache_dir, steps=1)
    out = tmp_path / "eval.json"
    result = cli("eval", *args, "--checkpoint", "none", "--sessions", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert "| num_sessions" in result.stdout and metrics["num_sessions"] == 3
    if task == "sales-acts":
        assert "| conversion_rate" in result.stdout
    # The rates are over finished sessions (the tiny random LLM's greedy turns may decode to empty text,
    # which fails a session; failures are counted).
    assert ("conversion_rate" in metrics) == (metrics["failed_sessions"] < 3)
    config = load_config(args[1], args[2:])
    assert metrics == evaluate(config, None, 3, seed=config.eval_seed), "the same sessions, the same policy"
    assert not (tmp_path / "never-trained").exists(), "no run directory is needed or made"
    result = cli("eval", *args, "--checkpoint", "latest")
    assert result.returncode == 2 and "no complete checkpoint" in result.stderr


def test_eval_rejects_zero_sessions(tmp_path):
    result = cli("eval", "--config", "configs/acts.yaml", "--checkpoint", "none", "--sessions", "0")
    assert result.returncode == 2 and "--sessions must be >= 1" in result.stderr


def test_a_non_finite_gradient_stops_the_update_before_the_weights_change():
    layer = torch.nn.Linear(3, 2)
    layer(torch.tensor([[1.0, float("nan"), 0.0]])).sum().backward()
    before = layer.weight.detach().clone()
    with pytest.raises(NonFiniteGradientError, match="gradient norm is nan"):
        clip_gradients(list(layer.parameters()), max_norm=1.0)
    torch.testing.assert_close(layer.weight.detach(), before)
    layer.zero_grad()
    layer(torch.ones(1, 3)).sum().backward()
    assert clip_gradients(list(layer.parameters()), max_norm=0.0) > 0, "0 = no clip, still checked"


def test_seeds_depend_on_purpose_and_position_only():
    assert derive_seed(0, "sampling", 3) == derive_seed(0, "sampling", 3)
    seeds = {derive_seed(0, "sampling", 3), derive_seed(0, "customer", 3), derive_seed(0, "sampling", 4)}
    seeds.add(derive_seed(1, "sampling", 3))
    assert len(seeds) == 4 and all(0 <= s < 2**31 for s in seeds)


def test_engine_logs_go_to_the_run_directory_and_to_the_console_only_when_verbose(tmp_path, capsys):
    import logging

    from duca_fast.train.console import route_engine_logs

    logger = logging.getLogger("vllm")
    before = list(logger.handlers)
    undo = route_engine_logs(tmp_path / "logs" / "engine.log", console=False)
    logger.info("Reloading and processing weights took 0.42 seconds")
    undo()
    assert "Reloading and processing" in (tmp_path / "logs" / "engine.log").read_text()
    assert "Reloading" not in capsys.readouterr().err
    assert logger.handlers == before
    undo = route_engine_logs(tmp_path / "logs" / "verbose.log", console=True)
    logger.info("Successfully reset prefix cache")
    undo()
    assert "Successfully reset prefix cache" in capsys.readouterr().err
    assert "Successfully reset" in (tmp_path / "logs" / "verbose.log").read_text()
    assert logger.handlers == before
