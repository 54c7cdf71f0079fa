"""Public ops: ``from duca_fast import ops``.

- ``hian_advantages`` / ``grpo_advantages``: grouped per-horizon advantage normalization.
- ``fused_policy_loss``: hidden states + lm_head -> clipped policy loss, without ``[N, V]`` logits.
- ``token_logprobs``: per-token log-probs (and entropies) from hidden states, differentiable.
- ``policy_loss_from_logits``: the same loss for stacks that already hold logits.

Importing this package also registers the custom operators ``torch.ops.duca.*`` (``library``).
"""

from duca_fast.ops import library
from duca_fast.ops.advantages import AdvantageOptions, grpo_advantages, hian_advantages
from duca_fast.ops.policy_loss import (
    PolicyLossOptions,
    fused_policy_loss,
    policy_loss_from_logits,
    token_logprobs,
)

__all__ = [
    "AdvantageOptions",
    "PolicyLossOptions",
    "fused_policy_loss",
    "grpo_advantages",
    "hian_advantages",
    "library",
    "policy_loss_from_logits",
    "token_logprobs",
]
