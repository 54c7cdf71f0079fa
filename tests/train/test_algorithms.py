"""compute_advantages dispatch of every algorithm on hand-computed batches; config keys; one short twin
training run per algorithm."""

from __future__ import annotations

import json
import math

import pytest
import torch

from duca_fast import ops
from duca_fast.train.algorithms import ESTIMATORS, compute_advantages
from duca_fast.train.config import ALGORITHMS, AlgoConfig, ConfigError, load_config
from duca_fast.train.loop import Trainer, train

from .acts_configs import ACTS_CONFIG, tiny_acts_config

R = 1 / math.sqrt(2)
"""Group-normalized value of the larger of two members: (x - mean) / std_unbiased = +1/sqrt(2)."""


def batch(session_reward0: float = 0.4) -> dict:
    """One group of two sessions: session 0 has turns r = -1, -1 and R = ``session_reward0``; session 1
    has one turn r = -1.5 and R = 0."""
    return dict(
        turn_rewards=torch.tensor([[-1.0], [-1.0], [-1.5]]),
        turn_session=torch.tensor([0, 0, 1]),
        turn_index=torch.tensor([0, 1, 0]),
        session_rewards=torch.tensor([[session_reward0], [0.0]]),
        session_group=torch.tensor([0, 0]),
        turn_reward_names=("compliance",),
        session_reward_names=("conversion",),
    )


def advantages(name: str, **options) -> list[float]:
    algo = AlgoConfig(name=name, **options)
    return compute_advantages(algo, **batch()).per_turn.tolist()


def test_grpo_turn_agg_mean_and_sum_disagree_on_the_sign():
    # mean: X0 = 0.4 - 1 = -0.6 > X1 = -1.5; sum: X0 = 0.4 - 2 = -1.6 < X1 = -1.5.
    assert advantages("grpo", turn_agg="mean") == pytest.approx([R, R, -R], abs=1e-4)
    assert advantages("grpo", turn_agg="sum") == pytest.approx([-R, -R, R], abs=1e-4)


def test_session_only_ignores_turn_rewards():
    assert advantages("session_only") == pytest.approx([R, R, -R], abs=1e-4)
    algo = AlgoConfig(name="session_only")
    flipped = compute_advantages(algo, **{**batch(), "turn_rewards": torch.tensor([[9.0], [9.0], [-9.0]])})
    assert flipped.per_turn.tolist() == pytest.approx([R, R, -R], abs=1e-4)


def test_mt_grpo_adds_per_position_turn_advantages_times_lambda():
    # outcome: +R for session 0, -R for session 1; position 0: r -1 vs -1.5 -> +R / -R; position 1 alone: 0.
    assert advantages("mt_grpo") == pytest.approx([2 * R, R, -2 * R], abs=1e-4)
    assert advantages("mt_grpo", mt_grpo_lambda=0.5) == pytest.approx([1.5 * R, R, -1.5 * R], abs=1e-4)


def test_gopo_ranks_the_grpo_score_within_the_group():
    # Same scores as grpo: mean -> X0 = -0.6 beats X1 = -1.5 (A = +2 / -2); sum -> X0 = -1.6 loses.
    assert advantages("gopo", turn_agg="mean") == pytest.approx([2.0, 2.0, -2.0])
    assert advantages("gopo", turn_agg="sum") == pytest.approx([-2.0, -2.0, 2.0])
    # A session with a NaN session reward is not ranked: its group then has one member, advantage 0.
    dropped = compute_advantages(
        AlgoConfig(name="gopo"), **{**batch(), "session_rewards": torch.tensor([[float("nan")], [0.0]])}
    )
    assert dropped.per_turn.tolist() == [0.0, 0.0, 0.0]


