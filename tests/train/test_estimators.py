"""Baseline advantage estimators against hand-computed values on small groups."""

from __future__ import annotations

import math

import pytest
import torch

from duca_fast import ops
from duca_fast.train import estimators
from duca_fast.train.estimators import TwoHorizonBatch

S3 = 1 / math.sqrt(3)  # (x - mean) / std of the odd one out in {a, a, b}: -/+ 2 * S3, the others +/- S3
R2 = 1 / math.sqrt(2)  # of a pair


def packed(sessions, groups, *, turn_weights=None, session_weights=None, order=None):
    """A batch from per-session lists of turn-reward rows and a session-reward row."""
    turn_rows, turn_session, turn_index = [], [], []
    for s, (turns, _) in enumerate(sessions):
        for i, row in enumerate(turns):
            turn_rows.append(row)
            turn_session.append(s)
            turn_index.append(i)
    order = order or list(range(len(turn_rows)))
    return TwoHorizonBatch(
        turn_rewards=torch.tensor([turn_rows[k] for k in order], dtype=torch.float32),
        turn_session=torch.tensor([turn_session[k] for k in order]),
        turn_index=torch.tensor([turn_index[k] for k in order]),
        session_rewards=torch.tensor([session for _, session in sessions], dtype=torch.float32),
        session_group=torch.tensor(groups),
        turn_component_weights=turn_weights,
        session_component_weights=session_weights,
    )


# Group 0: sessions of 2, 1 and 3 turns; group 1: a lone session; group 2: a pair, one cut (NaN).
LENGTH_BATCH = [
    ([[-1.0], [-1.0]], [2.0]),
    ([[0.0]], [0.0]),
    ([[0.0], [0.0], [-3.0]], [2.0]),
    ([[-1.0]], [1.0]),
    ([[-1.0]], [1.0]),
    ([[0.0]], [float("nan")]),
]
LENGTH_GROUPS = [0, 0, 0, 1, 2, 2]


def per_session(values, batch):
    """Per-turn advantages -> per-session (checks every turn of a session shares it)."""
    out = {}
    for value, session in zip(values.tolist(), batch.turn_session.tolist()):
        assert out.setdefault(session, value) == pytest.approx(value)
    return [out[s] for s in sorted(out)]


def test_grpo_mean_and_sum_differ_by_the_length_effect():
    batch = packed(LENGTH_BATCH, LENGTH_GROUPS)
    # mean: X = R + mean(r) = [1, 0, 1] -> mean 2/3, std 1/sqrt(3)
    mean = estimators.grpo(batch)
    assert per_session(mean, batch) == pytest.approx([S3, -2 * S3, S3, 0, 0, 0], abs=1e-5)
    # sum: X = R + sum(r) = [0, 0, -1]: the long session is now the worst
    total = estimators.grpo(batch, turn_agg="sum")
    assert per_session(total, batch) == pytest.approx([S3, S3, -2 * S3, 0, 0, 0], abs=1e-5)
    assert mean.dtype == torch.float32 and mean.shape == (batch.turn_rewards.shape[0],)


def test_grpo_horizon_and_component_weights():
    batch = packed(LENGTH_BATCH, LENGTH_GROUPS)
    # X = 0.5 R + 2 mean(r) = [-1, 0, -1]
    weighted = estimators.grpo(batch, turn_weight=2.0, session_weight=0.5)
    assert per_session(weighted, batch)[:3] == pytest.approx([-S3, 2 * S3, -S3], abs=1e-5)
    # a second turn component with weight 0 changes nothing
    noisy = [
        ([[r[0], 7.0 * i - s] for i, r in enumerate(turns)], session)
        for s, (turns, session) in enumerate(LENGTH_BATCH)
    ]
    zero_weighted = packed(noisy, LENGTH_GROUPS, turn_weights=torch.tensor([1.0, 0.0]))
    assert torch.allclose(estimators.grpo(zero_weighted), estimators.grpo(batch), atol=1e-6)


def test_session_only_ignores_turn_rewards():
    batch = packed(LENGTH_BATCH, LENGTH_GROUPS)
    # R = [2, 0, 2] -> [S3, -2 S3, S3]
    assert per_session(estimators.session_only(batch), batch) == pytest.approx(
        [S3, -2 * S3, S3, 0, 0, 0], abs=1e-5
    )


GDPO_BATCH = [
    ([[0.0, -1.0]], [1.0]),
    ([[-1.0, -1.0]], [0.0]),
    ([[0.0, 0.0]], [1.0]),
    ([[0.0, 0.0]], [1.0]),
    ([[0.0, 0.0]], [0.0]),
]
GDPO_GROUPS = [0, 0, 0, 1, 1]


