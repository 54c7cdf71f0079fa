"""``ops.optimal_token_baseline_advantages`` against verl 0.9.1's two optimal-token-baseline estimators."""

import numpy as np
import pytest
import torch
from verl.trainer.ppo import core_algos

from duca_fast import ops


def verl_batch(seed, rows=7, length=10, *, holes=True):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.zeros(rows, length, dtype=torch.float64)
    lengths = torch.randint(0, length + 1, (rows,), generator=gen)
    lengths[0], lengths[1] = length, length - 3  # one strictly longest row in group 0
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.int64)
    if holes:  # multi-turn: customer tokens inside the response carry no loss
        mask = mask * (torch.rand(rows, length, generator=gen) > 0.25).to(torch.int64)
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    rewards[last] = torch.randn(int(last.sum()), generator=gen, dtype=torch.float64)
    rewards += 0.1 * torch.randn(rows, length, generator=gen, dtype=torch.float64) * mask  # turn rewards
    old = -torch.rand(rows, length, generator=gen, dtype=torch.float64) * 3
    sum_p2 = torch.rand(rows, length, generator=gen, dtype=torch.float64) * 0.5
    index = np.array([0, 0, 0, 1, 1, 2, 0])[:rows]
    is_weights = torch.rand(rows, length, generator=gen, dtype=torch.float64) + 0.5
    return rewards, mask, index, old, sum_p2, is_weights


def packed(rewards, mask, index, old, sum_p2, is_weights):
    rows, length = rewards.shape
    return dict(
        token_rewards=rewards.reshape(-1),
        old_logprobs=old.reshape(-1),
        sum_p2=sum_p2.reshape(-1),
        seq_ids=torch.arange(rows).repeat_interleave(length),
        seq_group=torch.as_tensor(index),
        mask=mask.reshape(-1).bool(),
        is_weights=None if is_weights is None else is_weights.reshape(-1),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("zero_tail", [True, False])
@pytest.mark.parametrize(
    "verl_name,positions,holes",
    [
        ("compute_optimal_token_baseline_advantage", "all", False),
        ("compute_multi_turn_optimal_token_baseline_advantage", "loss_tokens", True),
        ("compute_multi_turn_optimal_token_baseline_advantage", "loss_tokens", False),
    ],
)
def test_matches_verl(seed, with_is, zero_tail, verl_name, positions, holes):
    rewards, mask, index, old, sum_p2, is_weights = verl_batch(seed, holes=holes)
    is_weights = is_weights if with_is else None
    ref_adv, ref_returns = getattr(core_algos, verl_name)(
        token_level_rewards=rewards,
        response_mask=mask,
        index=index,
        old_log_probs=old,
        sum_pi_squared=sum_p2,
        rollout_is_weights=is_weights,
        handle_zero_tail=zero_tail,
    )
    adv, returns = ops.optimal_token_baseline_advantages(
        **packed(rewards, mask, index, old, sum_p2, is_weights),
        positions=positions,
        handle_zero_tail=zero_tail,
    )
    torch.testing.assert_close(adv.reshape(ref_adv.shape), ref_adv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(returns.reshape(ref_returns.shape), ref_returns, rtol=1e-10, atol=1e-12)
    assert adv.abs().sum() > 0


def test_bad_inputs_are_named():
    args = packed(*verl_batch(0))
    with pytest.raises(ValueError, match="positions must be one of"):
        ops.optimal_token_baseline_advantages(**args, positions="turns")
    bad = dict(args, seq_ids=args["seq_ids"].flip(0).roll(3))
    with pytest.raises(ValueError, match="must be contiguous"):
        ops.optimal_token_baseline_advantages(**bad)
    bad = dict(args, sum_p2=args["sum_p2"].clone())
    bad["sum_p2"][0] = float("nan")
    with pytest.raises(ValueError, match=r"sum_p2\[0\] = nan is not finite"):
        ops.optimal_token_baseline_advantages(**bad)
    bad = dict(args, seq_group=args["seq_group"][:3])
    with pytest.raises(ValueError, match=r"seq_ids\[30\] = 3 is outside \[0, 3\)"):
        ops.optimal_token_baseline_advantages(**bad)
