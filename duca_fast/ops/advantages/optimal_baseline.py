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
``seq_group [S]`` the group of each sequence. Torch only (no Triton path yet); no gradient.
"""

from __future__ import annotations

import torch

from duca_fast.ops._checks import ValueChecks, check_choice, check_tensor


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages [N], returns [N])`` in the dtype of ``token_rewards`` (see the module docstring);
    ``returns`` is ``G_t`` at every token (masked ones included), as verl returns it."""
    check_choice("positions", positions, ("loss_tokens", "all"))
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
    changes = torch.nonzero(seq[1:] != seq[:-1])[:, 0] + 1
    starts = torch.cat([changes.new_zeros(1), changes])
    if torch.unique(seq[starts]).numel() != starts.numel():
        raise ValueError("seq_ids: a sequence's tokens must be contiguous (packed, in time order)")

    dtype = torch.float64
    loss = active.to(dtype)
    run = torch.zeros(count, dtype=torch.long, device=seq.device)
    run[starts[1:]] = 1
    run = torch.cumsum(run, 0)  # index of each token's run (= its sequence's block)
    run_start = starts[run]
    run_end = torch.cat([starts[1:], starts.new_tensor([count])])[run]

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
    position = (
        (within(loss) - 1)
        if positions == "loss_tokens"
        else torch.arange(count, device=seq.device) - run_start
    )
    position = position.long().clamp_min(0)

    group = seq_group.long()[seq]
    lengths = torch.zeros(num_sequences, dtype=torch.long, device=seq.device).index_add_(
        0, seq, active.long()
    )
    present = torch.zeros(num_sequences, dtype=torch.bool, device=seq.device)
    present[seq] = True
    member = present & (lengths > 0) if positions == "loss_tokens" else present
    num_groups = int(group.max()) + 1
    members = torch.zeros(num_groups, dtype=torch.long, device=seq.device).index_add_(
        0, seq_group.long(), member.long()
    )
    span = int(position.max()) + 1
    key = group * span + position
    numerator = torch.zeros(num_groups * span, dtype=dtype, device=seq.device).index_add_(
        0, key, returns * path * loss
    )
    denominator = torch.zeros(num_groups * span, dtype=dtype, device=seq.device).index_add_(
        0, key, path * loss
    )
    baseline = numerator[key] / (denominator[key] + eps)
    baseline = torch.where(members[group] > 1, baseline, torch.zeros_like(baseline))
    if handle_zero_tail:
        baseline = _zero_tail(baseline, seq, seq_group.long(), lengths, member, position)
    advantages = (returns - baseline) * loss
    return advantages.to(token_rewards.dtype), returns.to(token_rewards.dtype)


def _zero_tail(baseline, seq, seq_group, lengths, member, position):
    """Baseline 0 past the second-longest length for a group's strictly longest sequence."""
    out = baseline.clone()
    for g in torch.unique(seq_group[member]).tolist():
        indices = torch.nonzero(member & (seq_group == g))[:, 0]
        if indices.numel() < 2:
            continue
        group_lengths = lengths[indices]
        ordered = torch.sort(group_lengths).values
        longest, second = int(ordered[-1]), int(ordered[-2])
        if longest > second:
            winner = int(indices[group_lengths == longest][0])
            out = torch.where((seq == winner) & (position >= second), torch.zeros_like(out), out)
    return out
