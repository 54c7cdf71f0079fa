"""GPG: the plain policy gradient ``l = -A logp`` (no ratio, no clip).

Source: "GPG: A Simple and Strong Reinforcement Learning Baseline" (arXiv 2504.02546, code
``AMAP-ML/GPG``); verl 0.9.1 ``compute_policy_loss_gpg``.
"""

from __future__ import annotations

from dataclasses import dataclass

from duca_fast.ops.policy_loss.objectives import register
from duca_fast.ops.policy_loss.objectives.base import Objective, ObjectiveBatch, ObjectiveTerms


@register
@dataclass(frozen=True)
class GPG(Objective):
    """``l = -A logp`` (verl: "gpg")."""

    name = "gpg"

    def terms(self, batch: ObjectiveBatch) -> ObjectiveTerms:
        return ObjectiveTerms(-batch.advantages * batch.logprobs, batch.weights * -batch.advantages, {})

    def reference(self, logprobs, old_logprobs, advantages, active, seq_ids):
        return -logprobs * advantages, {}
