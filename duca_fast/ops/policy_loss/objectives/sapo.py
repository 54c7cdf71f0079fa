"""SAPO: a smooth sigmoid gate on the ratio instead of a hard clip, sharper for negative advantages.

Source: "Soft Adaptive Policy Optimization" (arXiv 2511.20347); verl 0.9.1
``compute_policy_loss_sapo``: ``l = -A * (4 / tau) * sigmoid(tau (r - 1))`` with ``tau = tau_pos`` for
A > 0 and ``tau_neg`` otherwise (defaults 1.0 and 1.05 from verl's ActorConfig). verl always aggregates
SAPO with "seq-mean-token-mean"; pass ``loss_agg="seq_mean_token_mean"`` for the same loss.
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
)


@register
@dataclass(frozen=True)
class SAPO(Objective):
    """Soft gate ``f(r) = (4 / tau) sigmoid(tau (r - 1))``, ``l = -f(r) A`` (verl: "sapo")."""

    tau_pos: float = 1.0
    """Gate temperature for A > 0 (verl's default)."""
    tau_neg: float = 1.05
    """Gate temperature for A <= 0 (verl's default; > tau_pos for the asymmetry)."""

    name = "sapo"

    def validate(self) -> None:
        check_number("SAPO", "tau_pos", self.tau_pos, above=0.0)
        check_number("SAPO", "tau_neg", self.tau_neg, above=0.0)

    def terms(self, batch: ObjectiveBatch) -> ObjectiveTerms:
        log_ratio = batch.logprobs - batch.old_logprobs
        live = log_ratio.abs() <= LOG_RATIO_LIMIT
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        tau = torch.where(batch.advantages > 0, self.tau_pos, self.tau_neg).to(ratio.dtype)
        gate_sigmoid = torch.sigmoid(tau * (ratio - 1.0))
        loss = -(4.0 / tau) * gate_sigmoid * batch.advantages
        # d/d logp of (4 / tau) sigmoid(tau (r - 1)) = 4 sigmoid (1 - sigmoid) r
        slope = torch.where(live, 4.0 * gate_sigmoid * (1.0 - gate_sigmoid) * ratio, torch.zeros_like(ratio))
        return ObjectiveTerms(loss, batch.weights * -batch.advantages * slope, {})

    def reference(self, logprobs, old_logprobs, advantages, active, seq_ids):
        ratio = torch.exp(torch.clamp(logprobs - old_logprobs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        tau = torch.where(advantages > 0, torch.tensor(self.tau_pos), torch.tensor(self.tau_neg)).double()
        return -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * advantages, {}
