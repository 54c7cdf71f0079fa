"""Optimal token baseline (OTB): a per-position baseline weighted by each path's cumulative variance.

Source: verl 0.9.1 ``compute_optimal_token_baseline_advantage`` and
``compute_multi_turn_optimal_token_baseline_advantage`` (``verl/trainer/ppo/core_algos.py``). For each
token t of a sequence: the return ``G_t = sum_{t' >= t} r_t'`` over its loss tokens, the path weight
``W_t = sum_{j <= t} (1 - 2 p_j + sum_v p_v^2)`` over its loss tokens (``p_j = exp(old_logprob_j)``;
times the squared rollout IS weight when given), and within each group, at each position,
``B = sum_i G W / (sum_i W + eps)`` over the group's sequences; ``A_t = G_t - B_t`` on loss tokens, 0
elsewhere. ``sum_v p_v^2`` comes from ``ops.token_logprobs(..., return_sum_p2=True)`` in the same pass as
the log-probs.

``positions="loss_tokens"`` (verl's multi-turn form) counts positions over a sequence's loss tokens only,
so the agent's k-th token lines up across sessions whatever the customer said in between;
``positions="all"`` (verl's single-turn form) counts every token. A group with one sequence (in the
multi-turn form: one sequence that has loss tokens) gets baseline 0. ``handle_zero_tail``: when one
sequence of a group is strictly the longest, its baseline past the second-longest length is 0.

Packed layout: tokens ``[N]``, each sequence's tokens contiguous and in time order (``seq_ids``),
``seq_group [S]`` the group of each sequence. After validation (one host sync) it runs without a host
synchronisation: per-sequence scans, and sums per (group, position) through a stable sort and scatters
into buffers bounded by the token and sequence counts (torch), or one Triton launch that walks each
token's (group, position) bucket (``optimal_baseline_triton.py``; "auto" picks it on CUDA), so sparse
group ids and any lengths cost no round trip on CUDA. No gradient.
"""

from __future__ import annotations

import torch

from duca_fast.ops._checks import ValueChecks, check_choice, check_tensor, select_backend
from duca_fast.ops.advantages.runs import run_bounds