def test_gdpo_normalizes_each_component_then_the_batch():
    batch = packed(GDPO_BATCH, GDPO_GROUPS)
    # group 0: component 1 -> [S3, -2S3, S3], component 2 -> [-S3, -S3, 2S3], session -> [S3, -2S3, S3]
    # sums [S3, -5S3, 4S3]; group 1: turn components constant -> 0, session -> [R2, -R2]
    sums = [S3, -5 * S3, 4 * S3, R2, -R2]
    batch_std = math.sqrt(sum(x * x for x in sums) / 4)  # batch mean is 0
    assert per_session(estimators.gdpo(batch), batch) == pytest.approx(
        [x / batch_std for x in sums], abs=1e-5
    )
    # only the session component: [S3, -2S3, S3, R2, -R2], sum of squares 3
    only_session = per_session(estimators.gdpo(batch, turn_weight=0.0), batch)
    assert only_session == pytest.approx([x / math.sqrt(3 / 4) for x in (S3, -2 * S3, S3, R2, -R2)], abs=1e-5)
    # GRPO on the same data differs: X = R + r1 + r2 = [0, -2, 1 | 1, 0]
    assert per_session(estimators.grpo(batch), batch)[:3] != pytest.approx(
        [x / batch_std for x in sums[:3]], abs=1e-3
    )


def test_gdpo_turn_agg_and_lone_or_cut_sessions():
    batch = packed(LENGTH_BATCH, LENGTH_GROUPS)
    # group 0 turn means [-1, 0, -1] -> [-S3, 2S3, -S3]; sums [-2, 0, -3]: mean -5/3, std sqrt(7/3)
    # session [2, 0, 2] -> [S3, -2S3, S3]; groups 1 and 2 have < 2 valid sessions -> 0 and out of the batch
    # turn_weight 2: sums [-S3, 2S3, -S3], batch std 1. (With weight 1 the sums cancel to ~eps, and the
    # batch renormalization of the reference would blow that rounding up: see docs/algorithms.md.)
    mean = per_session(estimators.gdpo(batch, turn_weight=2.0), batch)
    assert mean == pytest.approx([-S3, 2 * S3, -S3, 0, 0, 0], abs=1e-5)
    sum_dev = [x + 5 / 3 for x in (-2.0, 0.0, -3.0)]
    sum_sums = [d / math.sqrt(7 / 3) + s for d, s in zip(sum_dev, (S3, -2 * S3, S3))]
    std = math.sqrt(sum(x * x for x in sum_sums) / 2)
    expected = [*(x / std for x in sum_sums), 0, 0, 0]
    assert per_session(estimators.gdpo(batch, turn_agg="sum"), batch) == pytest.approx(expected, abs=1e-5)


def test_mt_grpo_adds_a_per_position_turn_advantage_to_the_outcome():
    sessions = [
        ([[-1.0], [0.0]], [1.0]),
        ([[0.0]], [0.0]),
        ([[-1.0], [-2.0]], [0.0]),
        ([[-5.0]], [1.0]),  # a lone session in group 1: no statistic, and it must not join group 0's
    ]
    batch = packed(sessions, [0, 0, 0, 1], order=[4, 2, 0, 3, 1, 5])
    outcome = {0: 2 * S3, 1: -S3, 2: -S3, 3: 0.0}  # R = [1, 0, 0]
    turn = {(0, 0): -S3, (1, 0): 2 * S3, (2, 0): -S3, (0, 1): R2, (2, 1): -R2, (3, 0): 0.0}
    for lam in (1.0, 0.5):
        got = estimators.mt_grpo(batch, turn_weight=lam)
        expected = [
            outcome[s] + lam * turn[(s, i)]
            for s, i in zip(batch.turn_session.tolist(), batch.turn_index.tolist())
        ]
        assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_gae_by_hand_in_any_packing_order():
    # session 0: r [1, 0, 2], V [0.5, 1, 0]; session 1: r [-1], V [0.25]; packed shuffled
    rows = [(0, 0, 1.0, 0.5), (0, 1, 0.0, 1.0), (0, 2, 2.0, 0.0), (1, 0, -1.0, 0.25)]
    rows = [rows[k] for k in (2, 3, 0, 1)]
    session, index, reward, value = (list(x) for x in zip(*rows))
    args = (torch.tensor(reward), torch.tensor(value), torch.tensor(session), torch.tensor(index))
    advantages, returns = estimators.gae(*args, gamma=0.9, lam=0.5)
    # A2 = 2; A1 = (0 + 0 - 1) + 0.45 * 2 = -0.1; A0 = (1 + 0.9 - 0.5) + 0.45 * -0.1 = 1.355; A = -1 - 0.25
    expected = {(0, 0): 1.355, (0, 1): -0.1, (0, 2): 2.0, (1, 0): -1.25}
    assert advantages.tolist() == pytest.approx([expected[(s, i)] for s, i in zip(session, index)], abs=1e-6)
    assert returns.tolist() == pytest.approx([a + v for a, v in zip(advantages.tolist(), value)], abs=1e-6)
    # gamma = lam = 1: returns are the undiscounted rewards-to-go
    _, returns = estimators.gae(*args, gamma=1.0, lam=1.0)
    to_go = {(0, 0): 3.0, (0, 1): 2.0, (0, 2): 2.0, (1, 0): -1.0}
    assert returns.tolist() == pytest.approx([to_go[(s, i)] for s, i in zip(session, index)], abs=1e-6)