def test_gdpo_normalizes_each_component_then_the_batch():
    # Three sessions, one group: turn means -1, -1.5, -0.5 (normalized: 0, -1, +1); session rewards 1, 0, 0
    # (normalized: 2/sqrt(3) * (1, -0.5, -0.5)); sum, then batch-normalized.
    kwargs = dict(
        turn_rewards=torch.tensor([[-1.0], [-1.0], [-1.5], [-0.5]]),
        turn_session=torch.tensor([0, 0, 1, 2]),
        turn_index=torch.tensor([0, 1, 0, 0]),
        session_rewards=torch.tensor([[1.0], [0.0], [0.0]]),
        session_group=torch.tensor([0, 0, 0]),
        turn_reward_names=("compliance",),
        session_reward_names=("conversion",),
    )
    c = 1 / math.sqrt(3)
    summed = torch.tensor([0 + 2 * c, -1 - c, 1 - c], dtype=torch.float64)
    expected = (summed - summed.mean()) / summed.std()
    got = compute_advantages(AlgoConfig(name="gdpo"), **kwargs).per_turn
    assert got.tolist() == pytest.approx(expected[[0, 0, 1, 2]].tolist(), abs=1e-4)


def test_ppo_gae_uses_the_critic_values_and_normalizes_over_the_batch():
    algo = AlgoConfig(name="ppo_gae")
    algo.critic.lam = 1.0
    # Per-turn rewards (mean agg): session 0: -1/2, -1/2 + 0.4; session 1: -1.5 + 0. With V = 0, gamma =
    # lam = 1 the advantage is the return to go: -0.6, -0.1, -1.5.
    raw = torch.tensor([-0.6, -0.1, -1.5], dtype=torch.float64)
    got = compute_advantages(algo, **batch(), values=torch.zeros(3))
    assert got.per_turn.tolist() == pytest.approx(((raw - raw.mean()) / raw.std()).tolist(), abs=1e-4)
    assert got.metrics["advantage/gae_raw/mean"] == pytest.approx(raw.mean().item(), abs=1e-6)
    # A critic that predicts the returns exactly leaves nothing to learn.
    exact = compute_advantages(algo, **batch(), values=raw.float())
    assert exact.metrics["advantage/gae_raw/abs_max"] < 1e-6
    with pytest.raises(ValueError, match="needs values"):
        compute_advantages(algo, **batch())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algo.turn_agg=median", "algo.turn_agg"),
        ("algo.critic.lam=1.5", "algo.critic.lam"),
        ("env.regime=nope", "env.regime"),
        ("env.regime_knobs.session_scal=3", "session_scal"),
        ("algo.mt_grpo_lambda=-1", "mt_grpo_lambda"),
    ],
)
def test_bad_algo_and_regime_keys_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ACTS_CONFIG, [override])


def test_ppo_gae_configures_for_both_tasks():
    # The LLM task has a value head too (tests/train/test_sales_critic.py).
    assert load_config(None, ["algo.name=ppo_gae"]).env.name == "sales"
    assert load_config(ACTS_CONFIG, ["algo.name=ppo_gae"]).algo.name == "ppo_gae"


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_each_algorithm_trains_on_the_paper_twin(tmp_path, algo):
    config = tiny_acts_config(
        tmp_path, f"algo.name={algo}", "env.regime=paper", "env.regime_knobs.session_scale=3"
    )
    run_dir = train(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["loss/total"]) for row in rows)
    if algo == "ppo_gae":
        assert all(math.isfinite(row["value/loss"]) for row in rows)


def test_ppo_gae_value_head_is_part_of_the_model_and_learns(tmp_path):
    config = tiny_acts_config(tmp_path, "algo.name=ppo_gae", "env.regime=paper")
    trainer = Trainer(config)
    try:
        critic = trainer.task.model.critic
        # The paper regime hides the latent state: the value head reads the smaller observation.
        assert critic.observation_size == trainer.task.model.torso[0].in_features
        assert {id(p) for p in critic.parameters()} <= {id(p) for p in trainer.params}
        before = [p.detach().clone() for p in critic.parameters()]
        metrics = trainer.step(1)
        assert metrics["value/loss"] > 0
        assert any(not torch.equal(b, p) for b, p in zip(before, critic.parameters()))
    finally:
        trainer.close()


