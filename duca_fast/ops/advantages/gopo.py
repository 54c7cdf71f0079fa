"""GOPO: rank-based advantages within each rollout group.

Source: "Group Ordinal Policy Optimization" (arXiv 2602.03876), code ``friendshipkim/gopo``
(``src/open_r1/grpo_trainer.py``): within a group of G completions, rank 1 is the highest reward and
``A = 2 - 4 (rank - 1) / (G - 1)``, so advantages run from +2 (best) to -2 (worst) whatever the reward
scale. Differences from that code, by design: tied rewards are ranked by their order in the batch (the
code's double ``argsort`` is unstable, so its tie order is unspecified), and a group of one completion
gets 0 (the code divides 0 by 0). One advantage per sequence; broadcast it to tokens as any other.
"""

from __future__ import annotations

import torch

from duca_fast.ops._checks import ValueChecks, check_choice, check_tensor, select_backend


def gopo_advantages(rewards: torch.Tensor, group: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``[S]`` float32 rank advantages of ``rewards`` ``[S]`` within the groups ``group`` ``[S]`` (int,
    any ids >= 0). NaN or infinite rewards are refused with the index named. ``backend``: "auto" (CUDA ->
    triton, else torch), "torch", "triton" (``gopo_triton.py``: one launch, no host sync) or "reference"."""
    check_choice("backend", backend, ("auto", "torch", "triton", "reference"))
    check_tensor("rewards", rewards, ndims=(1,), kind="float")
    check_tensor("group", group, ndims=(1,), kind="int")
    if group.shape != rewards.shape:
        raise ValueError(f"group has {group.shape[0]} entries but rewards has {rewards.shape[0]}")
    checks = ValueChecks()
    checks.forbid(~torch.isfinite(rewards), lambda i: f"rewards[{i}] = {float(rewards[i])} is not finite")
    checks.forbid(group < 0, lambda i: f"group[{i}] = {int(group[i])} must be >= 0")
    checks.raise_if_failed()
    if backend == "reference":
        return reference_gopo_advantages(rewards, group).float().to(rewards.device)
    if select_backend(backend, rewards.device) == "triton":
        from duca_fast.ops.advantages.gopo_triton import gopo_advantages_triton

        return gopo_advantages_triton(rewards, group)
    count = rewards.shape[0]
    if count == 0:
        return rewards.new_zeros(0, dtype=torch.float32)
    ids = group.long()
    # Group-major, best first inside a group, ties in batch order (two stable sorts).
    by_reward = torch.argsort(-rewards.double(), stable=True)
    order = by_reward[torch.argsort(ids[by_reward], stable=True)]
    sizes = torch.bincount(ids)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty(count, dtype=torch.long, device=rewards.device)
    rank[order] = torch.arange(count, device=rewards.device) - starts[ids[order]]
    size = sizes[ids].double()
    spread = 2.0 - 4.0 * rank.double() / (size - 1).clamp_min(1)
    return torch.where(size > 1, spread, torch.zeros_like(spread)).float()


def reference_gopo_advantages(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Plain loops: each group's members sorted by (-reward, position)."""
    values = rewards.double().tolist()
    ids = group.tolist()
    out = [0.0] * len(values)
    for g in set(ids):
        members = sorted((i for i, x in enumerate(ids) if x == g), key=lambda i: (-values[i], i))
        size = len(members)
        for rank, i in enumerate(members, start=1):
            out[i] = 0.0 if size < 2 else 2.0 - 4.0 * (rank - 1) / (size - 1)
    return torch.tensor(out, dtype=torch.float64)
