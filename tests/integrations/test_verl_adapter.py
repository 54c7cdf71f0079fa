"""The verl adapter against the real verl 0.9.1 package: registries, compute_advantage, vanilla loss."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

# `make test` installs verl (see the Makefile); a missing install is an error here, never a skip.
from verl.trainer.ppo import core_algos

from duca_fast import ops
from duca_fast.integrations import verl as duca_verl
from duca_fast.integrations._layout import turn_layout

LENGTH = 12
# One row per session: (uid, [(gap before turn, turn length, turn reward), ...], session reward).
SESSIONS = [
    ("a", [(0, 2, 0.5), (2, 3, -0.2)], 1.0),
    ("a", [(0, 1, 0.1), (1, 2, 0.3), (1, 2, 0.0)], 0.0),
    ("a", [(0, 4, -0.4)], 1.0),
    ("b", [(0, 2, 0.2), (3, 2, 0.2)], 0.0),
    ("b", [(1, 3, 0.7), (2, 2, -0.1)], 0.0),
    ("b", [(0, 2, 0.0), (1, 3, 0.9)], 5.0),
    ("c", [(0, 3, 0.3)], 2.0),  # a group of one session: both horizons give 0
]


def hand_batch():
    """verl tensors (turn reward at each turn's first token, session score at the last agent token) and
    the packed HIAN inputs built independently from SESSIONS."""
    rows = len(SESSIONS)
    mask = torch.zeros(rows, LENGTH, dtype=torch.int64)
    rewards = torch.zeros(rows, LENGTH)
    token_turn = torch.full((rows, LENGTH), -1)
    turn_rewards, turn_session, turn_index, uids, session_rewards = [], [], [], [], []
    for row, (uid, turns, session_reward) in enumerate(SESSIONS):
        position = 0
        for k, (gap, length, reward) in enumerate(turns):
            position += gap
            mask[row, position : position + length] = 1
            rewards[row, position] += reward
            token_turn[row, position : position + length] = len(turn_rewards)
            turn_rewards.append(reward)
            turn_session.append(row)
            turn_index.append(k)
            position += length
        rewards[row, position - 1] += session_reward
        uids.append(uid)
        session_rewards.append(session_reward)
    groups = {uid: g for g, uid in enumerate(dict.fromkeys(uids))}
    packed = dict(
        turn_rewards=torch.tensor(turn_rewards),
        turn_session=torch.tensor(turn_session),
        turn_index=torch.tensor(turn_index),
        session_rewards=torch.tensor(session_rewards),
        session_group=torch.tensor([groups[u] for u in uids]),
        token_turn=token_turn.reshape(-1),
    )
    return rewards, mask, np.array(uids, dtype=object), packed


def expected_advantages(packed, **options):
    return ops.hian_advantages(
        packed["turn_rewards"],
        packed["turn_session"],
        packed["session_rewards"],
        packed["session_group"],
        turn_index=packed["turn_index"],
        token_turn=packed["token_turn"],
        backend="reference",
        **options,
    ).reshape(-1, LENGTH)


def test_found_through_verl_registry_getters():
    assert core_algos.get_adv_estimator_fn("duca_hian") is duca_verl.compute_duca_hian_advantage
    assert core_algos.get_policy_loss_fn("duca_fused") is duca_verl.compute_policy_loss_duca_fused


def test_estimator_matches_ops_on_hand_batch():
    rewards, mask, uids, packed = hand_batch()
    estimator = core_algos.get_adv_estimator_fn("duca_hian")
    advantages, returns = estimator(token_level_rewards=rewards, response_mask=mask, index=uids, config=None)
    expected = expected_advantages(packed)
    torch.testing.assert_close(advantages, expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(returns, advantages)
    assert (advantages[mask == 0] == 0).all()
    assert (advantages[-1] == 0).all()  # lone session in its group
    # Both horizons matter: turns of one session get different advantages.
    assert advantages[0, 0] != advantages[0, 4]


def test_estimator_through_verl_compute_advantage():
    from verl import DataProto
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    rewards, mask, uids, packed = hand_batch()
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask}, non_tensors={"uid": uids}
    )
    config = AlgoConfig(adv_estimator="duca_hian", norm_adv_by_std_in_grpo=False)
    data = compute_advantage(data, adv_estimator="duca_hian", config=config)
    expected = expected_advantages(packed, scale="none")
    torch.testing.assert_close(data.batch["advantages"], expected.float(), rtol=1e-5, atol=1e-6)


def test_explicit_batch_keys_and_options(monkeypatch):
    rewards, mask, uids, packed = hand_batch()
    turns_per_row = [len(turns) for _, turns, _ in SESSIONS]
    turn_table = torch.full((len(SESSIONS), max(turns_per_row)), float("nan"))
    for row, (_, turns, _) in enumerate(SESSIONS):
        turn_table[row, : len(turns)] = torch.tensor([reward for _, _, reward in turns])
    batch = {
        "duca_turn_rewards": turn_table,
        "duca_session_rewards": packed["session_rewards"],
        "duca_token_turn": turn_layout(mask)[0],
    }
    monkeypatch.setenv("DUCA_HIAN_TURN_WEIGHT", "0.5")
    monkeypatch.setenv("DUCA_HIAN_TURN_SCOPE", "group_turn")
    advantages, _ = duca_verl.compute_duca_hian_advantage(
        torch.zeros_like(rewards), mask, index=uids, batch=batch
    )
    expected = expected_advantages(packed, turn_weight=0.5, turn_scope="group_turn")
    torch.testing.assert_close(advantages, expected.float(), rtol=1e-5, atol=1e-6)


def test_dual_track_options_from_the_config_section():
    rewards, mask, uids, packed = hand_batch()
    config = {"duca_hian": {"std": "population", "clip": 0.5}}
    advantages, _ = duca_verl.compute_duca_hian_advantage(rewards, mask, index=uids, config=config)
    expected = expected_advantages(packed, std="population", clip=0.5)
    torch.testing.assert_close(advantages, expected.float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, expected_advantages(packed))


def test_estimator_errors_name_the_problem():
    rewards, mask, uids, _ = hand_batch()
    with pytest.raises(ValueError, match="group uid"):
        duca_verl.compute_duca_hian_advantage(rewards, mask)
    with pytest.raises(ValueError, match="has 6 uids"):
        duca_verl.compute_duca_hian_advantage(rewards, mask, index=uids[:-1])


def actor_config(**overrides):
    from verl.workers.config import FSDPActorConfig

    fields = dict(strategy="fsdp", ppo_mini_batch_size=2, use_dynamic_bsz=True, ppo_max_token_len_per_gpu=64)
    fields.update(clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=2.5, rollout_n=1)
    fields.update(overrides)
    return FSDPActorConfig(**fields)


def loss_inputs(seed=0, rows=5, length=7):
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, length, generator=generator, dtype=torch.float64) * 3
    log_prob = (
        old + 0.5 * torch.randn(rows, length, generator=generator, dtype=torch.float64)
    ).requires_grad_()
    advantages = torch.randn(rows, length, generator=generator, dtype=torch.float64)
    mask = (torch.rand(rows, length, generator=generator) > 0.3).to(torch.int64)
    mask[-1] = 0  # a fully masked row
    return old, log_prob, advantages, mask


@pytest.mark.parametrize("loss_agg_mode", duca_verl.VERL_LOSS_AGG_MODES)
@pytest.mark.parametrize("with_is_weights", [False, True])
def test_policy_loss_matches_verl_vanilla(loss_agg_mode, with_is_weights):
    old, log_prob, advantages, mask = loss_inputs()
    is_weights = torch.rand(mask.shape, dtype=torch.float64) * 2 if with_is_weights else None
    config = actor_config()
    results = []
    for name in ("vanilla", "duca_fused"):
        log_prob.grad = None
        loss, metrics = core_algos.get_policy_loss_fn(name)(
            old_log_prob=old,
            log_prob=log_prob,
            advantages=advantages,
            response_mask=mask,
            loss_agg_mode=loss_agg_mode,
            config=config,
            rollout_is_weights=is_weights,
        )
        loss.backward()
        results.append((loss.detach(), log_prob.grad.clone(), metrics))
    (ref_loss, ref_grad, ref_metrics), (loss, grad, metrics) = results
    # verl divides by an int64 token count + 1e-8 for seq-mean-token-mean, which computes in float32.
    rtol = 1e-7 if loss_agg_mode == "seq-mean-token-mean" else 1e-10
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=1e-12)
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        assert metrics[key] == pytest.approx(ref_metrics[key], abs=1e-6), key


def test_policy_loss_with_global_batch_info():
    old, log_prob, advantages, mask = loss_inputs(seed=1)
    config = actor_config()
    config.global_batch_info.update(dp_size=2, batch_num_tokens=40, global_batch_size=8)
    losses = [
        core_algos.get_policy_loss_fn(name)(old, log_prob, advantages, mask, mode, config)[0]
        for mode in ("token-mean", "seq-mean-token-mean")
        for name in ("vanilla", "duca_fused")
    ]
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(losses[3], losses[2])


def test_policy_loss_matches_ops_from_logits():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 11, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 11, (9,), generator=generator)
    old = torch.log_softmax(logits.detach() + 0.3 * torch.randn(9, 11, dtype=torch.float64), -1)[
        range(9), target
    ]
    advantages = torch.randn(9, generator=generator, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1])
    log_prob = torch.log_softmax(logits, -1)[range(9), target]
    loss, _ = duca_verl.compute_policy_loss_duca_fused(
        old[None], log_prob[None], advantages[None], mask[None], "token-mean", actor_config()
    )
    (grad,) = torch.autograd.grad(loss, logits)
    ref_loss, _ = ops.policy_loss_from_logits(
        logits, target, advantages, old, mask=mask.bool(), clip_low=0.15, clip_high=0.28, dual_clip=2.5
    )
    (ref_grad,) = torch.autograd.grad(ref_loss, logits)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_loaded_by_verl_external_modules_variable():
    code = (
        "import verl\n"
        "from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn\n"
        "print(get_adv_estimator_fn('duca_hian').__module__, get_policy_loss_fn('duca_fused').__name__,\n"
        "      get_policy_loss_fn('duca_gspo').__name__)\n"
    )
    env = dict(
        os.environ, VERL_USE_EXTERNAL_MODULES="duca_fast.integrations.verl", VERL_USE_EXTERNAL_PLUGINS="none"
    )
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p])
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # duca_fused (the earlier name) is duca_vanilla; every objective is registered as duca_<verl name>.
    assert "duca_fast.integrations.verl compute_policy_loss_duca_vanilla compute_policy_loss_duca_gspo" in (
        result.stdout
    )
