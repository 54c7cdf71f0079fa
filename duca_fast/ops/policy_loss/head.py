"""The per-token policy head shared by the fast paths: input preparation, objective, derivatives, metrics.

The float64 reference (``reference.py``) does not use this module: it aggregates and computes every
metric on its own, so that a bug here shows up as a difference in the tests.
"""

from __future__ import annotations

import torch

from duca_fast.ops._checks import ValueChecks, check_tensor
from duca_fast.ops.policy_loss.correction import apply_correction, parse_correction
from duca_fast.ops.policy_loss.objectives import ObjectiveBatch
from duca_fast.ops.policy_loss.objectives.base import masked_mean
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
    objective = options.resolved_objective()
    if objective.needs_seq_ids() and seq_ids is None:
        raise ValueError(f"objective {objective.name!r} needs seq_ids (the sequence of each token)")
    if options.off_policy_mask is not None and seq_ids is None:
        raise ValueError("off_policy_mask needs seq_ids (the sequence of each token)")

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
    correction = parse_correction(options.correction)
    correction_weights = correction_metrics = None
    if correction is not None:
        if old_logprobs is None or behavior_logprobs is None:
            raise ValueError(
                "correction needs old_logprobs and behavior_logprobs (the engine's sampler log-probs)"
            )
        if correction.needs_seq_ids() and seq_ids is None:
            raise ValueError("correction with sequence-level weights or rules needs seq_ids")
        correction_weights, keep, correction_metrics = apply_correction(
            correction,
            old_logprobs.to(compute_dtype),
            behavior_logprobs.to(compute_dtype),
            active,
            seq_ids,
        )
        active = keep  # rejected tokens leave the loss and its normalizer

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
        seq_ids=None if seq_ids is None else seq_ids.long(),
        correction_weights=None if correction_weights is None else cast(correction_weights),
        correction_metrics=correction_metrics,
    )


@torch.no_grad()
def policy_head(
    logprobs: torch.Tensor, entropy: torch.Tensor, inputs: TokenInputs, options: PolicyLossOptions
) -> HeadOutput:
    """Per-token objective (``options.objective``), its analytic derivatives w.r.t. logp and H, and the
    diagnostics. The rollout correction's weights multiply the objective's term (they reach it through its
    aggregation weights, so they also scale a sequence-level objective's cross-token gradient); KL and
    the entropy bonus are added per token."""
    advantages = inputs.advantages
    old = inputs.old_logprobs if inputs.old_logprobs is not None else logprobs
    metrics: dict[str, torch.Tensor] = {}
    active = inputs.active
    weights = inputs.token_weights
    if inputs.behavior_logprobs is not None:
        # The training/inference mismatch: trainer log-probs vs the engine's sampler log-probs.
        metrics["behavior_logprob_gap"] = masked_mean((logprobs - inputs.behavior_logprobs).abs(), active)
    pg_weights = weights if inputs.correction_weights is None else weights * inputs.correction_weights
    if inputs.correction_metrics is not None:
        metrics.update(inputs.correction_metrics)
    if inputs.behavior_logprobs is not None and options.tis_cap is not None:
        raw_weight = torch.exp((old - inputs.behavior_logprobs).clamp(max=LOG_RATIO_LIMIT))
        pg_weights = weights * raw_weight.clamp(max=options.tis_cap)
        metrics["tis_frac_capped"] = masked_mean((raw_weight > options.tis_cap).to(logprobs.dtype), active)
    pg_weights = _token_masks(logprobs, entropy, old, inputs, options, pg_weights, metrics)
    terms = options.resolved_objective().terms(
        ObjectiveBatch(logprobs, old, advantages, pg_weights, active, inputs.seq_ids)
    )
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    pg_loss = torch.where(active, pg_weights * terms.loss, zero).sum()
    loss = pg_loss
    d_logp = terms.grad
    if inputs.ref_logprobs is not None:
        kl, d_kl = _kl(logprobs - inputs.ref_logprobs, options.kl_type)
        metrics["kl_ref"] = masked_mean(kl, active)
        if options.kl_coef != 0:
            loss = loss + torch.where(active, weights * options.kl_coef * kl, zero).sum()
            d_logp = d_logp + weights * options.kl_coef * d_kl
    if options.entropy_coef != 0:
        loss = loss - torch.where(active, weights * options.entropy_coef * entropy, zero).sum()
    grad_logprobs = torch.where(active, d_logp, torch.zeros_like(d_logp))
    grad_entropy = -options.entropy_coef * weights if options.entropy_coef != 0 else None

    log_ratio = (logprobs - old).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    for key in ("clip_frac_low", "clip_frac_high", "dual_clip_frac"):
        if key in terms.metrics:
            metrics[key] = terms.metrics[key]
    metrics.setdefault("clip_frac_low", zero)
    metrics.setdefault("clip_frac_high", zero)
    metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
    # k3 estimate of KL(old || current) from samples of the old policy.
    metrics["approx_kl"] = masked_mean(ratio - 1.0 - log_ratio, active)
    metrics["ratio_mean"] = masked_mean(ratio, active)
    metrics["entropy"] = masked_mean(entropy, active)
    metrics["pg_loss"] = pg_loss
    return HeadOutput(loss, grad_logprobs, grad_entropy, {k: v.float() for k, v in metrics.items()})


