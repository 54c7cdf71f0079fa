"""DPPO (binary TV or binary KL): a trust region on the sampled token's probability, not on its ratio.

Source: arXiv 2602.04879; verl 0.9.1 ``compute_policy_loss_dppo_tv`` / ``compute_policy_loss_dppo_kl``:
``l = -A * sg(min(r, ratio_cap)) * logp * valid``, where a token is valid unless its probability moved
past the threshold in the advantage's direction: TV ``p - p_old <= clip_high`` (A > 0) /
``>= -clip_low`` (A <= 0); KL: the binary KL between ``p_old`` and ``p`` within ``clip_high`` /
``clip_low`` (or the probability moved the other way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duca_fast.ops._checks import check_choice
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

BINARY_KL_EPS = 1e-8
"""verl's ``+ 1e-8`` inside the binary KL's second log."""


@register
@dataclass(frozen=True)
class DPPO(Objective):
    """verl's "dppo_tv" (``divergence="tv"``) and "dppo_kl" (``divergence="kl"``)."""

    divergence: str = "tv"
    """"tv" (probability difference) or "kl" (binary KL)."""
    clip_low: float | None = None
    """Threshold for A <= 0 (None: the options' clip_low)."""
    clip_high: float | None = None
    """Threshold for A > 0 (None: the options' clip_high)."""
    ratio_cap: float = 20.0
    """Truncation of the detached importance ratio (verl's clip_ratio_c default for DPPO)."""

    name = "dppo"
    inherits = ("clip_low", "clip_high")

    def validate(self) -> None:
        check_choice("DPPO.divergence", self.divergence, ("tv", "kl"))
        check_number("DPPO", "clip_low", self.clip_low, minimum=0.0)
        check_number("DPPO", "clip_high", self.clip_high, minimum=0.0)
        check_number("DPPO", "ratio_cap", self.ratio_cap, above=0.0)

    def within_trust_region(self, logprobs, old_logprobs, advantages) -> torch.Tensor:
        """bool: the token's probability did not move past the threshold in its advantage's direction."""
        prob, old_prob = torch.exp(logprobs), torch.exp(old_logprobs)
        if self.divergence == "tv":
            up, down = (prob - old_prob) <= self.clip_high, (prob - old_prob) >= -self.clip_low
        else:
            kl = old_prob * (old_logprobs - logprobs) + (1 - old_prob) * torch.log(
                (1.0 - old_prob + BINARY_KL_EPS) / (1.0 - prob + BINARY_KL_EPS)
            )
            up = (kl <= self.clip_high) | (prob <= old_prob)
            down = (kl <= self.clip_low) | (prob >= old_prob)
        return torch.where(advantages > 0, up, down)

    def terms(self, batch: ObjectiveBatch) -> ObjectiveTerms:
        ratio = torch.exp((batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        valid = self.within_trust_region(batch.logprobs, batch.old_logprobs, batch.advantages)
        coefficient = torch.where(valid, -batch.advantages * ratio.clamp(max=self.ratio_cap), 0.0)
        dtype = ratio.dtype
        outside = ~valid
        metrics = {
            "clip_frac_low": masked_mean((outside & (batch.advantages <= 0)).to(dtype), batch.active),
            "clip_frac_high": masked_mean((outside & (batch.advantages > 0)).to(dtype), batch.active),
        }
        return ObjectiveTerms(coefficient * batch.logprobs, batch.weights * coefficient, metrics)

    def reference(self, logprobs, old_logprobs, advantages, active, seq_ids):
        ratio = torch.exp(torch.clamp(logprobs - old_logprobs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        # The trust region written out again (not shared with terms(), so a bug there shows up here).
        p, q = torch.exp(logprobs.detach()), torch.exp(old_logprobs)
        if self.divergence == "tv":
            valid = torch.where(advantages > 0, p - q <= self.clip_high, q - p <= self.clip_low)
        else:
            binary_kl = q * torch.log(q / p) + (1 - q) * torch.log(
                (1 - q + BINARY_KL_EPS) / (1 - p + BINARY_KL_EPS)
            )
            valid = torch.where(
                advantages > 0,
                (binary_kl <= self.clip_high) | (p <= q),
                (binary_kl <= self.clip_low) | (p >= q),
            )
        truncated = torch.clamp(ratio, max=self.ratio_cap).detach()

        return -advantages * truncated * logprobs * valid.double(), {
            "clip_frac_low": reference_share(~valid & (advantages <= 0), active),
            "clip_frac_high": reference_share(~valid & (advantages > 0), active),
        }
