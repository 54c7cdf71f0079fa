"""GSPO: PPO's clip on the sequence-level ratio, in verl's stop-gradient token form.

Source: Zheng et al., "Group Sequence Policy Optimization" (arXiv 2507.18071); verl 0.9.1
``compute_policy_loss_gspo`` (``verl/trainer/ppo/core_algos.py``): ``s_i = exp(mean_t (logp - old))``
over the response's tokens, the token-level ratio ``sg[s_i] * pi / sg[pi]`` (value ``s_i``, gradient
through the token's own log-prob), its log clamped at 10, then PPO's clipped surrogate per token.
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

SEQ_LOG_RATIO_CAP = 10.0
"""verl clamps the sequence log-ratio at 10 (its gradient is 0 above)."""


@register
@dataclass(frozen=True)
class GSPO(Objective):
    """Sequence ratio ``s = exp(mean of logp - old over the sequence's loss tokens)`` (seq_ids = the
    sequences; pass turn ids for a ratio per turn);
    ``l = max(-A s, -A clip(s, 1 - clip_low, 1 + clip_high))``. The paper's ranges are small (3e-4 / 4e-4).
    """

    clip_low: float | None = None
    """None: the options' clip_low (verl: clip_ratio_low)."""
    clip_high: float | None = None
    """None: the options' clip_high (verl: clip_ratio_high)."""

    name = "gspo"
    sequence_level = True
    inherits = ("clip_low", "clip_high")

    def validate(self) -> None:
        check_number("GSPO", "clip_low", self.clip_low, minimum=0.0, below=1.0)
        check_number("GSPO", "clip_high", self.clip_high, minimum=0.0)

    def terms(self, batch: ObjectiveBatch) -> ObjectiveTerms:
        advantages, active = batch.advantages, batch.active
        log_ratio = batch.logprobs - batch.old_logprobs
        lengths = sequence_sums(active.to(log_ratio.dtype), batch.seq_ids, active).clamp_min(1.0)
        seq_log_ratio = sequence_sums(log_ratio, batch.seq_ids, active) / lengths
        ratio = torch.exp(seq_log_ratio.clamp(max=SEQ_LOG_RATIO_CAP))
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1.0 - self.clip_low, 1.0 + self.clip_high)
        is_clipped = clipped > unclipped
        dead = is_clipped | (seq_log_ratio > SEQ_LOG_RATIO_CAP)
        d_loss = torch.where(dead, torch.zeros_like(ratio), -advantages * ratio)
        dtype = ratio.dtype
        metrics = {
            "clip_frac_low": masked_mean((is_clipped & (advantages < 0)).to(dtype), active),
            "clip_frac_high": masked_mean((is_clipped & (advantages > 0)).to(dtype), active),
        }
        return ObjectiveTerms(torch.maximum(unclipped, clipped), batch.weights * d_loss, metrics)

    def reference(self, logprobs, old_logprobs, advantages, active, seq_ids):
        token_ratio = torch.zeros_like(logprobs)
        for seq in sorted(set(seq_ids[active].tolist())):
            members = active & (seq_ids == seq)
            mean_log_ratio = (logprobs[members] - old_logprobs[members]).sum() / int(members.sum())
            # value exp(mean), gradient through each token's own log-prob only
            combined = logprobs - logprobs.detach() + mean_log_ratio.detach()
            capped = torch.exp(torch.clamp(combined, max=SEQ_LOG_RATIO_CAP))
            token_ratio = torch.where(members, capped, token_ratio)
        low, high = 1.0 - self.clip_low, 1.0 + self.clip_high
        first, second = -advantages * token_ratio, -advantages * token_ratio.clamp(low, high)
        clipped = (second > first) & active

        metrics = {
            "clip_frac_low": reference_share(clipped & (advantages < 0), active),
            "clip_frac_high": reference_share(clipped & (advantages > 0), active),
        }
        return torch.maximum(first, second), metrics
