"""DRO: the policy gradient with a quadratic penalty on the log-ratio.

Source: Direct Reward Optimization as verl 0.9.1 ``compute_policy_loss_dro`` implements it:
``l = -(A logp - beta / 2 (logp - old)^2)`` with ``beta = policy_loss.dro_beta`` (required, > 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from duca_fast.ops.policy_loss.objectives import register
from duca_fast.ops.policy_loss.objectives.base import Objective, ObjectiveBatch, ObjectiveTerms, check_number


@register
@dataclass(frozen=True)
class DRO(Objective):
    """``l = -(A logp - beta/2 (logp - old)^2)`` (verl: "dro")."""

    beta: float | None = None
    """Weight of the quadratic log-ratio penalty (verl's ``dro_beta``); required, > 0."""

    name = "dro"

    def validate(self) -> None:
        if self.beta is None:
            raise ValueError("DRO.beta is required (verl's policy_loss.dro_beta), e.g. DRO(beta=0.1)")
        check_number("DRO", "beta", self.beta, above=0.0)

    def terms(self, batch: ObjectiveBatch) -> ObjectiveTerms:
        log_ratio = batch.logprobs - batch.old_logprobs
        loss = -(batch.advantages * batch.logprobs - 0.5 * self.beta * log_ratio * log_ratio)
        return ObjectiveTerms(loss, batch.weights * -(batch.advantages - self.beta * log_ratio), {})

    def reference(self, logprobs, old_logprobs, advantages, active, seq_ids):
        return -(logprobs * advantages - 0.5 * self.beta * (logprobs - old_logprobs) ** 2), {}
