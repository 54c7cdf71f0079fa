"""Public ops: ``from duca_fast import ops``.

- ``hian_advantages`` / ``grpo_advantages``: grouped per-horizon advantage normalization.
"""

from duca_fast.ops.advantages import AdvantageOptions, grpo_advantages, hian_advantages

__all__ = ["AdvantageOptions", "grpo_advantages", "hian_advantages"]
