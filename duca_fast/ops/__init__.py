"""Public ops: ``from duca_fast import ops``.

- ``hian_advantages`` / ``grpo_advantages``: grouped per-horizon advantage normalization.
- ``fused_policy_loss``: hidden states + lm_head -> clipped policy loss, without ``[N, V]`` logits.
- ``token_logprobs``: per-token log-probs (and entropies) from hidden states, differentiable.
- ``policy_loss_from_logits`` / ``policy_loss_from_logprobs``: the same loss for stacks that already
  hold logits or log-probs.
- ``objectives``: the policy objectives every loss function takes as ``objective=`` (PPOClip, GSPO,
  GeoMean, CISPO, SAPO, GPG, DRO, DPPO; one file each).

Every function is a thin wrapper over a ``torch.ops.duca.*`` custom operator (registered on import).
The manual: docs/ops.md.
"""

from duca_fast.ops import library
from duca_fast.ops.advantages import AdvantageOptions, grpo_advantages, hian_advantages
from duca_fast.ops.policy_loss import (
    PolicyLossOptions,
    fused_policy_loss,
    objectives,
    policy_loss_from_logits,
    policy_loss_from_logprobs,
    token_logprobs,
)

__all__ = [
    "AdvantageOptions",
    "PolicyLossOptions",
    "fused_policy_loss",
    "grpo_advantages",
    "hian_advantages",
    "library",
    "objectives",
    "policy_loss_from_logits",
    "policy_loss_from_logprobs",
    "token_logprobs",
]