def test_every_algorithm_starts_from_the_same_policy_for_a_seed(tmp_path):
    from duca_fast.train.distributed import DistContext
    from duca_fast.train.loop import build_task, seed_everything

    weights = []
    for algo in ("grpo", "ppo_gae"):
        config = tiny_acts_config(tmp_path / algo, f"algo.name={algo}")
        seed_everything(config.seed)
        model = build_task(config, DistContext()).model
        weights.append(torch.cat([p.flatten() for n, p in model.named_parameters() if "critic" not in n]))
    assert torch.equal(weights[0], weights[1])


def test_session_level_estimators_log_their_per_session_advantages():
    for name in ("grpo", "gdpo", "session_only"):
        metrics = compute_advantages(AlgoConfig(name=name), **batch()).metrics
        assert metrics["advantage/session_horizon/abs_max"] == pytest.approx(R, abs=1e-4)
        assert "advantage/turn_horizon/std" not in metrics


def test_the_estimator_table_is_the_list_of_algorithms():
    assert tuple(ESTIMATORS) == ALGORITHMS
    assert {"duca", "dual_track", "proxmo", "gopo", "otb"} <= set(ALGORITHMS)
    assert not ESTIMATORS["ppo_gae"].grouped and ESTIMATORS["ppo_gae"].needs == ("values",)


def test_dual_track_is_duca_with_population_std_and_a_clamp():
    # Population stds: turns (-1, -1, -1.5) give z = (1/sqrt 2, 1/sqrt 2, -sqrt 2); sessions (0.4, 0) +-1.
    z = 1 / math.sqrt(2)
    assert advantages("dual_track") == pytest.approx([z + 1, z + 1, -2 * z - 1], abs=1e-4)  # eps 1e-6
    algo = AlgoConfig(name="dual_track", dual_track_clip=0.5)
    got = compute_advantages(algo, **batch()).per_turn
    expected = ops.hian_advantages(
        batch()["turn_rewards"],
        batch()["turn_session"],
        batch()["session_rewards"],
        batch()["session_group"],
        std="population",
        clip=0.5,
        nan_policy="omit",
    )
    torch.testing.assert_close(got, expected)
    # Every |z| above is > 0.5: each horizon clamps to +-0.5.
    assert got.tolist() == pytest.approx([1.0, 1.0, -1.0], abs=1e-5)


def test_proxmo_and_otb_need_their_inputs_and_match_the_ops():
    with pytest.raises(ValueError, match=r"algo\.name=proxmo needs turn_features"):
        advantages("proxmo")
    with pytest.raises(ValueError, match=r"algo\.name=otb needs turn_logprobs"):
        advantages("otb")
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    algo = AlgoConfig(name="proxmo")
    got = compute_advantages(algo, **batch(), turn_features=features).per_turn
    expected = ops.proxmo_advantages(
        batch()["turn_rewards"],
        batch()["turn_session"],
        batch()["session_rewards"],
        batch()["session_group"],
        features,
        options=algo.proxmo,
        turn_index=batch()["turn_index"],
    )
    torch.testing.assert_close(got, expected)

    # otb by hand, one token per turn: session 0 tokens r = -1, -1 + 0.4; session 1 token r = -1.5 + 0.
    # Returns G: session 0 (-1.6, -0.6), session 1 (-1.5). Path weights W_t = sum_{j<=t} (1 - 2p_j + s_j).
    logprobs = torch.log(torch.tensor([0.5, 0.25, 0.8]))
    sum_p2 = torch.tensor([0.3, 0.4, 0.7])
    w = [1 - 1.0 + 0.3, (1 - 1.0 + 0.3) + (1 - 0.5 + 0.4), 1 - 1.6 + 0.7]
    baseline0 = (-1.6 * w[0] + -1.5 * w[2]) / (w[0] + w[2] + 1e-8)
    # Position 1: only session 0 has a token there: with handle_zero_tail its baseline is 0.
    expected = [-1.6 - baseline0, -0.6 - 0.0, -1.5 - baseline0]
    got = compute_advantages(AlgoConfig(name="otb"), **batch(), turn_logprobs=logprobs, turn_sum_p2=sum_p2)
    assert got.per_turn.tolist() == pytest.approx(expected, abs=1e-5)


