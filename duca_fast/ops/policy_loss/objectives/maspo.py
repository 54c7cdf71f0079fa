"""MASPO: a Gaussian soft gate on the ratio whose width adapts to the token's probability mass.

Source: arXiv 2602.17550, code ``VenomRose-Juri/MASPO-RL`` (``compute_policy_loss`` in
``verl/trainer/ppo/core_algos.py``, ``ratio_mode="maspo"``). With ``r = exp(logp - old)``,
``s = clamp(sigma_base / p_old^alpha, sigma_base, sigma_max)`` (rarer tokens get a wider gate),
``sigma+ = s clamp(1 + beta_pos A, gate_low, gate_high)``, ``sigma- = s clamp(1 / (1 - beta_neg A),
gate_low, gate_high)`` and the detached gate ``w = exp(-(sg(r) - 1)^2 / (2 sigma^2))``: the ratio is
``w+ r`` for A > 0 and r > 1, ``w- r`` for A < 0 and r < 1, else ``r``; ``l = -A * ratio``. No hard clip.
Defaults from their ``actor.yaml`` (code names: ``maspo_sigma_base``, ``maspo_alpha``, ``maspo_beta_pos``,
``maspo_beta_neg``, ``maspo_sigma_high``, ``maspo_adv_low``, ``maspo_adv_high``).
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
class MASPO(Objective):
    """Mass-adaptive soft gate (arXiv 2602.17550)."""

    sigma_base: float = 1.0
    alpha: float = 0.3
    """How strongly a low old probability widens the gate."""
    beta_pos: float = 0.03
    """Advantage scaling of the gate width for A > 0."""
    beta_neg: float = 0.03
    """Advantage scaling of the gate width for A < 0."""
    sigma_max: float = 10.0
    gate_low: float = 0.1
    """Lower clamp of the advantage factor of the width."""
    gate_high: float = 10.0
    """Upper clamp of the advantage factor of the width."""

    name = "maspo"

    def validate(self) -> None:
        for field in ("sigma_base", "sigma_max", "gate_low", "gate_high"):
            check_number("MASPO", field, getattr(self, field), above=0.0)
        for field in ("alpha", "beta_pos", "beta_neg"):
            check_number("MASPO", field, getattr(self, field), minimum=0.0)

    def _widths(self, old_logprobs, advantages):
        mass = (self.sigma_base / torch.exp(old_logprobs) ** self.alpha).clamp(
            self.sigma_base, self.sigma_max
        )
        positive = mass * (1 + self.beta_pos * advantages).clamp(self.gate_low, self.gate_high)
        negative = mass * (1 / (1 - self.beta_neg * advantages)).clamp(self.gate_low, self.gate_high)
        return positive, negative

    def terms(self, batch: ObjectiveBatch) -> ObjectiveTerms:
        advantages, active = batch.advantages, batch.active
        log_ratio = batch.logprobs - batch.old_logprobs
        live = log_ratio.abs() <= LOG_RATIO_LIMIT
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        width_pos, width_neg = self._widths(batch.old_logprobs, advantages)
        gated_neg = (advantages < 0) & (ratio < 1)
        gated_pos = (advantages > 0) & (ratio > 1)
        width = torch.where(gated_pos, width_pos, width_neg)
        gate = torch.where(gated_neg | gated_pos, torch.exp(-((ratio - 1) ** 2) / 2 / width**2), 1.0)
        value = gate * ratio
        slope = torch.where(live, value, torch.zeros_like(value))  # the gate is detached
        dtype = ratio.dtype
        metrics = {
            "clip_frac_low": masked_mean(gated_neg.to(dtype), active),
            "clip_frac_high": masked_mean(gated_pos.to(dtype), active),
        }
        return ObjectiveTerms(-advantages * value, batch.weights * -advantages * slope, metrics)

    def reference(self, logprobs, old_logprobs, advantages, active, seq_ids):
        # Their gate, transcribed (float64 autograd through logprobs; the gate uses the detached ratio).
        ratio = torch.exp(torch.clamp(logprobs - old_logprobs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        old_prob = torch.exp(old_logprobs)
        base = torch.clamp(self.sigma_base / old_prob**self.alpha, self.sigma_base, self.sigma_max)
        sigma_neg = base * torch.clamp(1 / (1 - self.beta_neg * advantages), self.gate_low, self.gate_high)
        sigma_pos = base * torch.clamp(1 + self.beta_pos * advantages, self.gate_low, self.gate_high)
        detached = ratio.detach()
        weight_neg = torch.exp(-((detached - 1) ** 2) / 2 / sigma_neg**2)
        weight_pos = torch.exp(-((detached - 1) ** 2) / 2 / sigma_pos**2)
        negative_case = (advantages < 0) & (detached < 1)
        positive_case = (advantages > 0) & (detached > 1)
        ratio = torch.where(negative_case, weight_neg * ratio, ratio)
        ratio = torch.where(positive_case, weight_pos * ratio, ratio)

        return -advantages * ratio, {
            "clip_frac_low": reference_share(negative_case, active),
            "clip_frac_high": reference_share(positive_case, active),
        }
