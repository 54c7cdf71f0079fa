"""CISPO: the importance weight clipped and detached, times the log-prob (REINFORCE-style).

Source: MiniMax-M1 (arXiv 2506.13585); verl 0.9.1 ``compute_policy_loss_cispo``:
``l = -sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * logp``. TRL and Liger's CISPO clip the weight
from above only: ``clip_low=None`` here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duca_fast.ops.policy_loss.objectives import register
from duca_fast.ops.policy_loss.objectives.base import (
    LOG_RATIO_LIMIT,
    Objective,
    ObjectiveBatch,
    ObjectiveTerms,
    check_number,
    masked_mean,
    reference_share,
)


@register
@dataclass(frozen=True)
class CISPO(Objective):
    """``l = -sg(clip(r, 1 - clip_low, 1 + clip_high)) A logp`` (verl: "cispo")."""

    clip_low: float | None = None
    """Lower clip of the weight; None: no lower bound (TRL/Liger). verl's cispo clips both sides."""
    clip_high: float | None = None
    """Upper clip of the weight (None: the options' clip_high)."""

    name = "cispo"
    inherits = ("clip_high",)

    def validate(self) -> None:
        if self.clip_low is not None:
            check_number("CISPO", "clip_low", self.clip_low, minimum=0.0, below=1.0)
        check_number("CISPO", "clip_high", self.clip_high, minimum=0.0)

    def _bounds(self) -> tuple[float, float]:
        return (0.0 if self.clip_low is None else 1.0 - self.clip_low), 1.0 + self.clip_high

    def terms(self, batch: ObjectiveBatch) -> ObjectiveTerms:
        low, high = self._bounds()
        ratio = torch.exp((batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        weight = ratio.clamp(low, high)
        dtype = ratio.dtype
        metrics = {
            "clip_frac_low": masked_mean((ratio < low).to(dtype), batch.active),
            "clip_frac_high": masked_mean((ratio > high).to(dtype), batch.active),
        }
        coefficient = -weight * batch.advantages
        return ObjectiveTerms(coefficient * batch.logprobs, batch.weights * coefficient, metrics)

    def reference(self, logprobs, old_logprobs, advantages, active, seq_ids):
        low, high = self._bounds()
        ratio = torch.exp(torch.clamp(logprobs - old_logprobs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        kept = torch.clamp(ratio, low, high).detach()

        return -kept * advantages * logprobs, {
            "clip_frac_low": reference_share(ratio < low, active),
            "clip_frac_high": reference_share(ratio > high, active),
        }
