"""HIAN, the one-horizon GRPO baseline, and the grouped estimators beside them (GOPO, ProxMO, OTB).

Turn-level rewards (one per agent turn) and session-level rewards (one per session) are each
normalized within their rollout group, then fused into one advantage per agent turn:

    A_t = turn_weight * A^turn_t + session_weight * A^sess_{session(t)}

so that a large sparse session reward cannot drown the small dense turn signals.

One spine (see docs/ops.md): ``options`` (leaf) -> ``prepare`` (validation) -> ``torch_path`` /
``triton_path`` -> ``custom_ops`` (``torch.ops.duca.*``) -> ``api``; ``reference`` is the float64
ground truth written from the raw inputs.
"""

from duca_fast.ops.advantages.api import grpo_advantages, hian_advantages
from duca_fast.ops.advantages.dynamo import dynamo_token_advantages
from duca_fast.ops.advantages.gopo import gopo_advantages
from duca_fast.ops.advantages.optimal_baseline import optimal_token_baseline_advantages
from duca_fast.ops.advantages.options import AdvantageOptions
from duca_fast.ops.advantages.proxmo import ProxmoOptions, proxmo_advantages

__all__ = [
    "AdvantageOptions",
    "ProxmoOptions",
    "dynamo_token_advantages",
    "gopo_advantages",
    "grpo_advantages",
    "hian_advantages",
    "optimal_token_baseline_advantages",
    "proxmo_advantages",
]
