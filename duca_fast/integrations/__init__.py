"""Adapters that let other RL stacks use duca_fast's HIAN advantages and policy-loss math.

- ``duca_fast.integrations.verl``: importing it registers the advantage estimator ``"duca_hian"`` and
  the policy loss ``"duca_fused"`` in verl's registries (needs verl).
- ``duca_fast.integrations.trl``: ``DucaGRPOTrainer``, a TRL ``GRPOTrainer`` that trains on per-token
  HIAN advantages of multi-turn completions (needs trl).

This package imports neither verl nor trl; only the submodules do.
"""
