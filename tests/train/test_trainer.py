"""The LLM sales task through the training loop on a tiny random model: outputs, options, micro-batching."""

import errno
import itertools
import json
import math
import shutil
from dataclasses import replace

import pytest
import torch

from duca_fast.train import checkpoint as checkpoint_module
from duca_fast.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, save_checkpoint
from duca_fast.train.config import load_config
from duca_fast.train.loop import Trainer
from duca_fast.train.task import ScenarioCursor, TwoHorizonRewards
from duca_fast.train.tasks.sales import SalesRollout, env_factory, micro_batches

from .runs import cli, read_metrics, stable, tiny_overrides


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("model_cache")


@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_two_step_run_writes_everything(tmp_path, cache_dir, engine):
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, cache_dir, engine)
    result = cli("train", "--config", "configs/demo.yaml", *args, "progress=true")
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
        "rollout/generate_s",
        "rollout/customer_wait_s",
        "rollout/engine_idle_share",
        "rollout/sessions_in_flight",
        "rollout/wall_s",
        "rollout/rounds",  # the default driver
    ):
        assert key in rows[-1], key
    # vLLM says how much of each prompt its prefix cache served; the transformers engine does not.
    assert ("rollout/prefix_cache_hit_rate" in rows[-1]) == (engine == "vllm")
    # The engine serves what the trainer computes: same log-probs for the sampled tokens.
    assert rows[0]["sync/logprob_gap"] < 1e-3
    assert rows[-1]["sync/weight_version"] == 2
    assert (run_dir / "config.yaml").read_text().count("engine: " + engine) == 1
    assert {p.name for p in (run_dir / "plots").glob("*.png")} >= {
        "rewards_per_horizon.png",
        "time_split.png",
        "rollout.png",
    }
    assert list((run_dir / "events").iterdir())
    # A quiet console: what the run does comes first, the engine's lines go to logs/engine.log.
    assert (
        result.stdout.startswith("make demo: SmolLM2-135M-Instruct")
        and "sales / duca: 2 steps" in result.stdout
    )
    console = result.stdout + result.stderr
    assert "Reloading and processing weights" not in console and "INFO" not in console
    if engine == "vllm":
        assert "Reloading and processing weights" in (run_dir / "logs" / "engine.log").read_text()
    sample = json.loads((run_dir / "samples" / "step_2.jsonl").read_text().splitlines()[0])
    assert sample["messages"][0]["role"] == "system" and sample["turn_advantages"]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_1", "step_2"]
    assert (latest_checkpoint(run_dir) / "model" / "adapter_config.json").exists()


