"""DynaMO's token modulation against a line-by-line transcription of their ``decay6_linearnorm`` mode,
and the two-pass recipe through the fused loss."""

import math

import pytest
import torch

from duca_fast import ops


def their_modulation(adv, logp, old, ent, mask, lambda_min=0.6, mu_max=1.2, eps_low=0.2, eps_high=0.28):
    """``[B, L]`` tensors, as their micro-batch code computes it (transcribed from the published formulas)."""
    m = mask.double()
    h_min = (ent * m + (1 - m) * ent.max()).min()
    h_max = (ent * m + (1 - m) * ent.min()).max()
    h_norm = (h_max - ent) / (h_max - h_min + 1e-8)
    boost = torch.where(adv > 0, 1 + (mu_max - 1) * h_norm, torch.ones_like(ent))
    r = torch.exp(logp - old)
    indicator = (adv > 0).double() * (r <= 1 + eps_high).double() + (adv < 0).double() * (
        r >= 1 - eps_low
    ).double()
    xi = indicator * r * adv
    pi = torch.exp(logp)
    term = pi * (logp + ent)
    expectation = (term * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    est = (-xi * (term - expectation)).abs() * m
    x = est / (est.max() + 1e-8)
    decay = lambda_min + (1 - lambda_min) / (1 + torch.exp(50 * (x - 0.99)))
    return adv * (decay * boost)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_transcription(seed):
    gen = torch.Generator().manual_seed(seed)
    rows, length = 5, 8
    old = -torch.rand(rows, length, generator=gen, dtype=torch.float64) * 3
    logp = old + 0.3 * torch.randn(rows, length, generator=gen, dtype=torch.float64)
    ent = torch.rand(rows, length, generator=gen, dtype=torch.float64) * 4
    adv = torch.randn(rows, 1, generator=gen, dtype=torch.float64).expand(rows, length).clone()
    mask = torch.rand(rows, length, generator=gen) > 0.2
    mask[:, 0] = True
    expected = their_modulation(adv, logp, old, ent, mask) * mask
    seq_ids = torch.arange(rows).repeat_interleave(length)
    got = ops.dynamo_token_advantages(
        adv.reshape(-1), logp.reshape(-1), old.reshape(-1), ent.reshape(-1), seq_ids, mask=mask.reshape(-1)
    )
    torch.testing.assert_close(got.reshape(rows, length), expected, rtol=1e-12, atol=1e-12)
    ratio = got.reshape(-1)[mask.reshape(-1)] / adv.reshape(-1)[mask.reshape(-1)]
    assert ratio.min() >= 0.6 - 1e-12 and ratio.max() <= 1.2 + 1e-12
    assert (ratio < 0.99).any() and (ratio > 1.01).any(), "both the damping and the boost must act here"


def test_two_pass_recipe_through_the_fused_loss():
    """Pass 1: log-probs and entropies (no grad); pass 2: the fused loss on the modulated advantages."""
    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(12, 6, generator=gen), torch.randn(17, 6, generator=gen) * 0.5
    target = torch.randint(0, 17, (12,), generator=gen)
    advantages = torch.randn(12, generator=gen)
    seq_ids = torch.arange(3).repeat_interleave(4)
    with torch.no_grad():
        logprobs, entropy = ops.token_logprobs(hidden, weight, target, return_entropy=True)
    old = logprobs + 0.2 * torch.randn(12, generator=gen)
    modulated = ops.dynamo_token_advantages(advantages, logprobs, old, entropy, seq_ids)
    leaf = hidden.clone().requires_grad_()
    loss, _ = ops.fused_policy_loss(leaf, weight, target, modulated, old, seq_ids=seq_ids, objective="gspo")
    loss.backward()
    assert math.isfinite(float(loss)) and leaf.grad.abs().sum() > 0


def test_bad_inputs_are_named():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="entropy has 3 entries"):
        ops.dynamo_token_advantages(x, x, x, torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="lambda_min"):
        ops.dynamo_token_advantages(x, x, x, x, torch.zeros(4, dtype=torch.long), lambda_min=1.5)
