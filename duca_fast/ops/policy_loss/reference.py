"""Float64 ground truth of the policy-loss ops, written from the raw inputs as DESIGN.md states them.

Materialized logits, autograd for the gradients, explicit loops for the per-sequence aggregations.
It shares no helper with the fast paths (no ``policy_head``, no aggregation weights, no metric code):
an aggregation or metric bug there shows up as a difference in the tests.
"""

from __future__ import annotations

import math

import torch

from duca_fast.ops.policy_loss.correction import RolloutCorrection, parse_correction
from duca_fast.ops.policy_loss.options import LOG_RATIO_LIMIT, PolicyLossOptions


def _mean_over(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``selected``; 0 when nothing is selected."""
    chosen = values[selected]
    return chosen.mean() if chosen.numel() else values.new_zeros(())


def reference_token_stats(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target and entropy of each row of (already tempered) float64 logits."""
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    # 0 * log 0 = 0 for -inf logits; the where also keeps their gradient at 0 instead of NaN.
    safe = torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))
    entropy = -(probs * safe).sum(-1)
    return log_probs.gather(1, target.long().clamp_min(0)[:, None])[:, 0], entropy


def _aggregate(
    values: torch.Tensor, active: torch.Tensor, seq_ids, options: PolicyLossOptions
) -> torch.Tensor:
    if options.loss_agg == "token_mean":
        return values[active].sum() / max(int(active.sum()), 1)
    if options.loss_agg == "token_sum_norm":
        return values[active].sum() / options.max_tokens
    per_sequence = []
    for seq in sorted(set(seq_ids[active].tolist())):
        members = active & (seq_ids == seq)
        total = values[members].sum()
        per_sequence.append(
            total / int(members.sum()) if options.loss_agg == "seq_mean_token_mean" else total
        )
    if not per_sequence:
        return values.sum() * 0.0
    return torch.stack(per_sequence).mean()