@pytest.mark.parametrize(
    "extra",
    [
        [
            "algo.loss.kl_coef=0.1",
            "algo.ppo_epochs=2",
            "algo.loss.dual_clip=3.0",
            "algo.loss.loss_agg=seq_mean_token_mean",
        ],
        ["algo.name=grpo", "model.lora_rank=0", "algo.loss.kl_coef=0.05", "algo.loss.entropy_coef=0.01"],
        ["algo.name=gdpo", "algo.advantage.turn_scope=group_turn", "algo.advantage.scale=batch"],
        ["algo.name=proxmo", "algo.proxmo.gamma=0.9"],
        ["algo.name=otb", "algo.ppo_epochs=2"],
    ],
    ids=[
        "duca-kl-to-base-two-epochs",
        "grpo-full-finetune-kl-to-frozen-copy",
        "gdpo",
        "proxmo-tfidf",
        "otb-per-token-two-epochs",
    ],
)
def test_algorithm_and_loss_options_train(tmp_path, cache_dir, extra):
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, cache_dir, "hf", steps=1)
    result = cli("train", "--config", "configs/demo.yaml", *args, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_metrics(run_dir)
    assert row["grad_norm"] > 0 and abs(row["loss/total"]) < 1e3
    if any(e.startswith("algo.loss.kl_coef") for e in extra):
        # KL to the reference: the base model (LoRA adapters off) or a frozen copy (full fine-tune).
        assert row["loss/kl_ref"] >= 0
    if "algo.name=otb" in extra:
        assert math.isfinite(row["advantage/otb_raw/std"])
    if "algo.name=grpo" in extra or "algo.name=gdpo" in extra:
        # One advantage per session: no turn-horizon statistics are logged.
        assert "advantage/turn_horizon/std" not in row and "advantage/session_horizon/std" in row


def test_micro_batch_size_does_not_change_the_update(tmp_path, cache_dir):
    config = load_config("configs/demo.yaml", tiny_overrides(tmp_path / "mb", cache_dir, "hf", steps=1))
    trainer = Trainer(config)
    task = trainer.task
    try:
        from duca_fast.rollout import RolloutConfig, SamplingConfig, make_session_specs, rollout
        from duca_fast.train.algorithms import compute_advantages

        specs = make_session_specs(trainer.scenarios[:2], 2, seed=3)
        batch = rollout(
            task.engine,
            env_factory(config),
            specs,
            RolloutConfig(sampling=SamplingConfig(max_new_tokens=8), max_turns=2, seed=1),
        )
        adv = compute_advantages(config.algo, **TwoHorizonRewards.of(batch).as_kwargs())
        start = {k: v.clone() for k, v in task.model.state_dict().items()}
        params = [p for p in task.model.parameters() if p.requires_grad]
        after = {}
        for agg in ("token_mean", "seq_mean_token_mean"):
            for budget in (10_000, 40):
                task.model.load_state_dict(start)
                config.optim.micro_batch_tokens = budget
                config.algo.loss = replace(config.algo.loss, loss_agg=agg)
                for p in params:
                    p.grad = None
                metrics = task.backward(task.prepare_update(SalesRollout(batch), adv.per_turn))
                assert metrics["train/loss_tokens"] > 0 and all(p.grad is not None for p in params)
                torch.optim.SGD(params, lr=1.0).step()
                after[agg, budget] = {k: v.clone() for k, v in task.model.state_dict().items()}
            for name in start:
                torch.testing.assert_close(
                    after[agg, 40][name], after[agg, 10_000][name], rtol=1e-4, atol=1e-6
                )
            assert any(not torch.equal(after[agg, 40][name], start[name]) for name in start)
    finally:
        trainer.close()


def test_otb_gives_every_agent_token_its_own_advantage_on_the_text_task(tmp_path, cache_dir):
    """otb's inputs are the policy's own log-prob and sum p^2 of each agent token (checked against full
    logits here), its per-token advantages reach the loss unchanged, and the rollout's log-probs are the
    old log-probs of the second epoch (what a fresh pass gives)."""
    from duca_fast.train.algorithms import compute_advantages

    overrides = tiny_overrides(tmp_path / "otb", cache_dir, "hf", steps=1)
    config = load_config("configs/demo.yaml", [*overrides, "algo.name=otb", "algo.ppo_epochs=2"])
    trainer = Trainer(config)
    task = trainer.task
    try:
        played = task.rollout(1, trainer.scenarios[: config.rollout.groups_per_step])
        batch, rewards = played.data.batch, played.rewards
        agent = batch.token_turn >= 0
        assert rewards.agent_token_turn.tolist() == batch.token_turn[agent].tolist()
        assert played.local_agent_tokens == slice(0, int(agent.sum()))
        bounds = batch.cu_seqlens.tolist()
        logprobs, sum_p2 = [], []
        with torch.no_grad():
            for start, stop in itertools.pairwise(bounds):
                ids = batch.input_ids[start:stop]
                logits = task.policy(input_ids=ids[None]).logits[0].float() / config.rollout.temperature
                log_p = torch.log_softmax(logits, -1)
                for q in range(1, stop - start):
                    if batch.token_turn[start + q] >= 0:
                        logprobs.append(log_p[q - 1, ids[q]])
                        sum_p2.append(log_p[q - 1].exp().square().sum())
        torch.testing.assert_close(rewards.agent_token_logprobs, torch.stack(logprobs), rtol=0, atol=2e-4)
        torch.testing.assert_close(rewards.agent_token_sum_p2, torch.stack(sum_p2), rtol=0, atol=2e-5)

        advantages = compute_advantages(config.algo, **rewards.as_kwargs())
        per_token = advantages.per_agent_token[played.local_agent_tokens]
        assert per_token.unique().numel() > len(rewards.turn_index)  # not one value per turn
        prepared = task.prepare_update(played.data, advantages.per_turn[played.local_turns], per_token)
        # Row p of the loss holds token p + 1's advantage.
        at_tokens = torch.roll(prepared.advantages, 1)
        assert torch.equal(at_tokens[agent], per_token.float())
        assert not at_tokens[~agent].any()
        torch.testing.assert_close(prepared.old_logprobs, task._policy_logprobs(batch, prepared.passes))
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
    assert sorted(first[:5]) == [0, 1, 2, 3, 4] and cursor.position == 6
    again = ScenarioCursor(pool_size=5, seed=1)
    assert again.take(6) == first
    resumed = ScenarioCursor(pool_size=5, seed=1, position=4)
    assert resumed.take(2) == first[4:6], "the position alone restores the order"
    assert (
        ScenarioCursor(pool_size=5, seed=2).take(5) != first[:5] or ScenarioCursor(5, 3).take(5) != first[:5]
    )


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


def test_a_reward_model_is_a_session_reward_component_of_training(tmp_path, cache_dir):
    from tests.env.test_reward_sources import tiny_reward_model

    model = tiny_reward_model(tmp_path / "rm", num_labels=1)
    run_dir = tmp_path / "run"
    sources = f"env.reward_sources=[{{name: rm, kind: model, horizon: session, path: {model}}}]"
    args = tiny_overrides(run_dir, cache_dir, "hf", steps=1)
    result = cli(
        "train", "--config", "configs/demo.yaml", *args, sources, "algo.session_component_weights={rm: 0.5}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_metrics(run_dir)
    assert math.isfinite(row["reward/session/rm"]) and row["grad_norm"] > 0


def test_over_sampling_trains_on_the_first_complete_groups(tmp_path, cache_dir):
    """rollout.oversample_groups=1: three groups start, the first two to complete train, the third's two
    sessions are aborted; the metrics say so and the step's advantages cover the kept sessions only."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, cache_dir, "vllm")
    over = ("rollout.oversample_groups=1", "rollout.driver=async")
    result = cli("train", "--config", "configs/demo.yaml", *args, *over)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert len(rows) == 2
    for row in rows:
        assert row["rollout/aborted_sessions"] == 2.0 and row["rollout/engine_steps"] > 0
        assert row["rollout/preemptions"] == 0.0  # vLLM's scheduler had room for every request
        assert math.isfinite(row["loss/total"])
    refused = cli(
        "train",
        "--config",
        "configs/demo.yaml",
        *args,
        "rollout.oversample_groups=1",
        "rollout.driver=rounds",
    )
    assert refused.returncode != 0 and "oversample_groups needs env.name=sales and rollout.driver=async" in (
        refused.stdout + refused.stderr
    )


def test_carry_over_finishes_the_left_groups_next_step_and_resumes_exactly(tmp_path, cache_dir):
    """rollout.carry_over: the group over-sampling leaves is suspended and finished in the next step (its
    earlier turns one weight version old); the next step draws one new scenario fewer. The run resumed from
    its step-2 checkpoint (the carried sessions' customers replayed) gives step 3 exactly as it did."""
    carry = ("rollout.oversample_groups=1", "rollout.driver=async", "rollout.carry_over=true",
             "algo.loss.tis_cap=2.0", "env.max_turns=3")  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"

    def train(run_dir, steps: int, *flags: str):
        args = tiny_overrides(run_dir, cache_dir, "vllm", steps)
        return cli("train", "--config", "configs/demo.yaml", *flags, *args, *carry)

    result = train(straight, 3)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(straight)
    assert [row["rollout/carried_sessions"] for row in rows] == [2.0, 2.0, 2.0]
    assert [row["rollout/resumed_sessions"] for row in rows] == [0.0, 2.0, 2.0]
    assert all(row["rollout/aborted_sessions"] == 0.0 and math.isfinite(row["loss/total"]) for row in rows)
    assert rows[0]["rollout/max_staleness"] == 0.0
    # A carried session has played at least its first turn by the time two other groups have played all.
    for row in rows[1:]:
        assert row["rollout/max_staleness"] == 1.0 and row["rollout/stale_turn_share"] > 0
    checkpoints = straight / "checkpoints"
    cursors = [json.loads((checkpoints / f"step_{s}" / "cursor.json").read_text()) for s in (1, 2)]
    # 3 groups started per step: step 1 draws 3 scenarios, later steps 2 (the carried group is the third).
    assert [c["scenario_position"] for c in cursors] == [3, 5]
    assert all(len(c["carried"]) == 1 and len(c["carried"][0]) == 2 for c in cursors)

    # The run as if stopped after step 2: its directory without the last checkpoint.
    shutil.copytree(straight, stopped)
    shutil.rmtree(stopped / "checkpoints" / "step_3")
    resumed = train(stopped, 3, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [stable(row) for row in read_metrics(stopped)] == [stable(row) for row in rows]
    refused = cli("train", "--config", "configs/demo.yaml", *tiny_overrides(stopped, cache_dir, "vllm", 1),
                  "rollout.carry_over=true")  # fmt: skip
    assert refused.returncode != 0 and "rollout.carry_over needs rollout.oversample_groups > 0" in (
        refused.stdout + refused.stderr
    )


def test_dynamo_allocation_on_the_text_task(tmp_path, cache_dir):
    """rollout.allocation=dynamo on the sales task: a pilot of 2 sessions per scenario, then the rest of 3 per
    scenario on average within [2, 4]; every step trains on all of them (6 sessions over 2 groups)."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, cache_dir, "hf")
    dynamo = ("rollout.allocation=dynamo", "rollout.group_size=3", "rollout.allocation_min=2",
              "rollout.allocation_max=4")  # fmt: skip
    result = cli("train", "--config", "configs/demo.yaml", *args, *dynamo)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in read_metrics(run_dir):
        assert 2 <= row["rollout/group_size_min"] <= 3 <= row["rollout/group_size_max"] <= 4
        assert row["rollout/group_size_min"] + row["rollout/group_size_max"] == 6
        assert math.isfinite(row["loss/total"])
