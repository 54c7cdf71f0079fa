"""duca_fast: kernel-accelerated RL for multi-turn LLM agents with Dual-Horizon Credit Assignment.

Public entry points:
- ``duca_fast.ops``: the advantage op (HIAN, GRPO) and the fused policy-loss op.
- ``duca_fast.env``: the sales environment, its customers, rewards and metrics (no torch needed).
- ``duca_fast.rollout``: the colocated rollout engine and multi-turn driver.
"""

__version__ = "0.1.0"
