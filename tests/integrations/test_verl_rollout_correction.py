"""``ops.RolloutCorrection`` against verl 0.9.1's ``compute_rollout_correction_and_rejection_mask``."""

import pytest
import torch
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

from duca_fast import ops
from duca_fast.ops.policy_loss.correction import apply_correction

CASES = {
    "token TIS": dict(rollout_is="token", rollout_is_threshold=1.5),
    "token IcePop": dict(rollout_is="token", rollout_is_threshold="0.7_1.4"),
    "sequence TIS normalized": dict(
        rollout_is="sequence", rollout_is_threshold=3.0, rollout_is_batch_normalize=True
    ),
    "token normalized": dict(rollout_is="token", rollout_is_threshold=2.0, rollout_is_batch_normalize=True),
    "token_k1 rejection": dict(rollout_rs="token_k1", rollout_rs_threshold="0.8_1.25"),
    "seq rules": dict(rollout_rs="seq_mean_k3,seq_max_k2,seq_sum_k1", rollout_rs_threshold="0.05,0.3,1.8"),
    "weights and rejection": dict(
        rollout_is="sequence",
        rollout_is_threshold=2.0,
        rollout_rs="token_k2,seq_mean_k1",
        rollout_rs_threshold="0.08,1.3",
    ),
}


def batch(seed=0, rows=6, length=9):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, length, generator=gen, dtype=torch.float64) * 3
    rollout = old + 0.35 * torch.randn(rows, length, generator=gen, dtype=torch.float64)
    mask = (torch.rand(rows, length, generator=gen) > 0.2).to(torch.int64)
    mask[:, 0] = 1
    return old, rollout, mask


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_weights_rejection_and_metrics_match_verl(name, seed):
    old, rollout, mask = batch(seed)
    weights_proto, verl_mask, verl_metrics = compute_rollout_correction_and_rejection_mask(
        old, rollout, mask, **CASES[name]
    )
    correction = ops.RolloutCorrection(**CASES[name])
    rows = torch.arange(old.shape[0]).repeat_interleave(old.shape[1])
    weights, keep, metrics = apply_correction(
        correction, old.reshape(-1), rollout.reshape(-1), mask.reshape(-1).bool(), rows
    )
    assert torch.equal(keep.reshape(mask.shape), verl_mask.bool())
    assert 0 < int(keep.sum()) <= int(mask.sum())
    if correction.rollout_is is None:
        assert weights is None and weights_proto is None
    else:
        verl_weights = weights_proto.batch["rollout_is_weights"]
        # verl divides by an int64 count + 1e-8 when it normalizes (float32 promotion): 1e-9 apart.
        rtol = 1e-7 if correction.rollout_is_batch_normalize else 1e-10
        torch.testing.assert_close(
            weights.reshape(mask.shape) * mask, verl_weights * mask, rtol=rtol, atol=1e-12
        )
        prefix = "rollout_corr/rollout_is_"
        assert float(metrics["correction_weight_mean"]) == pytest.approx(
            verl_metrics[prefix + "mean"], rel=1e-6
        )
        ess = verl_metrics[prefix + "eff_sample_size"]
        assert float(metrics["correction_ess"]) == pytest.approx(ess, rel=1e-6)
    if correction.rollout_rs is not None:
        rejected = verl_metrics["rollout_corr/rollout_rs_masked_fraction"]
        assert float(metrics["correction_rejected_frac"]) == pytest.approx(rejected, abs=1e-9)
        assert 0 < rejected < 1, "the rules must reject some tokens and keep others here"


def test_the_loss_with_a_correction_is_the_loss_on_kept_tokens_with_weighted_terms():
    """Through the loss: rejected tokens leave the loss and its normalizer, weights scale the objective."""
    old, rollout, mask = batch(3)
    rows, length = mask.shape
    gen = torch.Generator().manual_seed(5)
    logprobs = (old + 0.2 * torch.randn(rows, length, generator=gen, dtype=torch.float64)).reshape(-1)
    advantages = torch.randn(rows * length, generator=gen, dtype=torch.float64)
    seq_ids = torch.arange(rows).repeat_interleave(length)
    correction = ops.RolloutCorrection(**CASES["weights and rejection"])
    common = dict(
        old_logprobs=old.reshape(-1),
        mask=mask.reshape(-1).bool(),
        seq_ids=seq_ids,
        behavior_logprobs=rollout.reshape(-1),
    )
    leaf = logprobs.clone().requires_grad_()
    loss, metrics = ops.policy_loss_from_logprobs(leaf, advantages, correction=correction, **common)
    loss.backward()
    weights, keep, _ = apply_correction(
        correction, old.reshape(-1), rollout.reshape(-1), common["mask"], seq_ids
    )
    # By hand: PPO clip on the kept tokens, token mean over the kept ones, weights on the surrogate.
    ratio = torch.exp(logprobs - old.reshape(-1))
    surrogate = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
    expected = (surrogate * weights)[keep].sum() / keep.sum()
    torch.testing.assert_close(loss, expected)
    assert torch.all(leaf.grad[~keep] == 0) and leaf.grad[keep].abs().sum() > 0
    assert float(metrics["correction_rejected_frac"]) > 0
