"""ppo_gae on the LLM sales task (a value head on the tiny random policy) and its sampled evaluation."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from duca_fast.train.algorithms import critic_targets
from duca_fast.train.checkpoint import latest_checkpoint, load_checkpoint
from duca_fast.train.config import AlgoConfig, ConfigError, load_config
from duca_fast.train.distributed import DistContext
from duca_fast.train.loop import (
    Trainer,
    build_task,
    held_out_sessions,
    scenario_pool,
    seed_everything,
    train,
)
from duca_fast.train.task import TwoHorizonRewards
from duca_fast.train.tasks.sales import SalesRollout, SalesTask, unwrap, value_positions

from .runs import ROOT, read_metrics, stable, tiny_overrides


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("critic_model_cache")


def ppo_config(run_dir, cache, *extra: str, steps: int = 2):
    overrides = [*tiny_overrides(run_dir, cache, "hf", steps=steps), "algo.name=ppo_gae", *extra]
    return load_config(ROOT / "configs" / "demo.yaml", overrides)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, cache_dir):
    trainer = Trainer(ppo_config(tmp_path_factory.mktemp("critic") / "run", cache_dir))
    yield trainer
    trainer.close()


def rollout(trainer: Trainer, step: int):
    return trainer.task.rollout(step, trainer.scenarios[:2])


def test_ppo_gae_is_refused_under_torchrun(tmp_path, cache_dir):
    config = ppo_config(tmp_path / "run", cache_dir)
    with pytest.raises(ConfigError, match="trains on a single process"):
        SalesTask(config, DistContext(rank=0, world_size=2))


def test_values_are_read_at_each_turns_last_prompt_token(trainer):
    task = trainer.task
    played = rollout(trainer, 1)
    batch, values = played.data.batch, played.rewards.values
    assert values is played.data.values and values.shape == (batch.turn_spans.shape[0],) and len(values)
    positions = value_positions(batch)
    tokenizer = task.engine.tokenizer
    base = unwrap(task.policy)
    with torch.no_grad():
        for turn, position in enumerate(positions.tolist()):
            session = int(batch.turn_session[turn])
            start = int(batch.cu_seqlens[session])
            # The prompt's last token: no loss itself, it predicts the turn's first sampled token.
            assert batch.token_turn[position] == -1 and batch.token_turn[position + 1] == turn
            prompt = tokenizer.decode(batch.input_ids[start : position + 1].tolist())
            assert prompt.endswith("<|im_start|>assistant\n"), prompt[-60:]
            # Recomputed on this session alone, from the decoder's output at that token.
            hidden = base.get_decoder()(input_ids=batch.input_ids[start : position + 1][None])
            expected = task.objective.critic(hidden.last_hidden_state[0, -1:].float())
            torch.testing.assert_close(values[turn : turn + 1], expected, rtol=1e-4, atol=1e-5)


def test_critic_targets_end_with_the_last_turns_reward(trainer):
    played = rollout(trainer, 2)
    batch = played.data.batch
    prepared = trainer.task.prepare_update(played.data, torch.zeros(len(played.rewards.values)))
    returns = prepared.returns
    assert returns.shape == played.rewards.values.shape
    finite = batch.session_rewards.isfinite().all(dim=1)
    assert bool(finite.any()), "no session of the rollout ended: nothing to check"
    for turn, session in enumerate(batch.turn_session.tolist()):
        if not finite[session]:
            assert math.isnan(returns[turn]), "a dropped session's turn must get no critic target"
            continue
        turns = int((batch.turn_session == session).sum())
        if int(batch.turn_index[turn]) == turns - 1:
            # gamma = 1 and no value after the last turn: G = rho = mean-share turn reward + session reward.
            rho = batch.turn_rewards[turn].sum() / turns + batch.session_rewards[session].sum()
            assert float(returns[turn]) == pytest.approx(float(rho), abs=1e-5)


def test_critic_targets_by_hand_and_none_for_a_dropped_session():
    # Session 0: r = -1, -1, R = 0.4, V = 0.5, 0.2; session 1 was cut (NaN session reward).
    rewards = TwoHorizonRewards(
        turn_rewards=torch.tensor([[-1.0], [-1.0], [-1.5]]),
        turn_session=torch.tensor([0, 0, 1]),
        turn_index=torch.tensor([0, 1, 0]),
        session_rewards=torch.tensor([[0.4], [math.nan]]),
        session_group=torch.tensor([0, 0]),
        turn_reward_names=("compliance",),
        session_reward_names=("conversion",),
        values=torch.tensor([0.5, 0.2, 0.7]),
    )
    # rho = -1/2, -1/2 + 0.4; delta_1 = -0.1 - 0.2 = -0.3 = A_1, G_1 = -0.1;
    # delta_0 = -0.5 + 0.2 - 0.5 = -0.8, A_0 = -0.8 + 0.95 * -0.3 = -1.085, G_0 = -0.585.
    got = critic_targets(AlgoConfig(name="ppo_gae"), rewards)
    assert got[:2].tolist() == pytest.approx([-0.585, -0.1], abs=1e-6) and math.isnan(got[2])
    with pytest.raises(ValueError, match=r"rewards\.values"):
        critic_targets(AlgoConfig(name="ppo_gae"), dataclasses.replace(rewards, values=None))


def test_critic_loss_falls_on_a_fixed_batch_and_reaches_the_trunk(trainer):
    task = trainer.task
    played = rollout(trainer, 3)
    # Zero advantages: the policy-gradient term is 0, so every LoRA gradient comes from the critic loss.
    prepared = task.prepare_update(played.data, torch.zeros(len(played.rewards.values)))
    # Targets a unit away from the first values: a fall of the loss is then the head learning, not noise.
    prepared.returns = prepared.returns + 1.0
    lora = [p for n, p in task.model.named_parameters() if "lora_B" in n]
    critic = list(task.objective.critic.parameters())
    assert {id(p) for p in critic} <= {id(p) for p in trainer.params}
    # Adam at a small step: the tests' lr (1e-2) overshoots on the tiny trunk and the loss jumps around.
    optimizer = torch.optim.Adam(trainer.params, lr=2e-3)
    losses = []
    for _ in range(10):
        optimizer.zero_grad(set_to_none=True)
        metrics = task.backward(prepared)
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic)
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
        # No policy-gradient, entropy or KL term: the step's loss is value_coef x the critic loss.
        assert metrics["loss/total"] == pytest.approx(0.5 * metrics["value/loss"], rel=1e-5)
        losses.append(metrics["value/loss"])
        optimizer.step()
    assert all(b < a for a, b in itertools.pairwise(losses)) and losses[-1] < 0.1 * losses[0], losses


def test_micro_batch_size_does_not_change_the_critic_loss_or_its_gradients(trainer):
    task, config = trainer.task, trainer.config
    played = rollout(trainer, 5)
    budget = config.optim.micro_batch_tokens
    results = []
    try:
        for tokens in (10_000, 40):
            config.optim.micro_batch_tokens = tokens
            prepared = task.prepare_update(played.data, played.rewards.values * 0 + 1)
            trainer.optimizer.zero_grad(set_to_none=True)
            metrics = task.backward(prepared)
            grads = [p.grad.clone() for p in task.objective.critic.parameters()]
            results.append((len(prepared.passes), metrics, grads))
    finally:
        config.optim.micro_batch_tokens = budget
    (one, whole, whole_grads), (many, split, split_grads) = results
    assert one == 1 and many > 1
    for key in ("loss/total", "value/loss", "value/mean", "value/explained_variance"):
        assert split[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(whole_grads, split_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_value_head_round_trips_through_the_checkpoint(trainer):
    trainer.step(4)
    path = trainer.checkpoint(4)
    trained = {n: p.detach().clone() for n, p in trainer.task.model.named_parameters() if p.requires_grad}
    assert any(n.startswith("critic.") for n in trained) and any("lora_A" in n for n in trained)
    seed_everything(trainer.config.seed)
    fresh = build_task(trainer.config, DistContext())
    try:
        initial = dict(fresh.model.named_parameters())
        assert not all(torch.equal(initial[n], trained[n]) for n in trained if n.startswith("critic."))
        load_checkpoint(path, fresh.model)
        for name, value in trained.items():
            assert torch.equal(dict(fresh.model.named_parameters())[name], value), name
    finally:
        fresh.close()


def test_every_algorithm_starts_from_the_same_policy_for_a_seed(tmp_path, cache_dir):
    weights = []
    for algo in ("grpo", "ppo_gae"):
        config = ppo_config(tmp_path / algo, cache_dir, f"algo.name={algo}")
        seed_everything(config.seed)
        task = build_task(config, DistContext())
        try:
            weights.append({n: p.detach().clone() for n, p in task.policy.named_parameters()})
            weights[-1]["next draw"] = torch.rand(4)
        finally:
            task.close()
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_a_short_run_trains_and_resumes_exactly(tmp_path, cache_dir):
    straight = train(ppo_config(tmp_path / "straight", cache_dir, steps=3))
    cut = tmp_path / "cut"
    train(ppo_config(cut, cache_dir, steps=2))
    assert latest_checkpoint(cut).name == "step_2"
    train(ppo_config(cut, cache_dir, steps=3), resume=True)
    expected, got = read_metrics(straight), read_metrics(cut)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert all(math.isfinite(r["value/loss"]) and "advantage/gae_raw/mean" in r for r in expected)
    assert [stable(r) for r in got] == [stable(r) for r in expected]


def test_full_finetune_with_two_epochs_and_kl_trains_the_head(tmp_path, cache_dir):
    # Every weight trainable, old log-probs recomputed for the second epoch, KL to a frozen copy.
    extra = ("model.lora_rank=0", "algo.ppo_epochs=2", "algo.loss.kl_coef=0.05")
    run_dir = train(ppo_config(tmp_path / "full", cache_dir, *extra, steps=1))
    (row,) = read_metrics(run_dir)
    assert row["value/loss"] > 0 and row["grad_norm"] > 0 and row["loss/kl_ref"] >= 0
    assert math.isfinite(row["loss/total"]) and math.isfinite(row["value/explained_variance"])


def test_sampled_evaluation_samples_at_the_rollout_temperature_from_its_seed(trainer):
    task, config = trainer.task, trainer.config
    scenarios, customers = held_out_sessions(config, 3, seed=5)
    calls = []
    generate = task.engine.generate

    def recording(prompts, sampling, seeds, **kwargs):
        calls.append((sampling.temperature, tuple(seeds)))
        return generate(prompts, sampling, seeds, **kwargs)

    task.engine.generate = recording
    try:
        greedy = task.evaluate(scenarios, customers)
        assert {t for t, _ in calls} == {0.0}
        calls.clear()
        first = task.evaluate(scenarios, customers, sample_seed=7)
        assert {t for t, _ in calls} == {config.rollout.temperature}
        seeds_7 = [s for _, s in calls]
        calls.clear()
        again = task.evaluate(scenarios, customers, sample_seed=7)
        assert [s for _, s in calls] == seeds_7
        calls.clear()
        task.evaluate(scenarios, customers, sample_seed=8)
        assert [s for _, s in calls] != seeds_7
    finally:
        task.engine.generate = generate
    assert torch.equal(first.turn_rewards, again.turn_rewards) and first.outcomes == again.outcomes
    assert greedy.session_rewards.shape == first.session_rewards.shape and len(first.session_rewards) == 3


def test_sales_rollout_without_a_critic_has_no_values(tmp_path, cache_dir):
    config = ppo_config(tmp_path / "run", cache_dir, "algo.name=duca")
    seed_everything(config.seed)
    task = build_task(config, DistContext())
    try:
        assert task.model is task.policy and task.objective.critic is None
        played = task.rollout(1, scenario_pool(config)[:1])
        assert isinstance(played.data, SalesRollout) and played.data.values is None
        assert played.rewards.values is None
    finally:
        task.close()
