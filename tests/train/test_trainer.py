"""The LLM trainer end to end on a tiny random model: outputs, resume after SIGKILL, config errors."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from duca_fast.train import checkpoint as checkpoint_module
from duca_fast.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, save_checkpoint
from duca_fast.train.config import load_config
from duca_fast.train.trainer import ScenarioCursor, Trainer, micro_batches

ROOT = Path(__file__).resolve().parents[2]
# Wall-clock and throughput numbers differ between runs, and the engine's push counter restarts with the
# process (a resumed run pushes its checkpoint once at start); everything else must match exactly.
VOLATILE = ("time/", "tokens_per_s", "rollout/generated_tokens_per_s", "sync/seconds", "sync/weight_version")


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


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("model_cache")


@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_two_step_run_writes_everything(tmp_path, cache_dir, engine):
    run_dir = tmp_path / "run"
    result = cli("train", "--config", "configs/demo.yaml", *tiny_overrides(run_dir, cache_dir, engine))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for key in (
        "reward/turn/compliance",
        "reward/turn/repetition",
        "reward/session/conversion",
        "advantage/turn_horizon/std",
        "advantage/session_horizon/std",
        "task/conversion_rate",
        "task/repetition_rate",
        "task/identity_detection_rate",
        "task/compliance_violation_rate",
        "loss/total",
        "loss/clip_frac",
        "loss/entropy",
        "loss/approx_kl",
        "grad_norm",
        "sync/logprob_gap",
        "time/rollout",
        "time/advantage",
        "time/train",
        "time/sync",
        "tokens_per_s",
    ):
        assert key in rows[-1], key
    # The engine serves what the trainer computes: same log-probs for the sampled tokens.
    assert rows[0]["sync/logprob_gap"] < 1e-3
    assert rows[-1]["sync/weight_version"] == 2
    assert (run_dir / "config.yaml").read_text().count("engine: " + engine) == 1
    assert {p.name for p in (run_dir / "plots").glob("*.png")} >= {
        "rewards_per_horizon.png",
        "time_split.png",
    }
    assert list((run_dir / "events").iterdir())
    sample = json.loads((run_dir / "samples" / "step_2.jsonl").read_text().splitlines()[0])
    assert sample["messages"][0]["role"] == "system" and sample["turn_advantages"]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_1", "step_2"]
    assert (latest_checkpoint(run_dir) / "model" / "adapter_config.json").exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["algo.kl_coef=0.1", "algo.ppo_epochs=2", "algo.dual_clip=3.0", "algo.loss_agg=seq_mean_token_mean"],
        ["algo.name=grpo", "model.lora_rank=0", "algo.kl_coef=0.05", "algo.entropy_coef=0.01"],
        ["algo.name=gdpo", "algo.turn_scope=group_turn", "algo.scale=batch"],
    ],
    ids=["duca-kl-to-base-two-epochs", "grpo-full-finetune-kl-to-frozen-copy", "gdpo"],
)
def test_algorithm_and_loss_options_train(tmp_path, cache_dir, extra):
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, cache_dir, "hf", steps=1)
    result = cli("train", "--config", "configs/demo.yaml", *args, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_metrics(run_dir)
    assert row["grad_norm"] > 0 and abs(row["loss/total"]) < 1e3
    if any(e.startswith("algo.kl_coef") for e in extra):
        # KL to the reference: the base model (LoRA adapters off) or a frozen copy (full fine-tune).
        assert row["loss/kl_ref"] >= 0
    if "algo.name=grpo" in extra or "algo.name=gdpo" in extra:
        # One advantage per session: no turn-horizon statistics are logged.
        assert "advantage/turn_horizon/std" not in row and "advantage/session_horizon/std" in row


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, cache_dir):
    straight = tmp_path / "straight"
    result = cli(
        "train", "--config", "configs/demo.yaml", *tiny_overrides(straight, cache_dir, "hf", steps=4)
    )
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "duca_fast.cli",
            "train",
            "--config",
            "configs/demo.yaml",
            *tiny_overrides(killed, cache_dir, "hf", steps=4),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoints" / "step_2").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert latest_checkpoint(killed) is not None, "the run died before its first checkpoint"
    resumed_from = int(latest_checkpoint(killed).name.split("_")[1])
    assert resumed_from < 4, "the run finished before it could be killed; nothing was tested"

    result = cli(
        "train",
        "--config",
        "configs/demo.yaml",
        "--resume",
        *tiny_overrides(killed, cache_dir, "hf", steps=4),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [stable(r) for r in read_metrics(straight)]
    got = [stable(r) for r in read_metrics(killed)]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for want, have in zip(expected[resumed_from:], got[resumed_from:]):
        differing = {
            k: (want.get(k), have.get(k)) for k in want.keys() | have.keys() if want.get(k) != have.get(k)
        }
        assert not differing, f"step {want['step']} differs after resume: {differing}"


def test_micro_batch_size_does_not_change_the_update(tmp_path, cache_dir):
    config = load_config("configs/demo.yaml", tiny_overrides(tmp_path / "mb", cache_dir, "hf", steps=1))
    trainer = Trainer(config)
    try:
        from duca_fast.rollout import RolloutConfig, SamplingConfig, make_session_specs, rollout
        from duca_fast.train.algorithms import compute_advantages
        from duca_fast.train.trainer import env_factory

        specs = make_session_specs(trainer.scenarios[:2], 2, seed=3)
        batch = rollout(
            trainer.engine,
            env_factory(config),
            specs,
            RolloutConfig(sampling=SamplingConfig(max_new_tokens=8), max_turns=2, seed=1),
        )
        adv = compute_advantages(
            config.algo,
            turn_rewards=batch.turn_rewards,
            turn_session=batch.turn_session,
            turn_index=batch.turn_index,
            session_rewards=batch.session_rewards,
            session_group=batch.session_group,
            turn_reward_names=batch.turn_reward_names,
            session_reward_names=batch.session_reward_names,
            token_turn=batch.token_turn,
        )
        start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        after = {}
        for agg in ("token_mean", "seq_mean_token_mean"):
            for budget in (10_000, 40):
                trainer.model.load_state_dict(start)
                trainer.optimizer = torch.optim.SGD(
                    [p for p in trainer.model.parameters() if p.requires_grad], lr=1.0
                )
                config.optim.micro_batch_tokens = budget
                config.algo.loss_agg = agg
                metrics = trainer.update(batch, adv.per_token)
                assert metrics["grad_norm"] > 0
                after[agg, budget] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            for name in start:
                torch.testing.assert_close(
                    after[agg, 40][name], after[agg, 10_000][name], rtol=1e-4, atol=1e-6
                )
    finally:
        trainer.close()


def test_micro_batches_and_cursor():
    bounds = torch.tensor([0, 5, 5, 12, 30, 31])
    batches = micro_batches(bounds, budget=12)
    assert [(b.rows.start, b.rows.stop, b.num_sessions) for b in batches] == [
        (0, 12, 3),
        (12, 30, 1),
        (30, 31, 1),
    ]
    cursor = ScenarioCursor(pool_size=5, seed=1)
    first = cursor.take(3) + cursor.take(3)
    assert sorted(first[:5]) == [0, 1, 2, 3, 4] and cursor.state() == {"epoch": 1, "position": 1}
    again = ScenarioCursor(pool_size=5, seed=1)
    assert again.take(6) == first


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=None, data_cursor={}, keep=3)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full)
    with pytest.raises(CheckpointError, match=r"No space left on device.*earlier checkpoints are intact"):
        save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=None, data_cursor={}, keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_1"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["optim.lrr=1e-4"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
        (["optim.lr=-1"], "optim.lr must be a positive number"),
        (["rollout.group_size=1"], "rollout.group_size must be >= 2 for duca"),
        (["env.max_turns=0"], "env.max_turns must be >= 1"),
        (["model.path=/no/such/model"], "model.path '/no/such/model' is not a directory"),
        (["steps=many"], "invalid value for 'steps'"),
    ],
)
def test_config_errors_exit_nonzero_with_a_clear_message(args, message):
    result = cli("train", "--config", "configs/demo.yaml", *args, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr


def test_resume_without_checkpoint_and_missing_config_file(tmp_path):
    result = cli("train", "--config", "configs/demo.yaml", "--resume", f"run_dir={tmp_path}", timeout=120)
    assert result.returncode == 2 and "no complete checkpoint" in result.stderr
    result = cli("train", "--config", str(tmp_path / "nope.yaml"), timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr
