"""ProxMO against a float64 transcription of the official code's advantage functions, every backend."""

import math

import pytest
import torch

from duca_fast import ops
from tests.conftest import KERNEL_DEVICE

BACKENDS = [("torch", "cpu"), ("triton", KERNEL_DEVICE), ("reference", "cpu")]


def official(rows, *, gamma, step_weight, temperature, alpha, beta):
    """GithubX-F/ProxMO-RL (7f40b65), ``proxmo/core_proxmo.py``, mode ``soft_grouping`` with PSC, in float64.

    ``rows``: one dict per step row in their batch order, with ``uid`` (group), ``traj`` (trajectory),
    ``score`` (the episode reward summed over the row's tokens), ``reward`` (the env's step reward) and
    ``feature`` (the anchor observation's vector, given instead of TF-IDF)."""
    # compute_step_discounted_returns: per trajectory, backwards in batch order.
    returns = [0.0] * len(rows)
    for traj in {r["traj"] for r in rows}:
        running = 0.0
        for i in reversed([i for i, r in enumerate(rows) if r["traj"] == traj]):
            running = rows[i]["reward"] + gamma * running
            returns[i] = running
    # episode_norm_reward(remove_std=True, compute_mean_std_cross_steps=True, enable_psc=True)
    by_uid = {}
    for r in rows:
        by_uid.setdefault(r["uid"], []).append(r["score"])
    mean = {u: (0.0 if len(s) == 1 else sum(s) / len(s)) for u, s in by_uid.items()}
    episode = []
    for r in rows:
        p = max(0.0, min(1.0, mean[r["uid"]]))
        w_pos = 1.0 + beta * (1 / (1 + math.exp(-((1 - p) ** alpha))) - 0.5)
        w_neg = 1.0 + beta * (1 / (1 + math.exp(p**alpha)) - 0.5)
        episode.append((r["score"] - mean[r["uid"]]) * (w_pos if r["score"] > 0.5 else w_neg))
    # step_soft_reward: L2-normalized features, masked softmax over the uid, baseline = weights @ returns.
    feats = torch.tensor([r["feature"] for r in rows], dtype=torch.float64)
    feats = feats / (feats.norm(dim=1, keepdim=True) + 1e-8)
    uid = torch.tensor([r["uid"] for r in rows])
    logits = (feats @ feats.T / temperature).masked_fill(uid[:, None] != uid[None, :], float("-inf"))
    baseline = torch.softmax(logits, dim=1) @ torch.tensor(returns, dtype=torch.float64)
    step = torch.tensor(returns, dtype=torch.float64) - baseline
    return torch.tensor(episode, dtype=torch.float64) + step_weight * step


def batch(seed, *, sessions=18, groups=4, features=6):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 5, (sessions,), generator=gen)
    session_group = torch.randint(0, groups, (sessions,), generator=gen)
    session_rewards = (torch.rand(sessions, generator=gen) > 0.5).double()
    turn_session = torch.repeat_interleave(torch.arange(sessions), lengths)
    turn_index = torch.cat([torch.arange(int(n)) for n in lengths])
    turn_rewards = torch.randn(turn_session.numel(), generator=gen, dtype=torch.float64)
    turn_features = torch.randn(turn_session.numel(), features, generator=gen, dtype=torch.float64)
    turn_features[torch.rand(turn_session.numel(), generator=gen) < 0.2] *= 0  # empty observations
    return turn_rewards, turn_session, turn_index, session_rewards, session_group, turn_features


