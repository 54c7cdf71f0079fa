"""Hidden states -> log-probs -> clipped policy loss, forward and backward, without ``[N, V]`` logits.

One spine (see docs/ops.md):
- ``options``: ``PolicyLossOptions`` and the per-token types (leaf module).
- ``objectives``: the policy objectives, one file each (per-token math, derivative, metrics, reference).
- ``head``: the per-token policy head of the fast paths (objective, d loss / d logp and d H, metrics).
- ``torch_path`` / ``triton_path``: chunked torch (any device) and Triton (CUDA) row work.
- ``custom_ops``: ``torch.ops.duca.*``, the only autograd path; real and fake kernels share ``checks``.
- ``reference``: float64 ground truth from the raw inputs, sharing no helper with the fast paths.
- ``api``: the public functions.
"""

from duca_fast.ops.policy_loss import objectives
from duca_fast.ops.policy_loss.api import (
    fused_policy_loss,
    policy_loss_from_logits,
    policy_loss_from_logprobs,
    token_logprobs,
)
from duca_fast.ops.policy_loss.correction import RolloutCorrection
from duca_fast.ops.policy_loss.head import policy_head
from duca_fast.ops.policy_loss.options import METRIC_KEYS, PolicyLossOptions, TokenInputs

__all__ = [
    "METRIC_KEYS",
    "PolicyLossOptions",
    "RolloutCorrection",
    "TokenInputs",
    "fused_policy_loss",
    "objectives",
    "policy_head",
    "policy_loss_from_logits",
    "policy_loss_from_logprobs",
    "token_logprobs",
]
