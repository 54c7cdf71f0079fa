"""GMPO: the geometric mean of token ratios per sequence, each token's log-ratio clipped.

Source: Zhao et al., "Geometric-Mean Policy Optimization" (arXiv 2507.20673, code
``callsys/GMPO``); verl 0.9.1 ``compute_policy_loss_geo_mean``: per sequence,
``ratio = exp(mean_t sgn(A_t) min(sgn(A_t) d_t, sgn(A_t) clip(d_t, -clip_low, clip_high)))`` with
``d = logp - old``, the sequence's mean advantage ``A_bar``, and the loss ``-A_bar * ratio`` averaged over
sequences (verl ignores ``loss_agg_mode``; here the per-token loss is the sequence's loss, so
``loss_agg="seq_mean_token_mean"`` gives verl's mean over sequences that have loss tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duca_fast.ops.policy_loss.objectives import register
from duca_fast.ops.policy_loss.objectives.base import (
    Objective,
    ObjectiveBatch,
    ObjectiveTerms,
    check_number,
    masked_mean,
    reference_share,
    sequence_sums,
)

EPS = 1e-8
"""verl's ``+ 1e-8`` in both per-sequence means (kept for exact agreement)."""


@register
@dataclass(frozen=True)
class GeoMean(Objective):
    """GMPO (verl: "geo_mean"); its gradient at a token involves every token of the sequence."""

    clip_low: float | None = None
    """Clip of the log-ratio below 0 (None: the options' clip_low). GMPO's paper uses 0.4."""
    clip_high: float | None = None
    """Clip of the log-ratio above 0 (None: the options' clip_high). GMPO's paper uses 0.4."""

    name = "geo_mean"
    sequence_level = True
    inherits = ("clip_low", "clip_high")
    takes_correction_weights = False

    def validate(self) -> None:
        check_number("GeoMean", "clip_low", self.clip_low, minimum=0.0)
        check_number("GeoMean", "clip_high", self.clip_high, minimum=0.0)

    def terms(self, batch: ObjectiveBatch) -> ObjectiveTerms:
        advantages, active, seq = batch.advantages, batch.active, batch.seq_ids
        log_ratio = batch.logprobs - batch.old_logprobs
        sign = torch.sign(advantages)
        bounded = log_ratio.clamp(-self.clip_low, self.clip_high)
        plain, capped = sign * log_ratio, sign * bounded
        chosen = sign * torch.minimum(plain, capped)
        lengths = sequence_sums(active.to(log_ratio.dtype), seq, active)
        ratio = torch.exp(sequence_sums(chosen, seq, active) / (lengths + EPS))
        mean_advantage = sequence_sums(advantages, seq, active) / (lengths + EPS)
        sequence_loss = -mean_advantage * ratio
        # d chosen / d log_ratio, with torch.minimum's even split on ties (as autograd in verl's code).
        inside = ((log_ratio >= -self.clip_low) & (log_ratio <= self.clip_high)).to(log_ratio.dtype)
        slope = torch.where(plain < capped, 1.0, torch.where(capped < plain, inside, 0.5 * (1.0 + inside)))
        d_chosen = sign * sign * slope
        sequence_weight = sequence_sums(batch.weights, seq, active)
        grad = sequence_weight * -mean_advantage * ratio * d_chosen / (lengths + EPS)
        clipped = log_ratio != bounded
        dtype = log_ratio.dtype
        metrics = {
            "clip_frac_low": masked_mean((clipped & (advantages < 0)).to(dtype), active),
            "clip_frac_high": masked_mean((clipped & (advantages > 0)).to(dtype), active),
        }
        return ObjectiveTerms(sequence_loss, torch.where(active, grad, torch.zeros_like(grad)), metrics)

    def reference(self, logprobs, old_logprobs, advantages, active, seq_ids):
        per_token = torch.zeros_like(logprobs)
        for seq in sorted(set(seq_ids[active].tolist())):
            members = active & (seq_ids == seq)
            d = logprobs[members] - old_logprobs[members]
            a = advantages[members]
            sign = torch.sign(a)
            kept = sign * torch.min(sign * d, sign * torch.clamp(d, -self.clip_low, self.clip_high))
            count = int(members.sum())
            loss = -(a.sum() / (count + EPS)) * torch.exp(kept.sum() / (count + EPS))
            per_token = torch.where(members, loss, per_token)
        d = logprobs - old_logprobs
        clipped = (d != d.clamp(-self.clip_low, self.clip_high)) & active

        return per_token, {
            "clip_frac_low": reference_share(clipped & (advantages < 0), active),
            "clip_frac_high": reference_share(clipped & (advantages > 0), active),
        }
