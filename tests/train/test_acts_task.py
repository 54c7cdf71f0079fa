"""The act twin through the training loop: outputs, resume equality, learning, evaluation."""

from __future__ import annotations

import json
import math

import pytest

from duca_fast.train.checkpoint import list_checkpoints
from duca_fast.train.config import ConfigError, load_config
from duca_fast.train.loop import evaluate, train
from duca_fast.train.rundir import RunDirError

from .acts_configs import ACTS_CONFIG, tiny_acts_config

EXPECTED_KEYS = {
    "step",
    "reward/turn/compliance",
    "reward/turn/repetition",
    "reward/turn/naturalness",
    "reward/turn/fluency",
    "reward/session/conversion",
    "reward/session/margin",
    "reward/turn_total/mean",
    "reward/session_total/mean",
    "advantage/turn_horizon/std",
    "advantage/session_horizon/std",
    "advantage/fused/std",
    "task/conversion_rate",
    "task/repetition_rate",
    "task/identity_detection_rate",
    "task/compliance_violation_rate",
    "task/mean_turns",
    "loss/total",
    "loss/clip_frac",
    "loss/approx_kl",
    "loss/entropy",
    "loss/tis_frac_capped",
    "grad_norm",
    "optim/lr",
    "time/rollout",
    "time/advantage",
    "time/train",
    "time/sync",
}


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_step_run_writes_every_output(tmp_path):
    config = tiny_acts_config(tmp_path / "run", "samples_per_step=3")
    run_dir = train(config)
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert set(row) >= EXPECTED_KEYS, sorted(EXPECTED_KEYS - set(row))
        assert all(value is None or math.isfinite(value) for value in row.values())
        assert row["time/sync"] < 0.1, "nothing to push: the rollout reads the trained weights"
    assert load_config(run_dir / "config.yaml").env.name == "sales-acts"
    assert {p.name for p in (run_dir / "plots").glob("*.png")} >= {
        "rewards_per_horizon.png",
        "task_metrics.png",
        "loss.png",
        "time_split.png",
    }
    samples = [json.loads(line) for line in (run_dir / "samples" / "step_2.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and samples[0]["acts"] and samples[0]["dialogue"][0].startswith("customer:")
    assert len(samples[0]["turn_advantages"]) == len(samples[0]["acts"])
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_1", "step_2"]
    assert list(run_dir.glob("events/*")), "TensorBoard events"


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    straight = train(tiny_acts_config(tmp_path / "a", "steps=4", "checkpoint_every=2"))
    interrupted = tiny_acts_config(tmp_path / "b", "steps=4", "checkpoint_every=2")
    train(tiny_acts_config(tmp_path / "b", "steps=2", "checkpoint_every=2"))
    resumed = train(interrupted, resume=True)

    def untimed(rows):
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]

    straight_rows, resumed_rows = untimed(read_metrics(straight)), untimed(read_metrics(resumed))
    assert [row["step"] for row in resumed_rows] == [1, 2, 3, 4]
    assert resumed_rows[2:] == straight_rows[2:]
    assert resumed_rows == straight_rows


def test_optimizer_state_offload_changes_no_update(tmp_path):
    """optim.offload_state=true: the loop moves the state out after each update and back before the next;
    on CPU nothing moves (0 MiB logged) and the run is the same run."""
    plain = train(tiny_acts_config(tmp_path / "plain", "steps=3"))
    offloaded = train(tiny_acts_config(tmp_path / "offloaded", "steps=3", "optim.offload_state=true"))

    def untimed(rows):
        volatile = ("time/", "optim/offloaded")
        return [{k: v for k, v in row.items() if not k.startswith(volatile)} for row in rows]

    rows = read_metrics(offloaded)
    assert [row["optim/offloaded_mib"] for row in rows] == [0.0, 0.0, 0.0]
    assert untimed(rows) == untimed(read_metrics(plain))


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(RunDirError, match="is empty; start without --resume"):
        train(tiny_acts_config(tmp_path / "run"), resume=True)


def test_policy_improves_on_a_small_budget(tmp_path):
    """Turn penalties of a random policy are large; a few dozen steps remove most of them."""
    config = tiny_acts_config(
        tmp_path / "run",
        "steps=30",
        "rollout.groups_per_step=4",
        "rollout.group_size=6",
        "checkpoint_every=0",
        "env.max_turns=6",
    )
    rows = read_metrics(train(config))
    start = sum(row["reward/turn_total/mean"] for row in rows[:5]) / 5
    end = sum(row["reward/turn_total/mean"] for row in rows[-5:]) / 5
    assert end > start + 0.1, (start, end)
    assert rows[-1]["loss/entropy"] < rows[0]["loss/entropy"]


def test_evaluation_returns_the_papers_metrics(tmp_path):
    config = tiny_acts_config(tmp_path / "run", "steps=3", "optim.lr=5e-2")
    checkpoint = list_checkpoints(train(config))[-1]
    trained = evaluate(config, checkpoint, 12, seed=3)
    assert trained == evaluate(config, checkpoint, 12, seed=3), "greedy evaluation is deterministic"
    base = evaluate(config, None, 12, seed=3)
    assert base != trained, "checkpoint None is the initial policy, not the trained one"
    for metrics in (trained, base):
        assert set(metrics) == {
            "conversion_rate",
            "repetition_rate",
            "identity_detection_rate",
            "compliance_violation_rate",
            "mean_turns",
            "mean_turn_reward",
            "mean_session_reward",
            "failed_sessions",
            "num_sessions",
        }
        assert 0 <= metrics["conversion_rate"] <= 1 and 1 <= metrics["mean_turns"] <= config.env.max_turns
        assert -4 <= metrics["mean_turn_reward"] <= 0 and metrics["num_sessions"] == 12


def test_sampled_evaluation_from_the_cli_is_repeatable_and_not_greedy(tmp_path):
    from duca_fast.cli import main

    base = ["eval", "--config", str(ACTS_CONFIG), "--checkpoint", "none", "--sessions", "12", "--seed", "4"]
    results = {}
    for name, extra in {"greedy": [], "sampled": ["--sampled"], "again": ["--sampled"]}.items():
        out = tmp_path / f"{name}.json"
        assert main([*base, *extra, "--out", str(out), f"run_dir={tmp_path / 'run'}"]) == 0
        results[name] = json.loads(out.read_text())
    assert results["sampled"] == results["again"], "the same seed samples the same sessions"
    assert results["sampled"] != results["greedy"]
    config = load_config(ACTS_CONFIG, [f"run_dir={tmp_path / 'run'}"])
    assert results["greedy"] == evaluate(config, None, 12, 4)


def test_before_after_evaluation_is_written_and_tabulated(tmp_path, capsys):
    config = tiny_acts_config(tmp_path / "run", "eval_before_after=true", "eval_sessions=6")
    run_dir = train(config)
    before = json.loads((run_dir / "eval" / "before.json").read_text())
    assert before == evaluate(config, None, 6, seed=config.eval_seed), "before = the initial policy"
    after = json.loads((run_dir / "eval" / "after.json").read_text())
    assert after == evaluate(config, list_checkpoints(run_dir)[-1], 6, seed=config.eval_seed)
    table = (run_dir / "eval" / "before_after.md").read_text()
    assert f"| conversion_rate | {before['conversion_rate']:.3f} | {after['conversion_rate']:.3f} |" in table
    assert table in capsys.readouterr().out
    assert (run_dir / "plots" / "eval_before_after.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["rollout.group_size=1"], "group_size must be >= 2"),
        (["rollout.carry_max_staleness=-1"], "carry_max_staleness must be >= 0"),
        (["env.name=sales-act"], "env.name must be one of"),
        (["rollout.groups_per_step=0"], "groups_per_step must be >= 1"),
        (["model.hiden_size=8"], "did you mean 'model.hidden_size'"),
        (["rollout.oversample_groups=2"], "oversample_groups needs env.name=sales and rollout.driver=async"),
    ],
)
def test_bad_configs_are_rejected_by_load_config(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ACTS_CONFIG, overrides)


def test_the_twin_refuses_an_llm_customer():
    with pytest.raises(ConfigError, match=r"env\.name=sales-acts runs the scripted customer only"):
        load_config(ACTS_CONFIG, ["env.customer=llm", "env.customer_model=x"])