def reference_policy_loss_from_logprobs(
    logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    *,
    mask: torch.Tensor | None,
    seq_ids: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    behavior_logprobs: torch.Tensor | None,
    options: PolicyLossOptions,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy objective on float64 log-probs (differentiable through ``logprobs`` and ``entropy``).

    ``token_weights`` multiplies each token's loss (and its policy-gradient part, ``pg_loss``) before
    the aggregation; the other metrics stay plain means over the active tokens.
    """
    count = logprobs.shape[0]
    active = torch.ones(count, dtype=torch.bool) if mask is None else mask.bool().cpu()
    active = active.to(logprobs.device)
    zero = torch.zeros((), dtype=torch.float64, device=logprobs.device)
    correction_weights, correction_metrics = None, {}
    if options.correction:
        correction_weights, keep, correction_metrics = _reference_correction(
            parse_correction(options.correction), old_logprobs, behavior_logprobs, active, seq_ids
        )
        active = active & keep

    def clean(values: torch.Tensor | None) -> torch.Tensor | None:
        # Masked tokens may carry anything (NaN included); they take no part in the sums below.
        return None if values is None else torch.where(active, values.double(), zero)

    logp = torch.where(active, logprobs.double(), zero)
    adv = clean(advantages)
    old = logp.detach() if old_logprobs is None else clean(old_logprobs)
    log_ratio = (logp - old).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    seq = None if seq_ids is None else seq_ids.long().to(logp.device)
    surrogate, metrics = options.resolved_objective().reference(logp, old, adv, active, seq)
    metrics = dict(metrics)
    metrics.setdefault("clip_frac_low", zero)
    metrics.setdefault("clip_frac_high", zero)
    metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
    metrics["approx_kl"] = _mean_over((ratio - 1.0 - log_ratio).detach(), active)
    metrics["ratio_mean"] = _mean_over(ratio.detach(), active)
    if behavior_logprobs is not None:
        behavior = clean(behavior_logprobs)
        metrics["behavior_logprob_gap"] = _mean_over((logp - behavior).abs().detach(), active)
        if correction_weights is not None:
            surrogate = surrogate * correction_weights
        metrics.update(correction_metrics)
        if options.tis_cap is not None:
            importance = torch.exp((old - behavior).clamp(max=LOG_RATIO_LIMIT)).detach()
            surrogate = surrogate * importance.clamp(max=options.tis_cap)
            metrics["tis_frac_capped"] = _mean_over((importance > options.tis_cap).double(), active)
    surrogate = _reference_masks(
        surrogate, logp, entropy, old, adv, behavior_logprobs, active, seq, options, metrics
    )
    per_token = surrogate
    if ref_logprobs is not None:
        diff = logp - clean(ref_logprobs)
        if options.kl_type == "k1":
            kl = diff
        elif options.kl_type == "k2":
            kl = diff**2 / 2
        else:
            kl = torch.exp((-diff).clamp(max=LOG_RATIO_LIMIT)) + diff - 1
        metrics["kl_ref"] = _mean_over(kl.detach(), active)
        per_token = per_token + options.kl_coef * kl
    if entropy is not None:
        entropy64 = torch.where(active, entropy.double(), zero)
        metrics["entropy"] = _mean_over(entropy64.detach(), active)
        per_token = per_token - options.entropy_coef * entropy64
    if token_weights is not None:
        weight = clean(token_weights)
        surrogate, per_token = surrogate * weight, per_token * weight
    metrics["pg_loss"] = _aggregate(surrogate.detach(), active, seq, options)
    loss = _aggregate(per_token, active, seq, options)
    return loss, {name: value.detach().float() for name, value in metrics.items()}


def _reference_masks(surrogate, logp, entropy, old, adv, behavior_logprobs, active, seq, options, metrics):
    """top_entropy_quantile and off_policy_mask on the policy-gradient term, written out token by token."""
    rows = [i for i in range(logp.shape[0]) if bool(active[i])]
    factor = [1.0] * logp.shape[0]
    if options.top_entropy_quantile < 1.0:
        values = sorted(float(entropy[i]) for i in rows)
        threshold = math.inf
        if values:
            position = (1.0 - options.top_entropy_quantile) * (len(values) - 1)
            low = math.floor(position)
            high = min(low + 1, len(values) - 1)
            threshold = values[low] + (position - low) * (values[high] - values[low])
        kept = [i for i in rows if float(entropy[i]) >= threshold] if values else rows
        for i in rows:
            factor[i] *= 1.0 if i in kept else 0.0
        metrics["entropy_mask_kept"] = torch.tensor(len(kept) / max(len(rows), 1), dtype=torch.float64)
    if options.off_policy_mask is not None:
        reference = old if behavior_logprobs is None else behavior_logprobs.double()
        gaps: dict[int, list[float]] = {}
        for i in rows:
            gaps.setdefault(int(seq[i]), []).append(float(reference[i]) - float(logp[i]))
        dropped = [
            i
            for i in rows
            if float(adv[i]) < 0 and sum(gaps[int(seq[i])]) / len(gaps[int(seq[i])]) > options.off_policy_mask
        ]
        for i in dropped:
            factor[i] = 0.0
        metrics["off_policy_masked"] = torch.tensor(len(dropped) / max(len(rows), 1), dtype=torch.float64)
    return surrogate * torch.tensor(factor, dtype=torch.float64, device=surrogate.device)


def _tempered_logits(hidden, weight, bias, temperature) -> torch.Tensor:
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return logits / temperature


def reference_token_logprobs(hidden, weight, target, bias, temperature) -> tuple[torch.Tensor, torch.Tensor]:
    return reference_token_stats(_tempered_logits(hidden, weight, bias, temperature), target)


def reference_sum_p2(hidden, weight, bias, temperature) -> torch.Tensor:
    """sum_v softmax(z)_v^2 per token, float64, no gradient."""
    with torch.no_grad():
        return torch.softmax(_tempered_logits(hidden, weight, bias, temperature), dim=-1).pow(2).sum(-1)


def reference_fused_policy_loss(
    hidden, weight, target, advantages, old_logprobs, *, bias, options: PolicyLossOptions, **token_args
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = _tempered_logits(hidden, weight, bias, options.temperature)
    return reference_policy_loss_from_logits(
        logits, target, advantages, old_logprobs, options=options, **token_args
    )


def reference_policy_loss_from_logits(
    logits,
    target,
    advantages,
    old_logprobs,
    *,
    options: PolicyLossOptions,
    tempered: bool = True,
    **token_args,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``tempered=False``: divide the logits by the temperature first."""
    logits = logits.double() if tempered else logits.double() / options.temperature
    mask = token_args.get("mask")
    if mask is not None:
        target = torch.where(mask.bool(), target.long(), torch.zeros_like(target, dtype=torch.long))
    logprobs, entropy = reference_token_stats(logits, target)
    return reference_policy_loss_from_logprobs(
        logprobs, entropy, advantages, old_logprobs, options=options, **token_args
    )


def _reference_correction(correction: RolloutCorrection, old_logprobs, behavior_logprobs, active, seq_ids):
    """The rollout correction written out token by token and sequence by sequence (verl's rules)."""
    import math

    d = [
        float(o) - float(b) if a else 0.0 for o, b, a in zip(old_logprobs, behavior_logprobs, active.tolist())
    ]
    act = active.tolist()
    seqs = [0] * len(d) if seq_ids is None else seq_ids.tolist()
    members = {}
    for i, s_id in enumerate(seqs):
        if act[i]:
            members.setdefault(s_id, []).append(i)
    n = max(sum(act), 1)
    weights = None
    metrics = {}
    if correction.rollout_is is not None:
        upper, lower = correction.is_bounds()
        raw = [0.0] * len(d)
        for i in range(len(d)):
            if not act[i]:
                continue
            x = d[i] if correction.rollout_is == "token" else sum(d[j] for j in members[seqs[i]])
            raw[i] = math.exp(min(max(x, -20.0), 20.0))
        if lower is None:
            weights = [min(w, upper) for w in raw]
        else:
            weights = [w if lower <= w <= upper else 0.0 for w in raw]
        kept = [weights[i] for i in range(len(d)) if act[i]]
        mean = sum(kept) / n
        capped = [min(max(w, 0.0), upper) for w in kept]
        capped_mean = sum(capped) / n
        metrics = {
            "correction_weight_mean": mean,
            "correction_weight_min": min(kept, default=0.0),
            "correction_weight_max": max(kept, default=0.0),
            "correction_ess": 1.0 / max(sum((w / (capped_mean + 1e-8)) ** 2 for w in capped) / n, 1e-30),
        }
        if correction.rollout_is_batch_normalize:
            if correction.rollout_is == "token":
                norm = sum(kept) / (len(kept) + 1e-8)
            else:
                per_seq = [sum(weights[j] for j in idx) / (len(idx) + 1e-8) for idx in members.values()]
                norm = sum(per_seq) / max(len(per_seq), 1e-8)
            if norm > 1e-8:
                weights = [w / norm for w in weights]
    keep = list(act)
    for rule, lower, upper in correction.rs_bounds():

        def token_stat(x, kind=rule[-2:]):
            x = min(max(x, -20.0), 20.0)
            return {"k1": -x, "k2": 0.5 * x * x, "k3": math.exp(x) - 1.0 - x}[kind]

        for i in range(len(d)):
            if not act[i]:
                continue
            if rule.startswith("token"):
                stat = token_stat(d[i])
            else:
                values = [token_stat(d[j]) for j in members[seqs[i]]]
                if rule.startswith("seq_sum"):
                    stat = sum(values)
                elif rule.startswith("seq_mean"):
                    stat = sum(values) / (len(values) + 1e-8)
                else:
                    stat = max(values)
            ok = stat <= upper if lower is None else lower <= stat <= upper
            keep[i] = keep[i] and ok
    metrics["correction_rejected_frac"] = sum(1 for a, k in zip(act, keep) if a and not k) / n
    as_tensor = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in metrics.items()}
    weights_t = None if weights is None else torch.tensor(weights, dtype=torch.float64, device=active.device)
    return weights_t, torch.tensor(keep, dtype=torch.bool, device=active.device), as_tensor