def as_rows(turn_rewards, turn_session, turn_index, session_rewards, session_group, turn_features):
    order = sorted(range(turn_session.numel()), key=lambda t: (int(turn_session[t]), int(turn_index[t])))
    rows = [
        dict(
            uid=int(session_group[turn_session[t]]),
            traj=int(turn_session[t]),
            score=float(session_rewards[turn_session[t]]),
            reward=float(turn_rewards[t]),
            feature=turn_features[t].tolist(),
        )
        for t in order
    ]
    return rows, torch.tensor(order)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "params",
    [
        dict(
            gamma=0.95,
            step_weight=1.0,
            temperature=0.1,
            psc_alpha=4.0,
            psc_beta=ops.advantages.proxmo.PSC_BETA,
        ),
        dict(gamma=0.5, step_weight=0.3, temperature=1.0, psc_alpha=2.0, psc_beta=0.866),
        dict(gamma=0.0, step_weight=2.0, temperature=0.05, psc_alpha=5.0, psc_beta=0.5),
    ],
    ids=["run-script", "other", "gamma0"],
)
def test_matches_the_official_code(backend, device, params):
    for seed in range(3):
        tr, ts, ti, sr, sg, tf = batch(seed)
        rows, order = as_rows(tr, ts, ti, sr, sg, tf)
        expected = official(
            rows,
            gamma=params["gamma"],
            step_weight=params["step_weight"],
            temperature=params["temperature"],
            alpha=params["psc_alpha"],
            beta=params["psc_beta"],
        )
        # Shuffle the packed order: turn_index, not the position, orders a session's turns.
        shuffle = torch.randperm(ts.numel(), generator=torch.Generator().manual_seed(seed))
        inputs = [
            x.to(device) for x in (tr[shuffle].float(), ts[shuffle], sr.float(), sg, tf[shuffle].float())
        ]
        got = ops.proxmo_advantages(*inputs, turn_index=ti[shuffle].to(device), backend=backend, **params)
        assert got.dtype == torch.float32
        unshuffled = torch.empty_like(got.cpu())
        unshuffled[shuffle] = got.cpu()
        torch.testing.assert_close(unshuffled[order].double(), expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_lone_turns_omitted_sessions_tokens_and_packed_order(backend, device):
    # Group 0: one turn (mean 0, step advantage 0); group 1: two sessions, one of them NaN (omitted).
    turn_rewards = torch.tensor([1.0, 0.5, -0.5, 2.0, 3.0])
    turn_session = torch.tensor([0, 1, 1, 2, 2])
    session_rewards = torch.tensor([1.0, 0.0, float("nan")])
    session_group = torch.tensor([0, 1, 1])
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    token_turn = torch.tensor([-1, 0, 0, 1, 2, -1, 3, 4])
    args = [x.to(device) for x in (turn_rewards, turn_session, session_rewards, session_group, features)]
    per_turn = ops.proxmo_advantages(*args, nan_policy="omit", psc=False, backend=backend).cpu()
    assert per_turn[3:].tolist() == [0.0, 0.0]
    assert per_turn[0].item() == pytest.approx(1.0)  # R - 0 (a lone turn), G - b = 0
    # Session 1 alone in its group's statistics: mean over its 2 turns is 0, step returns 0.5 - 0.95*0.5...
    g0, g1 = 0.5 + 0.95 * -0.5, -0.5
    w = torch.softmax(torch.tensor([[1.0, 0.0], [0.0, 1.0]]) / 0.1, dim=1)
    baseline = w @ torch.tensor([g0, g1])
    assert per_turn[1:3].tolist() == pytest.approx((torch.tensor([g0, g1]) - baseline).tolist(), abs=1e-6)
    per_token = ops.proxmo_advantages(
        *args, nan_policy="omit", psc=False, token_turn=token_turn.to(device), backend=backend
    ).cpu()
    assert per_token.tolist() == pytest.approx(
        [0.0, *[per_turn[t].item() for t in (0, 0, 1, 2)], 0.0, 0.0, 0.0]
    )


def test_options_object_and_errors():
    tr, ts, _, sr, sg, tf = batch(0)
    args = (tr.float(), ts, sr.float(), sg, tf.float())
    options = ops.ProxmoOptions(gamma=0.5, psc=False)
    torch.testing.assert_close(
        ops.proxmo_advantages(*args, options=options), ops.proxmo_advantages(*args, gamma=0.5, psc=False)
    )
    with pytest.raises(ValueError, match="either as options= or as keywords"):
        ops.proxmo_advantages(*args, options=options, gamma=0.9)
    with pytest.raises(ValueError, match="turn_features has 3 rows"):
        ops.proxmo_advantages(*args[:4], tf[:3].float())
    bad = tf.float().clone()
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="turn_features has a non-finite value at row 2, column 1"):
        ops.proxmo_advantages(*args[:4], bad)
    with pytest.raises(ValueError, match="gamma must lie in"):
        ops.ProxmoOptions(gamma=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ops.ProxmoOptions(temperature=0.0)
    with pytest.raises(ValueError, match="session_rewards has a non-finite value"):
        nan = sr.float().clone()
        nan[0] = float("nan")
        ops.proxmo_advantages(*args[:2], nan, *args[3:])
