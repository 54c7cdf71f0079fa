"""Issue 14, items 3 and 9: every bad config or argument is one line and exit 2, before any model loads."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "duca_fast.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def assert_one_line(result: subprocess.CompletedProcess, command: str, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert result.stderr.startswith(f"duca-fast {command}: error: "), result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in result.stderr, result.stderr


# Before issue 14 each of these trained (gradient ascent for the warmup), was accepted, or failed with a
# traceback only after the model, the engine and a whole rollout had loaded.
ITEM_3 = [
    ("optim.warmup_steps=-5", "optim.warmup_steps must be >= 0"),
    ("samples_per_step=-1", "samples_per_step must be >= 0"),
    ("eval_sessions=-1", "eval_sessions must be >= 1"),
    ("model.lora_alpha=0", "model.lora_alpha must be > 0"),
    ("algo.loss.kl_type=k9", "algo.loss.kl_type must be one of"),
    ("algo.advantage.turn_scope=session", "algo.advantage.turn_scope must be one of"),
    ("algo.advantage.scale=wide", "algo.advantage.scale must be one of"),
    ("algo.loss.clip_low=-0.1", "algo.loss.clip_low"),
    ("algo.loss.dual_clip=0.5", "algo.loss.dual_clip must be a finite number > 1"),
    ("algo.loss.tis_cap=0", "algo.loss.tis_cap must be a finite number > 0"),
    ("algo.advantage.turn_weight=nan", "algo.advantage.turn_weight must be a finite number"),
    (
        "algo.turn_component_weights.complianse=2",
        "unknown reward component 'complianse'; did you mean 'compliance'",
    ),
    ("algo.session_component_weights.conversoin=2", "did you mean 'conversion'"),
    (
        "env.scenarios_path=/no/such/scenarios.jsonl",
        "env.scenarios_path '/no/such/scenarios.jsonl' is not a file",
    ),
    ("train.max_failed_share=0", "train.max_failed_share must be in (0, 1]"),
    ("train.max_failed_steps=0", "train.max_failed_steps must be >= 1"),
    ("env.customer_timeout_s=0", "env.customer_timeout_s must be a positive number"),
    ("env.customer_max_attempts=0", "env.customer_max_attempts must be >= 1"),
    ("rollout.max_model_len=0", "rollout.max_model_len must be >= 2"),
    ("rollout.max_num_seqs=0", "rollout.max_num_seqs must be >= 1"),
    ("rollout.driver=threads", "rollout.driver must be one of ('async', 'rounds')"),
    ("rollout.max_sessions_in_flight=-1", "rollout.max_sessions_in_flight must be >= 0"),
]


@pytest.mark.parametrize(("override", "message"), ITEM_3, ids=[o for o, _ in ITEM_3])
def test_item_3_configs_fail_in_one_line_before_any_model_loads(tmp_path, override, message):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    # The LLM task with the default model: loading anything would create the cache and the run directory.
    result = cli(
        "train", "--config", "configs/demo.yaml", f"run_dir={run_dir}", f"model.cache_dir={cache}", override
    )
    assert_one_line(result, "train", message)
    assert not run_dir.exists() and not cache.exists(), "nothing was loaded or written"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps: 3\nenv:\n\tname: sales\n", "line 3 column 1: YAML error: found character that cannot start"),
        ("steps: [3\n", "YAML error: did not find expected ',' or ']'"),
        ("- steps\n- 3\n", "must be a mapping of keys (key: value), not a list"),
    ],
    ids=["tab", "syntax", "top-level-list"],
)
def test_yaml_problems_are_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = cli("train", "--config", str(path), f"run_dir={tmp_path / 'run'}")
    assert_one_line(result, "train", str(path), message)


def test_a_tab_is_named_as_the_problem(tmp_path):
    path = tmp_path / "tab.yaml"
    path.write_text("steps: 3\nenv:\n\tname: sales\n")
    assert_one_line(cli("eval", "--config", str(path)), "eval", "a tab: YAML indents with spaces only")


def test_eval_zero_sessions_is_refused_before_loading(tmp_path):
    result = cli("eval", "--config", "configs/demo.yaml", "--sessions", "0", f"model.cache_dir={tmp_path}/c")
    assert_one_line(result, "eval", "--sessions must be >= 1, got 0")
    assert not (tmp_path / "c").exists()


def test_compare_names_unknown_algorithms(tmp_path):
    result = cli(
        "compare", "--config", "configs/acts.yaml", "--algos", "duca,ppo", "--out", str(tmp_path / "c")
    )
    assert_one_line(
        result, "compare", "--algos: unknown algorithms ['ppo']; choose from duca, dual_track, grpo, gdpo"
    )
    assert not (tmp_path / "c").exists()


def test_force_without_resume_is_refused(tmp_path):
    result = cli("train", "--config", "configs/acts.yaml", "--force", f"run_dir={tmp_path}/run")
    assert_one_line(result, "train", "--force only applies with --resume")


def test_overrides_may_come_before_options(tmp_path):
    # Before issue 14: "unrecognized arguments: --config configs/acts.yaml". The error proves the override
    # (before the option) and the config file (after it) were both read.
    result = cli("train", "optim.warmup_steps=-5", "--config", "configs/acts.yaml", f"run_dir={tmp_path}")
    assert_one_line(result, "train", "optim.warmup_steps must be >= 0")
    result = cli("eval", "rollout.group_size=1", "--checkpoint", "none", "--config", "configs/acts.yaml")
    assert_one_line(result, "eval", "rollout.group_size must be >= 2")


def test_bench_results_go_where_the_cli_says(tmp_path, monkeypatch):
    import bench.common

    committed = bench.common.RESULTS_DIR
    assert committed == ROOT / "bench" / "results", "run by hand, a bench writes the committed results"
    monkeypatch.setenv("DUCA_FAST_BENCH_RESULTS", str(tmp_path / "out"))
    try:
        module = importlib.reload(bench.common)
        path = module.write_results("probe", [{"a": 1}], {"device": "cpu"})
        assert path == tmp_path / "out" / "probe.md" and (tmp_path / "out" / "probe.csv").exists()
        assert not (committed / "probe.md").exists()
    finally:
        monkeypatch.delenv("DUCA_FAST_BENCH_RESULTS")
        importlib.reload(bench.common)


def test_bench_default_is_outside_the_committed_results():
    from duca_fast.cli import _parse

    assert _parse(["bench"]).out == "runs/bench"
    assert _parse(["bench", "--only", "train", "--out", "/tmp/x"]).out == "/tmp/x"


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    """A config under configs/ that its own loader refuses would fail a user's first command."""
    from duca_fast.train.config import load_config

    config = load_config(path)
    assert config.steps >= 1