@torch.no_grad()
def optimal_token_baseline_advantages(
    token_rewards: torch.Tensor,
    old_logprobs: torch.Tensor,
    sum_p2: torch.Tensor,
    seq_ids: torch.Tensor,
    seq_group: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    positions: str = "loss_tokens",
    handle_zero_tail: bool = True,
    eps: float = 1e-8,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages [N], returns [N])`` in the dtype of ``token_rewards`` (see the module docstring);
    ``returns`` is ``G_t`` at every token (masked ones included), as verl returns it. ``backend``: "auto"
    (CUDA -> triton, else torch), "torch" or "triton"."""
    check_choice("positions", positions, ("loss_tokens", "all"))
    check_choice("backend", backend, ("auto", "torch", "triton"))
    check_tensor("token_rewards", token_rewards, ndims=(1,), kind="float")
    count = token_rewards.shape[0]
    for name, values in (("old_logprobs", old_logprobs), ("sum_p2", sum_p2), ("is_weights", is_weights)):
        if values is not None:
            check_tensor(name, values, ndims=(1,), kind="float")
            if values.shape[0] != count:
                raise ValueError(f"{name} has {values.shape[0]} entries but token_rewards has {count}")
    check_tensor("seq_ids", seq_ids, ndims=(1,), kind="int")
    check_tensor("seq_group", seq_group, ndims=(1,), kind="int")
    if seq_ids.shape[0] != count:
        raise ValueError(f"seq_ids has {seq_ids.shape[0]} entries but token_rewards has {count}")
    active = torch.ones(count, dtype=torch.bool, device=token_rewards.device) if mask is None else mask.bool()
    if active.shape != (count,):
        raise ValueError(f"mask has shape {tuple(active.shape)}, expected ({count},)")
    num_sequences = seq_group.shape[0]
    checks = ValueChecks()
    checks.forbid(
        (seq_ids < 0) | (seq_ids >= num_sequences),
        lambda i: f"seq_ids[{i}] = {int(seq_ids[i])} is outside [0, {num_sequences}) (entries of seq_group)",
    )
    checks.forbid(seq_group < 0, lambda i: f"seq_group[{i}] = {int(seq_group[i])} must be >= 0")
    for name, values in (
        ("token_rewards", token_rewards),
        ("old_logprobs", old_logprobs),
        ("sum_p2", sum_p2),
    ):
        checks.forbid(
            active & ~torch.isfinite(values),
            lambda i, n=name, v=values: f"{n}[{i}] = {float(v[i])} is not finite",
        )
    checks.raise_if_failed()
    if count == 0:
        return token_rewards.new_zeros(0), token_rewards.new_zeros(0)
    seq = seq_ids.long()
    device = seq.device
    index = torch.arange(count, device=device)
    first = torch.ones(count, dtype=torch.bool, device=device)
    first[1:] = seq[1:] != seq[:-1]
    if torch.unique(seq[first]).numel() != int(first.sum()):  # validation (one host sync)
        raise ValueError("seq_ids: a sequence's tokens must be contiguous (packed, in time order)")

    # From here on no host synchronisation: runs, sums and groups are found with scans and scatters
    # into buffers bounded by the number of tokens or sequences.
    dtype = torch.float64
    loss = active.to(dtype)
    run_start, run_end = run_bounds(seq)

    def within(values: torch.Tensor) -> torch.Tensor:
        """Inclusive cumulative sum within each sequence."""
        total = torch.cumsum(values, 0)
        before = torch.where(run_start > 0, total[(run_start - 1).clamp_min(0)], torch.zeros((), dtype=dtype))
        return total - before

    rewards = token_rewards.to(dtype) * loss
    returns = within(rewards)
    returns = returns[run_end - 1] - returns + rewards  # sum over t' >= t
    weight = 1 - 2 * torch.exp(old_logprobs.to(dtype)) + sum_p2.to(dtype)
    if is_weights is not None:
        weight = weight * is_weights.to(dtype) ** 2
    path = within(weight * loss)
    position = (within(loss) - 1) if positions == "loss_tokens" else (index - run_start).to(dtype)
    position = position.long().clamp_min(0)

    # Dense group ids (sparse ids need no renumbering on the host): sort the sequences by group.
    groups = _dense(seq_group.long())
    group = groups[seq]
    lengths = torch.zeros(num_sequences, dtype=torch.long, device=device).index_add_(0, seq, active.long())
    present = torch.zeros(num_sequences, dtype=torch.bool, device=device)
    present[seq] = True
    member = present & (lengths > 0) if positions == "loss_tokens" else present
    members = torch.zeros(num_sequences, dtype=torch.long, device=device).index_add_(0, groups, member.long())
    has_peers = members[group] > 1
    cut = (
        _zero_tail(seq, groups, lengths, member, position, num_sequences)
        if handle_zero_tail
        else torch.zeros_like(has_peers)
    )
    # One bucket per (group, position).
    key = group * (count + 1) + position
    if select_backend(backend, token_rewards.device) == "triton":
        from duca_fast.ops.advantages.optimal_baseline_triton import otb_advantages_triton

        advantages = otb_advantages_triton(key, returns, path, loss, has_peers & ~cut, eps)
        return advantages.to(token_rewards.dtype), returns.to(token_rewards.dtype)
    # Tokens sorted by their key, buckets numbered by their runs.
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    new_bucket = torch.ones(count, dtype=torch.long, device=device)
    new_bucket[1:] = (sorted_key[1:] != sorted_key[:-1]).long()
    bucket = torch.empty(count, dtype=torch.long, device=device)
    bucket[order] = torch.cumsum(new_bucket, 0) - 1
    numerator = torch.zeros(count, dtype=dtype, device=device).index_add_(0, bucket, returns * path * loss)
    denominator = torch.zeros(count, dtype=dtype, device=device).index_add_(0, bucket, path * loss)
    baseline = numerator[bucket] / (denominator[bucket] + eps)
    baseline = torch.where(has_peers & ~cut, baseline, torch.zeros_like(baseline))
    advantages = (returns - baseline) * loss
    return advantages.to(token_rewards.dtype), returns.to(token_rewards.dtype)


def _dense(ids: torch.Tensor) -> torch.Tensor:
    """Ids renumbered 0..k-1 by sorting (equal ids stay equal), without a host sync."""
    if ids.numel() == 0:
        return ids
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    new = torch.ones_like(sorted_ids)
    new[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
    dense = torch.empty_like(ids)
    dense[order] = torch.cumsum(new, 0) - 1
    return dense


def _zero_tail(seq, groups, lengths, member, position, num_sequences):
    """``[N]`` bool: tokens whose baseline is 0, past the second-longest length of a group's strictly
    longest sequence."""
    device = lengths.device
    counted = torch.where(member, lengths, torch.full_like(lengths, -1))
    longest = torch.full((num_sequences,), -1, dtype=torch.long, device=device).scatter_reduce(
        0, groups, counted, reduce="amax"
    )
    at_longest = member & (counted == longest[groups])
    ties = torch.zeros(num_sequences, dtype=torch.long, device=device).index_add_(
        0, groups, at_longest.long()
    )
    shorter = torch.where(member & (counted < longest[groups]), counted, torch.full_like(counted, -1))
    second = torch.full((num_sequences,), -1, dtype=torch.long, device=device).scatter_reduce(
        0, groups, shorter, reduce="amax"
    )
    # The strictly longest member of a group of >= 2 members (a tie at the top, or one member: none).
    winner = at_longest & (ties[groups] == 1) & (second[groups] >= 0)
    return winner[seq] & (position >= second[groups][seq])
