"""The per-token policy head shared by the fast paths: input preparation, objective, derivatives, metrics.

The float64 reference (``reference.py``) does not use this module: it aggregates and computes every
metric on its own, so that a bug here shows up as a difference in the tests.
"""

from __future__ import annotations

import torch

from duca_fast.ops._checks import ValueChecks, check_tensor
from duca_fast.ops.policy_loss.options import (
    LOG_RATIO_LIMIT,
    HeadOutput,
    PolicyLossOptions,
    TokenInputs,
)


def check_vector(name: str, value: torch.Tensor | None, num_tokens: int, kind: str) -> None:
    if value is None:
        return
    check_tensor(name, value, ndims=(1,), kind=kind)
    if value.shape[0] != num_tokens:
        raise ValueError(f"{name} has {value.shape[0]} entries but target has {num_tokens} tokens")


def prepare_token_inputs(
    target: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    *,
    vocab_size: int,
    mask: torch.Tensor | None,
    seq_ids: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    behavior_logprobs: torch.Tensor | None,
    options: PolicyLossOptions,
    compute_dtype: torch.dtype,
    token_weights: torch.Tensor | None = None,
) -> TokenInputs:
    """Validate the per-token arguments (names in every message) and build the aggregation weights.

    ``token_weights`` (optional ``[N]``) multiplies each token's loss before the aggregation.
    """
    check_tensor("target", target, ndims=(1,), kind="int")
    num_tokens = target.shape[0]
    check_vector("advantages", advantages, num_tokens, "float")
    check_vector("old_logprobs", old_logprobs, num_tokens, "float")
    check_vector("ref_logprobs", ref_logprobs, num_tokens, "float")
    check_vector("behavior_logprobs", behavior_logprobs, num_tokens, "float")
    check_vector("seq_ids", seq_ids, num_tokens, "int")
    check_vector("token_weights", token_weights, num_tokens, "float")
    if mask is not None:
        check_tensor("mask", mask, ndims=(1,), kind="any")
        if mask.shape[0] != num_tokens:
            raise ValueError(f"mask has {mask.shape[0]} entries but target has {num_tokens} tokens")
    if options.kl_coef != 0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if options.tis_cap is not None and behavior_logprobs is None:
        raise ValueError("tis_cap needs behavior_logprobs (the engine's sampler log-probs)")
    if options.loss_agg.startswith("seq_") and seq_ids is None:
        raise ValueError(f"loss_agg={options.loss_agg!r} needs seq_ids (the sequence of each token)")

    active = torch.ones(num_tokens, dtype=torch.bool, device=target.device) if mask is None else mask.bool()
    checks = ValueChecks()
    checks.forbid(
        active & ((target < 0) | (target >= vocab_size)),
        lambda i: f"target[{i}] = {int(target[i])} is outside [0, {vocab_size}) (vocabulary of weight)",
    )
    for name, values in (
        ("advantages", advantages),
        ("old_logprobs", old_logprobs),
        ("ref_logprobs", ref_logprobs),
        ("behavior_logprobs", behavior_logprobs),
        ("token_weights", token_weights),
    ):
        if values is not None:
            checks.forbid(
                active & ~torch.isfinite(values),
                lambda i, name=name, values=values: f"{name}[{i}] = {float(values[i])} is not finite",
            )
    if seq_ids is not None:
        checks.forbid(seq_ids < 0, lambda i: f"seq_ids[{i}] = {int(seq_ids[i])} must be >= 0")
    checks.raise_if_failed()

    def cast(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        return torch.where(
            active, values.to(compute_dtype), torch.zeros((), dtype=compute_dtype, device=values.device)
        )

    weights = active.to(compute_dtype)
    if options.loss_agg == "token_mean":
        weights = weights / weights.sum().clamp_min(1.0)
    elif options.loss_agg == "token_sum_norm":
        weights = weights / options.max_tokens
    else:
        seq = seq_ids.long()
        num_seqs = int(seq.max().item()) + 1 if num_tokens else 0
        counts = weights.new_zeros(num_seqs).index_add_(0, seq, weights)
        num_nonempty = (counts > 0).sum().clamp_min(1).to(compute_dtype)
        if options.loss_agg == "seq_mean_token_mean":
            weights = weights / (counts[seq].clamp_min(1.0) * num_nonempty)
        else:
            weights = weights / num_nonempty
    if token_weights is not None:
        weights = weights * cast(token_weights)
    return TokenInputs(
        target=torch.where(active, target.long(), torch.zeros((), dtype=torch.long, device=target.device)),
        advantages=cast(advantages),
        old_logprobs=cast(old_logprobs),
        ref_logprobs=cast(ref_logprobs),
        behavior_logprobs=cast(behavior_logprobs),
        token_weights=weights,
        active=active,
    )


def _masked_mean(values: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    count = active.sum().clamp_min(1)
    return (
        torch.where(active, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum() / count
    )


@torch.no_grad()
def policy_head(
    logprobs: torch.Tensor, entropy: torch.Tensor, inputs: TokenInputs, options: PolicyLossOptions
) -> HeadOutput:
    """Per-token objective, its analytic derivatives w.r.t. logp and H, and the diagnostics."""
    advantages = inputs.advantages
    old = inputs.old_logprobs if inputs.old_logprobs is not None else logprobs
    log_ratio = logprobs - old
    ratio_live = (log_ratio >= -LOG_RATIO_LIMIT) & (log_ratio <= LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - options.clip_low, 1.0 + options.clip_high)
    is_clipped = clipped > unclipped
    pg_loss = torch.maximum(unclipped, clipped)
    d_pg = torch.where(is_clipped | ~ratio_live, torch.zeros_like(ratio), -advantages * ratio)
    metrics: dict[str, torch.Tensor] = {}
    active = inputs.active
    if options.dual_clip is not None:
        cap = -options.dual_clip * advantages
        dual = (advantages < 0) & (pg_loss > cap)
        pg_loss = torch.where(dual, cap, pg_loss)
        d_pg = torch.where(dual, torch.zeros_like(d_pg), d_pg)
        metrics["dual_clip_frac"] = _masked_mean(dual.to(ratio.dtype), active)
    if inputs.behavior_logprobs is not None:
        # The training/inference mismatch: trainer log-probs vs the engine's sampler log-probs.
        metrics["behavior_logprob_gap"] = _masked_mean((logprobs - inputs.behavior_logprobs).abs(), active)
    if inputs.behavior_logprobs is not None and options.tis_cap is not None:
        raw_weight = torch.exp((old - inputs.behavior_logprobs).clamp(max=LOG_RATIO_LIMIT))
        tis_weight = raw_weight.clamp(max=options.tis_cap)
        pg_loss = pg_loss * tis_weight
        d_pg = d_pg * tis_weight
        metrics["tis_frac_capped"] = _masked_mean((raw_weight > options.tis_cap).to(ratio.dtype), active)
    per_token = pg_loss
    d_logp = d_pg
    if inputs.ref_logprobs is not None:
        kl, d_kl = _kl(logprobs - inputs.ref_logprobs, options.kl_type)
        metrics["kl_ref"] = _masked_mean(kl, active)
        if options.kl_coef != 0:
            per_token = per_token + options.kl_coef * kl
            d_logp = d_logp + options.kl_coef * d_kl
    if options.entropy_coef != 0:
        per_token = per_token - options.entropy_coef * entropy
    weights = inputs.token_weights
    loss = torch.where(active, weights * per_token, torch.zeros_like(per_token)).sum()
    grad_logprobs = torch.where(active, weights * d_logp, torch.zeros_like(d_logp))
    grad_entropy = -options.entropy_coef * weights if options.entropy_coef != 0 else None

    dtype = ratio.dtype
    metrics["clip_frac_low"] = _masked_mean((is_clipped & (advantages < 0)).to(dtype), active)
    metrics["clip_frac_high"] = _masked_mean((is_clipped & (advantages > 0)).to(dtype), active)
    metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
    # k3 estimate of KL(old || current) from samples of the old policy.
    metrics["approx_kl"] = _masked_mean(
        ratio - 1.0 - log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT), active
    )
    metrics["ratio_mean"] = _masked_mean(ratio, active)
    metrics["entropy"] = _masked_mean(entropy, active)
    metrics["pg_loss"] = torch.where(active, weights * pg_loss, torch.zeros_like(pg_loss)).sum()
    return HeadOutput(loss, grad_logprobs, grad_entropy, {k: v.float() for k, v in metrics.items()})


def _kl(diff: torch.Tensor, kl_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """KL estimate and its derivative w.r.t. logp, with ``diff = logp - ref``."""
    if kl_type == "k1":
        return diff, torch.ones_like(diff)
    if kl_type == "k2":
        return 0.5 * diff * diff, diff
    exp_neg = torch.exp((-diff).clamp(max=LOG_RATIO_LIMIT))
    live = -diff <= LOG_RATIO_LIMIT
    return exp_neg + diff - 1.0, 1.0 - torch.where(live, exp_neg, torch.zeros_like(exp_neg))


def compact(inputs: TokenInputs) -> tuple[torch.Tensor | None, TokenInputs]:
    """Keep only the loss tokens (mask True): ``(rows kept or None when all are, their inputs)``.

    Exact: a masked token has weight 0 and is left out of every metric. In multi-turn dialogue most
    tokens are the customer's, so the lm_head GEMMs shrink by that share. One host sync (the count).
    """
    if bool(inputs.active.all()):
        return None, inputs
    rows = inputs.active.nonzero()[:, 0]

    def take(values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else values[rows]

    return rows, TokenInputs(
        target=inputs.target[rows],
        advantages=inputs.advantages[rows],
        old_logprobs=take(inputs.old_logprobs),
        ref_logprobs=take(inputs.ref_logprobs),
        behavior_logprobs=take(inputs.behavior_logprobs),
        token_weights=inputs.token_weights[rows],
        active=inputs.active[rows],
    )