def test_turn_level_rewards_put_the_session_reward_on_the_last_turn():
    batch = packed([([[-1.0], [-3.0]], [2.0]), ([[-1.0]], [float("nan")])], [0, 0])
    assert estimators.turn_level_rewards(batch).tolist() == pytest.approx([-0.5, 0.5, 0.0])
    assert estimators.turn_level_rewards(batch, turn_agg="sum").tolist() == pytest.approx([-1.0, -1.0, 0.0])
    weighted = estimators.turn_level_rewards(batch, turn_weight=2.0, session_weight=3.0)
    assert weighted.tolist() == pytest.approx([-1.0, 3.0, 0.0])


def test_value_head_and_value_loss():
    torch.manual_seed(0)
    head = estimators.ValueHead(5, hidden_size=8)
    values = head(torch.randn(4, 5))
    assert values.shape == (4,)
    values.sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    with pytest.raises(ValueError, match="observation"):
        head(torch.randn(4, 6))
    loss, metrics = estimators.value_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]))
    assert loss.item() == pytest.approx(1.25) and metrics["value/loss"] == pytest.approx(1.25)
    old = torch.zeros(2)
    clipped, _ = estimators.value_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]), old, clip=0.5)
    assert clipped.item() == pytest.approx(0.5 * (1.0 + 12.25) / 2)


def test_estimators_reject_bad_input():
    good = dict(
        turn_rewards=torch.zeros(2, 1),
        turn_session=torch.tensor([0, 0]),
        turn_index=torch.tensor([0, 1]),
        session_rewards=torch.zeros(1, 1),
        session_group=torch.tensor([0]),
    )
    TwoHorizonBatch(**good)
    cases = [
        (dict(turn_rewards=torch.tensor([[0.0], [float("nan")]])), "turn_rewards has a non-finite"),
        (dict(turn_rewards=torch.zeros(2)), "turn_rewards must be a 2-D"),
        (dict(turn_session=torch.tensor([0, 1])), r"turn_session values must lie in \[0, 1\)"),
        (dict(turn_index=torch.tensor([0, 0])), "repeats"),
        (dict(turn_index=torch.tensor([0, 2])), "0..n_i-1"),
        (dict(session_group=torch.tensor([0.0])), "session_group must be int"),
        (dict(turn_component_weights=torch.ones(2)), r"turn_component_weights must have shape \(1,\)"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            TwoHorizonBatch(**{**good, **change})
    batch = TwoHorizonBatch(**good)
    with pytest.raises(ValueError, match="turn_agg"):
        estimators.grpo(batch, turn_agg="max")
    with pytest.raises(ValueError, match="eps"):
        estimators.gdpo(batch, eps=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        estimators.gae(torch.zeros(1), torch.zeros(1), torch.tensor([0]), torch.tensor([0]), gamma=1.5)
    with pytest.raises(ValueError, match="values has a non-finite"):
        estimators.gae(torch.zeros(1), torch.tensor([float("inf")]), torch.tensor([0]), torch.tensor([0]))


def test_empty_batch_gives_empty_advantages():
    batch = TwoHorizonBatch(
        turn_rewards=torch.zeros(0, 2),
        turn_session=torch.zeros(0, dtype=torch.long),
        turn_index=torch.zeros(0, dtype=torch.long),
        session_rewards=torch.zeros(0, 1),
        session_group=torch.zeros(0, dtype=torch.long),
    )
    for estimator in (estimators.grpo, estimators.gdpo, estimators.mt_grpo, estimators.session_only):
        assert estimator(batch).shape == (0,)


def test_sum_form_and_ablation_agree_with_the_ops_on_random_batches():
    """GRPO(sum) is the landed first-round baseline; session_only is HIAN's session horizon alone."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 6, (12,), generator=generator)
    turn_session = torch.repeat_interleave(torch.arange(12), lengths)
    turn_index = torch.cat([torch.arange(int(n)) for n in lengths])
    turn_rewards = -torch.rand(len(turn_session), 3, generator=generator)
    session_rewards = (torch.rand(12, 2, generator=generator) > 0.5).float()
    group = torch.arange(12) // 4
    batch = TwoHorizonBatch(turn_rewards, turn_session, turn_index, session_rewards, group)
    merged = torch.zeros(12).index_add_(0, turn_session, turn_rewards.sum(1)) + session_rewards.sum(1)
    landed = ops.grpo_advantages(merged, group)[turn_session]
    assert torch.allclose(estimators.grpo(batch, turn_agg="sum"), landed, atol=1e-5)
    hian = ops.hian_advantages(turn_rewards, turn_session, session_rewards, group, turn_weight=0.0)
    assert torch.allclose(estimators.session_only(batch), hian, atol=1e-5)
