"""PPO's clipped surrogate, with DAPO's asymmetric bounds, dual clip and TRL's two-sided ``delta``.

Sources: PPO (Schulman et al. 2017, arXiv 1707.06347); DAPO's clip-higher (arXiv 2503.14476); dual clip
(Ye et al., arXiv 1912.09729) as verl 0.9.1 ``compute_policy_loss_vanilla`` applies it (``clip_ratio_c``);
``delta`` as TRL's ``GRPOTrainer`` applies ``GRPOConfig.delta`` (the unclipped ratio capped at delta,
from the two-sided GRPO clipping of arXiv 2505.22257).
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
class PPOClip(Objective):
    """``l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``; with ``dual_clip=c`` and A < 0,
    ``l = min(l, -c A)``; with ``delta``, the unclipped ``r`` is ``min(r, delta)`` (verl: "vanilla")."""

    clip_low: float | None = None
    """Below-1 clip range (None: the options' clip_low, default 0.2)."""
    clip_high: float | None = None
    """Above-1 clip range (None: the options' clip_high; DAPO uses a larger value, e.g. 0.28)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for A < 0 (None: the options' dual_clip, default off; verl's clip_ratio_c)."""
    delta: float | None = None
    """TRL's two-sided clip: the unclipped ratio is capped at delta (> 1); None: off."""

    name = "ppo_clip"
    inherits = ("clip_low", "clip_high", "dual_clip")

    def validate(self) -> None:
        check_number("PPOClip", "clip_low", self.clip_low, minimum=0.0, below=1.0)
        check_number("PPOClip", "clip_high", self.clip_high, minimum=0.0)
        if self.dual_clip is not None:
            check_number("PPOClip", "dual_clip", self.dual_clip, above=1.0)
        if self.delta is not None:
            check_number("PPOClip", "delta", self.delta, above=1.0)

    def terms(self, batch: ObjectiveBatch) -> ObjectiveTerms:
        advantages, active = batch.advantages, batch.active
        log_ratio = batch.logprobs - batch.old_logprobs
        live = log_ratio.abs() <= LOG_RATIO_LIMIT
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        low, high = 1.0 - self.clip_low, 1.0 + self.clip_high
        first = ratio if self.delta is None else ratio.clamp(max=self.delta)
        unclipped = -advantages * first
        clipped = -advantages * ratio.clamp(low, high)
        loss = torch.maximum(unclipped, clipped)
        # The gradient flows through the branch the max took, where that branch's clamp passes r: the
        # clipped branch inside [low, high] (with delta < 1 + clip_high it can win there), the unclipped
        # one below delta.
        passes = torch.where(
            clipped > unclipped,
            (ratio >= low) & (ratio <= high),
            torch.ones_like(live) if self.delta is None else ratio <= self.delta,
        )
        d_loss = torch.where(passes & live, -advantages * ratio, torch.zeros_like(ratio))
        dtype = ratio.dtype
        metrics = {
            "clip_frac_low": masked_mean(((ratio < low) & (advantages < 0)).to(dtype), active),
            "clip_frac_high": masked_mean(((ratio > high) & (advantages > 0)).to(dtype), active),
        }
        if self.dual_clip is not None:
            cap = -self.dual_clip * advantages
            dual = (advantages < 0) & (loss > cap)
            loss = torch.where(dual, cap, loss)
            d_loss = torch.where(dual, torch.zeros_like(d_loss), d_loss)
            metrics["dual_clip_frac"] = masked_mean(dual.to(dtype), active)
        return ObjectiveTerms(loss, batch.weights * d_loss, metrics)

    def reference(self, logprobs, old_logprobs, advantages, active, seq_ids):
        log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        ratio = torch.exp(log_ratio)
        low, high = 1.0 - self.clip_low, 1.0 + self.clip_high
        plain = ratio if self.delta is None else torch.clamp(ratio, max=self.delta)
        surrogate = torch.maximum(-advantages * plain, -advantages * ratio.clamp(low, high))
        metrics = {
            "clip_frac_low": reference_share((advantages < 0) & (ratio < low), active),
            "clip_frac_high": reference_share((advantages > 0) & (ratio > high), active),
        }
        if self.dual_clip is not None:
            capped = (advantages < 0) & (surrogate > -self.dual_clip * advantages)
            surrogate = torch.where(capped, -self.dual_clip * advantages, surrogate)
            metrics["dual_clip_frac"] = reference_share(capped, active)
        return surrogate, metrics