def test_otb_per_agent_token_matches_the_loop_reference():
    """The text task's form: every agent token its own advantage (verl's multi-turn OTB over the agent's
    tokens), the turn reward on a turn's last token and the session reward added on the session's last;
    tokens may come in any session order; a dropped session's tokens get 0."""
    from duca_fast.ops.advantages.reference import reference_optimal_token_baseline

    rewards = dict(
        turn_rewards=torch.tensor([[-1.0], [-0.5], [-1.5], [0.2], [0.7]]),
        turn_session=torch.tensor([0, 0, 1, 2, 3]),
        turn_index=torch.tensor([0, 1, 0, 0, 0]),
        session_rewards=torch.tensor([[0.4], [0.0], [1.0], [float("nan")]]),
        session_group=torch.tensor([0, 0, 1, 1]),
        turn_reward_names=("compliance",),
        session_reward_names=("conversion",),
    )
    # Packed order: session 1's turn first, then session 0's two turns, then sessions 2 and 3.
    token_turn = torch.tensor([2, 2, 2, 2, 0, 0, 0, 1, 1, 3, 3, 4, 4])
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(13, generator=generator, dtype=torch.float64) * 3
    sum_p2 = torch.rand(13, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    algo = AlgoConfig(name="otb", advantage=ops.AdvantageOptions(turn_weight=0.5))
    got = compute_advantages(
        algo,
        **rewards,
        agent_token_turn=token_turn,
        agent_token_logprobs=logprobs.float(),
        agent_token_sum_p2=sum_p2.float(),
    )
    # The reference in session order: session 0 (tokens 4..8), 1 (0..3), 2 (9, 10), 3 (11, 12).
    order = [4, 5, 6, 7, 8, 0, 1, 2, 3, 9, 10, 11, 12]
    sessions = [0] * 5 + [1] * 4 + [2] * 2 + [3] * 2
    token_rewards = [0.0] * 13
    token_rewards[2], token_rewards[4] = 0.5 * -1.0, 0.5 * -0.5 + 0.4  # session 0: turns 0, 1
    token_rewards[8] = 0.5 * -1.5 + 0.0  # session 1
    token_rewards[10] = 0.5 * 0.2 + 1.0  # session 2
    expected, _ = reference_optimal_token_baseline(
        torch.tensor(token_rewards, dtype=torch.float64),
        logprobs.float().double()[order],
        sum_p2.float().double()[order],
        torch.tensor(sessions),
        torch.tensor([0, 0, 1, 1]),
        mask=torch.tensor([True] * 11 + [False] * 2),
    )
    per_token = torch.zeros(13, dtype=torch.float64)
    per_token[order] = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(got.per_agent_token.double(), per_token, rtol=0, atol=1e-6)
    assert got.per_agent_token[11:].abs().max() == 0
    # A group of one valid session (group 1): baseline 0, the advantage is the return.
    assert got.per_agent_token[9].item() == pytest.approx(0.5 * 0.2 + 1.0, abs=1e-6)
    means = [per_token[token_turn == t].mean().item() for t in range(5)]
    assert got.per_turn.tolist() == pytest.approx(means, abs=1e-6)
    assert "advantage/otb_raw/std" in got.metrics


@pytest.mark.parametrize(
    "turn,sum_p2,message",
    [
        ([0, 3], 2, r"agent_token_turn values must lie in \[0, 3\)"),
        ([0, 1], 1, r"agent_token_sum_p2 has 1 entries but agent_token_turn has 2"),
    ],
)
def test_otb_agent_token_fields_are_checked(turn, sum_p2, message):
    with pytest.raises(ValueError, match=message):
        compute_advantages(
            AlgoConfig(name="otb"),
            **batch(),
            agent_token_turn=torch.tensor(turn),
            agent_token_logprobs=torch.zeros(2),
            agent_token_sum_p2=torch.ones(sum_p2),
        )


def test_otb_agent_token_fields_come_together_and_unknown_inputs_are_refused():
    with pytest.raises(ValueError, match=r"agent-token fields come together"):
        compute_advantages(AlgoConfig(name="otb"), **batch(), agent_token_turn=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match=r"unknown inputs \['token_logprobs'\]"):
        compute_advantages(AlgoConfig(name="otb"), **batch(), token_logprobs=torch.zeros(3))
