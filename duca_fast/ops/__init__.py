"""Public ops: ``from duca_fast import ops``.

- ``hian_advantages`` / ``grpo_advantages``: grouped per-horizon advantage normalization;
  ``gopo_advantages``: GOPO's rank-based advantages within each group;
  ``optimal_token_baseline_advantages``: verl's optimal token baseline on packed tokens (needs sum p^2);
  ``proxmo_advantages``: ProxMO's success-weighted episode term plus proximity-baselined step term;
  ``dynamo_token_advantages``: DynaMO's per-token entropy boost and damping (after a log-prob pass).
- ``fused_policy_loss``: hidden states + lm_head -> clipped policy loss, without ``[N, V]`` logits.
- ``token_logprobs``: per-token log-probs (and entropies) from hidden states, differentiable.
- ``policy_loss_from_logits`` / ``policy_loss_from_logprobs``: the same loss for stacks that already
  hold logits or log-probs.
- ``objectives``: the policy objectives every loss function takes as ``objective=`` (PPOClip, GSPO,
  GeoMean, CISPO, SAPO, GPG, DRO, DPPO, DGPO, MASPO; one file each).

Every function is a thin wrapper over a ``torch.ops.duca.*`` custom operator (registered on import).
The manual: docs/ops.md.
"""

from duca_fast.ops import library
from duca_fast.ops.advantages import (
    AdvantageOptions,
    ProxmoOptions,
    dynamo_token_advantages,
    gopo_advantages,
    grpo_advantages,
    hian_advantages,
    optimal_token_baseline_advantages,
    proxmo_advantages,
)
from duca_fast.ops.policy_loss import (
    PolicyLossOptions,
    RolloutCorrection,
    fused_policy_loss,
    objectives,
    policy_loss_from_logits,
    policy_loss_from_logprobs,
    token_logprobs,
)

__all__ = [
    "AdvantageOptions",
    "PolicyLossOptions",
    "ProxmoOptions",
    "RolloutCorrection",
    "dynamo_token_advantages",
    "fused_policy_loss",
    "gopo_advantages",
    "grpo_advantages",
    "hian_advantages",
    "library",
    "objectives",
    "optimal_token_baseline_advantages",
    "policy_loss_from_logits",
    "policy_loss_from_logprobs",
    "proxmo_advantages",
    "token_logprobs",
]