def _token_masks(
    logprobs, entropy, old, inputs: TokenInputs, options: PolicyLossOptions, pg_weights, metrics
):
    """``pg_weights`` with the top-entropy and off-policy masks applied (the policy-gradient term only)."""
    active = inputs.active
    if options.top_entropy_quantile < 1.0:
        values = entropy.float()[active]
        if values.numel():
            threshold = torch.quantile(values, 1.0 - options.top_entropy_quantile)
            kept = active & (entropy.float() >= threshold)
        else:
            kept = active
        pg_weights = pg_weights * kept.to(pg_weights.dtype)
        metrics["entropy_mask_kept"] = masked_mean(kept.to(logprobs.dtype), active)
    if options.off_policy_mask is not None:
        reference = inputs.behavior_logprobs if inputs.behavior_logprobs is not None else old
        gap = torch.where(active, reference - logprobs.detach(), torch.zeros_like(logprobs))
        seq = inputs.seq_ids
        size = int(seq.max()) + 1 if seq.numel() else 0
        sums = gap.new_zeros(size).index_add_(0, seq, gap)
        counts = gap.new_zeros(size).index_add_(0, seq, active.to(gap.dtype))
        drifted = (sums / counts.clamp_min(1.0))[seq] > options.off_policy_mask
        dropped = active & drifted & (inputs.advantages < 0)
        pg_weights = torch.where(dropped, torch.zeros_like(pg_weights), pg_weights)
        metrics["off_policy_masked"] = masked_mean(dropped.to(logprobs.dtype), active)
    return pg_weights


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
        seq_ids=take(inputs.seq_ids),
        correction_weights=take(inputs.correction_weights),
        correction_metrics=inputs.correction_metrics,
    )


def fixed_chunks(num_rows: int, rows_per_chunk: int) -> list[slice]:
    return [
        slice(start, min(start + rows_per_chunk, num_rows)) for start in range(0, num_rows, rows_per_chunk)
    ]


def sequence_chunks(seq_ids: torch.Tensor, rows_per_chunk: int) -> list[slice] | None:
    """Chunks of at most ``rows_per_chunk`` rows that end on sequence boundaries, so that a sequence-level
    objective sees whole sequences in every chunk; None when a sequence is longer than a chunk or its
    tokens are not contiguous (the caller then runs two passes). One host sync."""
    num_rows = seq_ids.shape[0]
    if num_rows == 0:
        return []
    starts = [0, *(torch.nonzero(seq_ids[1:] != seq_ids[:-1])[:, 0] + 1).tolist()]
    if torch.unique(seq_ids[starts]).numel() != len(starts):
        return None  # a sequence id appears in two runs: not packed
    ends = [*starts[1:], num_rows]
    chunks, chunk_start = [], 0
    for start, end in zip(starts, ends):
        if end - start > rows_per_chunk:
            return None
        if end - chunk_start > rows_per_chunk:
            chunks.append(slice(chunk_start, start))
            chunk_start = start
    chunks.append(slice(chunk_start, num_rows))
    return chunks


def head_rows(head: HeadOutput, rows: slice) -> HeadOutput:
    """The per-token derivatives of a whole-batch head for some rows (the two-pass path)."""
    grad_entropy = None if head.grad_entropy is None else head.grad_entropy[rows]
    return HeadOutput(head.loss, head.grad_logprobs[rows], grad_entropy, head.metrics)
