"""Triton path of ProxMO: two launches, no host synchronisation.

Turns are sorted on the device (stable ``argsort``: by session and position for the returns, by group for
the rest), and each sorted turn knows where its session's and its group's runs start and end. Launch 1
writes the discounted return of every turn from its session's run; launch 2 walks each turn's group run
once, accumulating the proximity softmax online (running max and sum, float64) together with the group's
score sum and live count, and writes the fused advantage. Loop bounds are per program (the longest run
among its rows), so no bound travels to the host. Parameters arrive in a float64 tensor (Triton passes
Python floats as float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from duca_fast.ops.advantages.proxmo import (
    ProxmoOptions,
    ProxmoProblem,
    _to_output,
    group_sorted,
    session_sorted,
    valid_turns,
)

BLOCK_ROWS = 64


@triton.jit
def _returns_kernel(out_ptr, rewards_ptr, order_ptr, run_end_ptr, params_ptr, num_rows, BLOCK: tl.constexpr):
    """``G`` of the sorted turns ``rows``: the discounted sum of their session run's rewards from them on."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_range = rows < num_rows
    ends = tl.load(run_end_ptr + rows, mask=in_range, other=0).to(tl.int64)
    gamma = tl.load(params_ptr)
    span = tl.max(tl.where(in_range, ends - rows, 0), axis=0)
    total = tl.zeros([BLOCK], dtype=tl.float64)
    discount = tl.full([BLOCK], 1.0, dtype=tl.float64)
    for step in range(0, span):
        cols = rows + step
        live = in_range & (cols < ends)
        turn = tl.load(order_ptr + cols, mask=live, other=0)
        reward = tl.load(rewards_ptr + turn, mask=live, other=0.0)
        total += discount * reward
        discount = discount * gamma
    turns = tl.load(order_ptr + rows, mask=in_range, other=0)
    tl.store(out_ptr + turns, total, mask=in_range)


@triton.jit
def _power(x, alpha):
    """``x^alpha`` for ``x`` in [0, 1] and ``alpha > 0`` (0 at 0, without evaluating log 0)."""
    return tl.where(x > 0.0, tl.exp(alpha * tl.log(tl.maximum(x, 1e-300))), 0.0)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _proxmo_kernel(
    out_ptr,
    order_ptr,
    run_start_ptr,
    run_end_ptr,
    features_ptr,
    stride_features,
    returns_ptr,
    scores_ptr,
    valid_ptr,
    params_ptr,
    num_rows,
    num_features,
    PSC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_FEATURES: tl.constexpr,
):
    """Fused advantage of the group-sorted turns ``rows``: episode term (mean over the group's live
    turns, PSC) plus the step term (return minus the proximity-softmax baseline over the group)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_range = rows < num_rows
    starts = tl.load(run_start_ptr + rows, mask=in_range, other=0).to(tl.int64)
    ends = tl.load(run_end_ptr + rows, mask=in_range, other=0).to(tl.int64)
    turns = tl.load(order_ptr + rows, mask=in_range, other=0).to(tl.int64)
    live = in_range & (tl.load(valid_ptr + turns, mask=in_range, other=0) != 0)
    columns = tl.arange(0, BLOCK_FEATURES)
    in_features = columns < num_features
    own = tl.load(
        features_ptr + turns[:, None] * stride_features + columns[None, :],
        mask=live[:, None] & in_features[None, :],
        other=0.0,
    )
    temperature = tl.load(params_ptr + 1)
    step_weight = tl.load(params_ptr + 2)
    running_max = tl.full([BLOCK], float("-inf"), dtype=tl.float64)
    running_sum = tl.zeros([BLOCK], dtype=tl.float64)
    weighted = tl.zeros([BLOCK], dtype=tl.float64)
    score_sum = tl.zeros([BLOCK], dtype=tl.float64)
    members = tl.zeros([BLOCK], dtype=tl.float64)
    span = tl.max(tl.where(in_range, ends - starts, 0), axis=0)
    for step in range(0, span):
        cols = starts + step
        inside = in_range & (cols < ends)
        other = tl.load(order_ptr + cols, mask=inside, other=0).to(tl.int64)
        other_live = inside & (tl.load(valid_ptr + other, mask=inside, other=0) != 0)
        vectors = tl.load(
            features_ptr + other[:, None] * stride_features + columns[None, :],
            mask=other_live[:, None] & in_features[None, :],
            other=0.0,
        )
        logit = tl.sum(own * vectors, axis=1).to(tl.float64) / temperature
        logit = tl.where(other_live, logit, float("-inf"))
        new_max = tl.maximum(running_max, logit)
        # Rows that have seen no live column keep max -inf: scale by 0 instead of exp(nan).
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.where(running_max == float("-inf"), 0.0, tl.exp(running_max - safe_max))
        weight = tl.where(other_live, tl.exp(logit - safe_max), 0.0)
        returns = tl.load(returns_ptr + other, mask=other_live, other=0.0)
        running_sum = running_sum * rescale + weight
        weighted = weighted * rescale + weight * returns
        running_max = new_max
        score_sum += tl.load(scores_ptr + other, mask=other_live, other=0.0)
        members += tl.where(other_live, 1.0, 0.0)
    score = tl.load(scores_ptr + turns, mask=live, other=0.0)
    mean = tl.where(members > 1.0, score_sum / tl.maximum(members, 1.0), 0.0)
    episode = score - mean
    if PSC:
        alpha = tl.load(params_ptr + 3)
        beta = tl.load(params_ptr + 4)
        threshold = tl.load(params_ptr + 5)
        p = tl.minimum(tl.maximum(mean, 0.0), 1.0)
        success = 1.0 + beta * (_sigmoid(_power(1.0 - p, alpha)) - 0.5)
        failure = 1.0 + beta * (_sigmoid(-_power(p, alpha)) - 0.5)
        episode = episode * tl.where(score > threshold, success, failure)
    own_return = tl.load(returns_ptr + turns, mask=live, other=0.0)
    baseline = weighted / tl.where(running_sum > 0.0, running_sum, 1.0)
    advantage = episode + step_weight * (own_return - baseline)
    tl.store(out_ptr + turns, tl.where(live, advantage, 0.0), mask=in_range)


def _runs(keys: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end (in sorted order) of the run of each sorted entry's key; no host sync."""
    counts = torch.zeros(num_keys, dtype=torch.int64, device=keys.device).index_add_(
        0, keys, torch.ones_like(keys)
    )
    ends = torch.cumsum(counts, 0)
    return (ends - counts)[keys].contiguous(), ends[keys].contiguous()


