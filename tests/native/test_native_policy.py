"""The native row kernels of the policy loss (statistics, per-token head, d-logits in place) chained
together against ``ops.policy_loss_from_logits`` on the torch path (loss, metrics and logits gradient)."""

from __future__ import annotations

import pytest
import torch

from duca_fast import native, ops

OPTION_SETS = [
    dict(
        clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_type="k3", entropy_coef=0.0, tis_cap=None
    ),
    dict(
        clip_low=0.1,
        clip_high=0.28,
        dual_clip=3.0,
        kl_coef=0.05,
        kl_type="k3",
        entropy_coef=0.01,
        tis_cap=2.0,
    ),
    dict(
        clip_low=0.2,
        clip_high=0.3,
        dual_clip=None,
        kl_coef=0.1,
        kl_type="k1",
        entropy_coef=0.02,
        tis_cap=None,
    ),
    dict(
        clip_low=0.3, clip_high=0.2, dual_clip=1.5, kl_coef=0.2, kl_type="k2", entropy_coef=0.0, tis_cap=1.2
    ),
]


def make_batch(dtype: torch.dtype, seed: int, num_tokens: int = 37, vocab_size: int = 53):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_tokens, vocab_size, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, vocab_size, (num_tokens,), generator=gen)
    advantages = torch.randn(num_tokens, generator=gen, dtype=torch.float64).to(dtype)
    true_logp = torch.log_softmax(logits.double() / 0.7, dim=-1).gather(1, target[:, None])[:, 0]
    # Old log-probs far enough from the current ones that every clip branch is taken.
    old = (true_logp + torch.randn(num_tokens, generator=gen, dtype=torch.float64) * 0.4).to(dtype)
    ref = (true_logp + torch.randn(num_tokens, generator=gen, dtype=torch.float64) * 0.3).to(dtype)
    behavior = (old.double() + torch.randn(num_tokens, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    mask = torch.rand(num_tokens, generator=gen) > 0.2
    return logits, target, advantages, old, ref, behavior, mask


def native_loss(logits, target, advantages, old, ref, behavior, mask, options, temperature=0.7):
    lse, logprobs, entropy = native.logits_stats(logits, target, temperature)
    weights = mask.to(logits.dtype) / mask.sum()
    grad_logp, grad_entropy, sums = native.policy_head(
        logprobs, entropy, advantages, old, ref, behavior, weights, mask, **options
    )
    grad = native.logits_grad_(logits.clone(), target, lse, entropy, grad_logp, grad_entropy, temperature)
    return {name: value.item() for name, value in sums.items()}, grad


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chain_matches_torch_policy_loss_from_logits(options, dtype):
    logits, target, advantages, old, ref, behavior, mask = make_batch(dtype, seed=OPTION_SETS.index(options))
    sums, grad = native_loss(logits, target, advantages, old, ref, behavior, mask, options)

    leaf = logits.clone().requires_grad_(True)
    loss, metrics = ops.policy_loss_from_logits(
        leaf,
        target,
        advantages,
        old,
        mask=mask,
        ref_logprobs=ref,
        behavior_logprobs=behavior,
        temperature=0.7,
        backend="torch",
        **options,
    )
    loss.backward()
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    active = sums["active"]
    assert active == mask.sum().item()
    assert sums["loss"] == pytest.approx(loss.item(), rel=tol["rtol"], abs=tol["atol"])
    torch.testing.assert_close(grad, leaf.grad, **tol)
    assert (sums["clipped_low"] + sums["clipped_high"]) / active == pytest.approx(metrics["clip_frac"].item())
    assert sums["clipped_low"] / active == pytest.approx(metrics["clip_frac_low"].item())
    assert sums["approx_kl"] / active == pytest.approx(metrics["approx_kl"].item(), rel=1e-4, abs=1e-6)
    assert sums["ratio"] / active == pytest.approx(metrics["ratio_mean"].item(), rel=1e-5)
    assert sums["entropy"] / active == pytest.approx(metrics["entropy"].item(), rel=1e-5)
    assert sums["kl_ref"] / active == pytest.approx(metrics["kl_ref"].item(), rel=1e-4, abs=1e-6)
    if options["tis_cap"] is not None:
        assert sums["tis_capped"] / active == pytest.approx(metrics["tis_frac_capped"].item())
    # The batch really exercises the clips: otherwise the comparison above proves little.
    assert sums["clipped_low"] > 0 and sums["clipped_high"] > 0


def test_stats_match_log_softmax_with_strides():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(50, 9, generator=gen, dtype=torch.float64) * 5
    logits = base.T  # [9, 50], strides (1, 9)
    target = torch.randint(0, 50, (9,), generator=gen)
    lse, logprobs, entropy = native.logits_stats(logits, target, 1.3)
    log_probs = torch.log_softmax(logits / 1.3, dim=-1)
    torch.testing.assert_close(lse, torch.logsumexp(logits / 1.3, dim=-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logprobs, log_probs.gather(1, target[:, None])[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, -(log_probs.exp() * log_probs).sum(-1), rtol=1e-12, atol=1e-12)


def test_bad_row_inputs_are_named():
    logits = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"target\[1\] = 5 is outside \[0, 5\)"):
        native.logits_stats(logits, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="temperature"):
        native.logits_stats(logits, torch.tensor([0, 1, 1]), 0.0)
    vector = torch.zeros(3)
    active = torch.ones(3, dtype=torch.bool)
    head = dict(
        clip_low=1.0, clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_type="k3", entropy_coef=0.0, tis_cap=None
    )
    with pytest.raises(ValueError, match="clip_low"):
        native.policy_head(vector, vector, vector, None, None, None, vector, active, **head)
    head.update(clip_low=0.2, dual_clip=0.5)
    with pytest.raises(ValueError, match="dual_clip"):
        native.policy_head(vector, vector, vector, None, None, None, vector, active, **head)
    head.update(dual_clip=None)
    with pytest.raises(ValueError, match="advantages"):
        native.policy_head(vector, vector, torch.zeros(4), None, None, None, vector, active, **head)
