"""The ops as PyTorch custom operators ``torch.ops.duca.*`` (traceable by ``torch.compile(fullgraph=True)``).

Importing ``duca_fast.ops`` registers them; the public functions of ``duca_fast.ops`` call them, so
they are the only autograd path. The registrations live with their op families
(``advantages/custom_ops.py``, ``policy_loss/custom_ops.py``); this module keeps the older names.
"""

from duca_fast.ops.advantages import custom_ops as advantage_ops
from duca_fast.ops.policy_loss import custom_ops as policy_loss_ops
from duca_fast.ops.policy_loss.api import fused_policy_loss as fused_policy_loss_op
from duca_fast.ops.policy_loss.api import token_logprobs as token_logprobs_op
from duca_fast.ops.policy_loss.options import METRIC_KEYS

__all__ = ["METRIC_KEYS", "advantage_ops", "fused_policy_loss_op", "policy_loss_ops", "token_logprobs_op"]
