"""DGPO: instead of zeroing the gradient outside PPO's clip range, decay it smoothly.

Source: arXiv 2603.14389, code ``VenomRose-Juri/DGPO-RL`` (``compute_policy_loss`` in
``verl/trainer/ppo/core_algos.py``, ``ratio_mode="dgpo"``). With ``r = exp(logp - old)``,
``lb = 1 - clip_low``, ``ub = 1 + clip_high``:

- A < 0 and r < lb: the ratio becomes ``r sg(r)^n / lb^n`` (value ``r^(n+1) / lb^n``, equal to lb at
  r = lb; the gradient decays as r falls);
- A > 0 and r > ub: ``r sg(r)^(-1/m) ub^(1/m)`` (value ``ub^(1/m) r^(1-1/m)``, equal to ub at r = ub);
- otherwise the plain ratio, unclipped (as in their code; no dual clip).

``l = -A * ratio``. Defaults ``n=1``, ``m=2`` from their ``actor.yaml``.
"""

from __future__ import annotations

import math
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
class DGPO(Objective):
    """Decoupled decay of the boundary tokens' gradients (arXiv 2603.14389)."""

    clip_low: float | None = None
    """None: the options' clip_low (their default 0.2)."""
    clip_high: float | None = None
    """None: the options' clip_high (their default 0.2)."""
    n: float = 1.0
    """Decay power below the range for negative advantages (their ``dgpo_n``)."""
    m: float = 2.0
    """Decay root above the range for positive advantages (their ``dgpo_m``)."""

    name = "dgpo"
    inherits = ("clip_low", "clip_high")

    def validate(self) -> None:
        check_number("DGPO", "clip_low", self.clip_low, minimum=0.0, below=1.0)
        check_number("DGPO", "clip_high", self.clip_high, minimum=0.0)
        check_number("DGPO", "n", self.n, minimum=0.0)
        check_number("DGPO", "m", self.m, above=0.0)

    def terms(self, batch: ObjectiveBatch) -> ObjectiveTerms:
        advantages, active = batch.advantages, batch.active
        log_ratio = batch.logprobs - batch.old_logprobs
        live = log_ratio.abs() <= LOG_RATIO_LIMIT
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        low, high = 1.0 - self.clip_low, 1.0 + self.clip_high
        below = (ratio < low) & (advantages < 0)
        above = (ratio > high) & (advantages > 0)
        # The decayed ratios in log space, evaluated only where selected (no overflow elsewhere).
        zero = torch.zeros_like(log_ratio)
        decayed_below = torch.exp(torch.where(below, (self.n + 1) * log_ratio - self.n * math.log(low), zero))
        decayed_above = torch.exp(
            torch.where(above, (1 - 1 / self.m) * log_ratio + math.log(high) / self.m, zero)
        )
        value = torch.where(below, decayed_below, torch.where(above, decayed_above, ratio))
        # d value / d logp equals the value in each branch (the stop-gradient factors are constants).
        slope = torch.where(below | above | live, value, zero)
        dtype = ratio.dtype
        metrics = {
            "clip_frac_low": masked_mean(below.to(dtype), active),
            "clip_frac_high": masked_mean(above.to(dtype), active),
        }
        return ObjectiveTerms(-advantages * value, batch.weights * -advantages * slope, metrics)

    def reference(self, logprobs, old_logprobs, advantages, active, seq_ids):
        # Their branch formulas, transcribed (float64 autograd through logprobs).
        ratio = torch.exp(torch.clamp(logprobs - old_logprobs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        low, high = 1.0 - self.clip_low, 1.0 + self.clip_high
        below = (ratio.detach() < low) & (advantages < 0)
        above = (ratio.detach() > high) & (advantages > 0)
        n, m = self.n, self.m
        lower_branch = torch.exp(logprobs + n * logprobs.detach() - (n + 1) * old_logprobs) / low**n
        upper_branch = torch.exp(
            logprobs + math.log(high) / m - old_logprobs * (m - 1) / m - logprobs.detach() / m
        )
        ratio = torch.where(below, lower_branch, ratio)
        ratio = torch.where(above, upper_branch, ratio)

        return -advantages * ratio, {
            "clip_frac_low": reference_share(below, active),
            "clip_frac_high": reference_share(above, active),
        }