def proxmo_advantages_triton(problem: ProxmoProblem, options: ProxmoOptions) -> torch.Tensor:
    base = problem.base
    num_turns = base.turn_session.shape[0]
    device = base.turn_session.device
    valid, scores, rewards = valid_turns(problem)
    per_turn = torch.zeros(num_turns, dtype=torch.float64, device=device)
    if num_turns == 0:
        return _to_output(base, per_turn)
    params = torch.tensor(
        [
            options.gamma,
            options.temperature,
            options.step_weight,
            options.psc_alpha,
            options.psc_beta,
            options.success_threshold,
        ],
        dtype=torch.float64,
        device=device,
    )
    grid = (triton.cdiv(num_turns, BLOCK_ROWS),)
    by_session = session_sorted(problem)
    _, session_ends = _runs(base.turn_session[by_session], base.session_group.shape[0])
    returns = torch.empty(num_turns, dtype=torch.float64, device=device)
    _returns_kernel[grid](
        returns,
        rewards.contiguous(),
        by_session.contiguous(),
        session_ends,
        params,
        num_turns,
        BLOCK=BLOCK_ROWS,
    )
    by_group, group_of_turn = group_sorted(problem)
    group_starts, group_ends = _runs(group_of_turn[by_group], base.num_groups)
    features = problem.features
    block_features = triton.next_power_of_2(max(features.shape[1], 1))
    # Two [rows, features] tiles live in registers: at most 2,048 values each (no spills at 1,024 features).
    block_rows = max(1, min(BLOCK_ROWS, 2048 // block_features))
    _proxmo_kernel[(triton.cdiv(num_turns, block_rows),)](
        per_turn,
        by_group.contiguous(),
        group_starts,
        group_ends,
        features,
        features.stride(0),
        returns,
        scores.contiguous(),
        valid.to(torch.int8),
        params,
        num_turns,
        features.shape[1],
        PSC=options.psc,
        BLOCK=block_rows,
        BLOCK_FEATURES=block_features,
    )
    return _to_output(base, per_turn)
