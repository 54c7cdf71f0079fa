"""DynaMO's token modulation of advantages: an entropy boost and a gradient-norm damping, per token.

Source: "DynaMO" (arXiv 2602.19208), code ``GithubX-F/DynaMO-RL`` (``verl/workers/actor/dp_actor.py``,
``update_policy``, mode ``decay6_linearnorm``, defaults ``lambda_min=0.6``, ``mu_max=1.2``; clip 0.2 /
0.28), applied over the tokens of one call (their code: one micro-batch). With ``r = exp(logp - old)``,
entropy ``H`` and ``p = exp(logp)`` over the loss tokens:

- boost (A > 0 only): ``1 + (mu_max - 1) (H_max - H) / (H_max - H_min + 1e-8)``, else 1;
- damping: ``xi = I r A`` with ``I = [A > 0][r <= 1 + clip_high] + [A < 0][r >= 1 - clip_low]`` (the tokens
  PPO's clip leaves live), ``term = p (logp + H)``, ``est = |xi (term - mean_seq term)|``,
  ``x = est / (max est + 1e-8)``, ``decay = lambda_min + (1 - lambda_min) / (1 + exp(50 (x - 0.99)))``;
- ``A' = A * decay * boost`` (no gradient).

It needs every token's log-prob and entropy before the loss: run ``ops.token_logprobs(...,
return_entropy=True)`` under ``torch.no_grad()`` first (one more lm_head GEMM pass, 2 N H V FLOPs: the
loss then costs 8 N H V in all), then ``fused_policy_loss`` with the modulated advantages, with any
objective.
"""

from __future__ import annotations

import torch

from duca_fast.ops._checks import check_tensor


@torch.no_grad()
def dynamo_token_advantages(
    advantages: torch.Tensor,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    entropy: torch.Tensor,
    seq_ids: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    lambda_min: float = 0.6,
    mu_max: float = 1.2,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
) -> torch.Tensor:
    """``[N]`` modulated advantages (0 on masked tokens); see the module docstring."""
    count = advantages.shape[0]
    for name, values in (
        ("advantages", advantages),
        ("logprobs", logprobs),
        ("old_logprobs", old_logprobs),
        ("entropy", entropy),
    ):
        check_tensor(name, values, ndims=(1,), kind="float")
        if values.shape[0] != count:
            raise ValueError(f"{name} has {values.shape[0]} entries but advantages has {count}")
    check_tensor("seq_ids", seq_ids, ndims=(1,), kind="int")
    if seq_ids.shape[0] != count:
        raise ValueError(f"seq_ids has {seq_ids.shape[0]} entries but advantages has {count}")
    if not (0 <= lambda_min <= 1 and mu_max >= 1):
        raise ValueError(f"need 0 <= lambda_min <= 1 and mu_max >= 1, got {lambda_min}, {mu_max}")
    active = torch.ones(count, dtype=torch.bool, device=advantages.device) if mask is None else mask.bool()
    dtype = torch.float64
    zero = torch.zeros((), dtype=dtype, device=advantages.device)
    if count == 0 or not bool(active.any()):
        return torch.zeros_like(advantages)
    a = torch.where(active, advantages.to(dtype), zero)
    logp = torch.where(active, logprobs.to(dtype), zero)
    old = torch.where(active, old_logprobs.to(dtype), zero)
    h = torch.where(active, entropy.to(dtype), zero)
    h_min, h_max = h[active].min(), h[active].max()
    boost = torch.where(a > 0, 1 + (mu_max - 1) * (h_max - h) / (h_max - h_min + 1e-8), torch.ones_like(h))
    ratio = torch.exp(logp - old)
    live = ((a > 0) & (ratio <= 1 + clip_high)) | ((a < 0) & (ratio >= 1 - clip_low))
    xi = live.to(dtype) * ratio * a
    term = torch.exp(logp) * (logp + h)
    seq = seq_ids.long()
    size = int(seq.max()) + 1
    loss = active.to(dtype)
    sums = torch.zeros(size, dtype=dtype, device=seq.device).index_add_(0, seq, term * loss)
    lengths = torch.zeros(size, dtype=dtype, device=seq.device).index_add_(0, seq, loss)
    mean_term = (sums / lengths.clamp_min(1))[seq]
    est = (xi * (term - mean_term)).abs() * loss
    x = est / (est.max() + 1e-8)
    decay = lambda_min + (1 - lambda_min) / (1 + torch.exp(50 * (x - 0.99)))
    return torch.where(active, a * decay * boost, zero).to(advantages.dtype)
