"""Triton kernels for HIAN: three launches whatever the number of groups, no host synchronisation.

Launch 1 accumulates per-bucket counts and sums, launch 2 the squared deviations from the bucket
means (two passes: no sum-of-squares cancellation), launch 3 normalizes both horizons, fuses them
and writes one advantage per turn or per token. Sessions and turns share launches 1 and 2: the first
``num_session_blocks`` programs take sessions, the rest take turns. Statistics accumulate in float64
atomics, so a 1e6 session reward and 1e-2 turn rewards keep their precision.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from duca_fast.ops.advantages.options import AdvantageOptions, HianProblem

# Items per program. Memory-bound: large blocks amortize the per-program atomics of batch scaling.
BLOCK = 1024
_SCALE_CODES = {"group": 0, "batch": 1, "none": 2}


@triton.jit
def _combined_reward(
    rewards_ptr,
    weights_ptr,
    rows,
    active,
    stride_row,
    stride_col,
    NUM_COMPONENTS: tl.constexpr,
    BLOCK_COMPONENTS: tl.constexpr,
):
    """Weighted sum of the reward components of ``rows`` in float64 (NaN if any component is NaN)."""
    cols = tl.arange(0, BLOCK_COMPONENTS)
    col_mask = cols < NUM_COMPONENTS
    values = tl.load(
        rewards_ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
        mask=active[:, None] & col_mask[None, :],
        other=0.0,
    )
    weights = tl.load(weights_ptr + cols, mask=col_mask, other=0.0)
    return tl.sum(values.to(tl.float64) * weights[None, :], axis=1)


@triton.jit
def _turn_bucket(
    turn_session_ptr,
    session_group_ptr,
    turn_index_ptr,
    turns,
    active,
    num_turn_positions,
    GROUP_TURN: tl.constexpr,
):
    """Statistic bucket of each turn (its group, or group x position) and its session."""
    session = tl.load(turn_session_ptr + turns, mask=active, other=0).to(tl.int64)
    bucket = tl.load(session_group_ptr + session, mask=active, other=0).to(tl.int64)
    if GROUP_TURN:
        position = tl.load(turn_index_ptr + turns, mask=active, other=0).to(tl.int64)
        bucket = bucket * num_turn_positions + position
    return bucket, session


@triton.jit
def _hian_moments_kernel(
    session_rewards_ptr,
    session_weights_ptr,
    session_group_ptr,
    turn_rewards_ptr,
    turn_weights_ptr,
    turn_session_ptr,
    turn_index_ptr,
    stats_ptr,
    horizon_ptr,
    num_sessions,
    num_turns,
    num_session_blocks,
    num_buckets,
    turn_bucket_offset,
    num_turn_positions,
    stride_session_rewards_row,
    stride_session_rewards_col,
    stride_turn_rewards_row,
    stride_turn_rewards_col,
    SESSION_COMPONENTS: tl.constexpr,
    BLOCK_SESSION_COMPONENTS: tl.constexpr,
    TURN_COMPONENTS: tl.constexpr,
    BLOCK_TURN_COMPONENTS: tl.constexpr,
    GROUP_TURN: tl.constexpr,
    SECOND_PASS: tl.constexpr,
    BATCH_SCALE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Pass 1: count and sum per bucket. Pass 2: squared deviations from the bucket mean.

    ``stats`` is float64 ``[3, num_buckets]`` (count, sum, squared deviations); session buckets are the
    groups, turn buckets follow at ``turn_bucket_offset``. ``horizon`` is float64 ``[2, 2]``: per horizon,
    the members with statistics and their summed squared deviations (batch scaling).
    """
    pid = tl.program_id(0).to(tl.int64)
    if pid < num_session_blocks:
        rows = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE).to(tl.int64)
        in_range = rows < num_sessions
        values = _combined_reward(
            session_rewards_ptr,
            session_weights_ptr,
            rows,
            in_range,
            stride_session_rewards_row,
            stride_session_rewards_col,
            SESSION_COMPONENTS,
            BLOCK_SESSION_COMPONENTS,
        )
        buckets = tl.load(session_group_ptr + rows, mask=in_range, other=0).to(tl.int64)
        horizon_slot = horizon_ptr
    else:
        rows = (pid - num_session_blocks) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE).to(tl.int64)
        in_range = rows < num_turns
        values = _combined_reward(
            turn_rewards_ptr,
            turn_weights_ptr,
            rows,
            in_range,
            stride_turn_rewards_row,
            stride_turn_rewards_col,
            TURN_COMPONENTS,
            BLOCK_TURN_COMPONENTS,
        )
        buckets, _ = _turn_bucket(
            turn_session_ptr,
            session_group_ptr,
            turn_index_ptr,
            rows,
            in_range,
            num_turn_positions,
            GROUP_TURN,
        )
        buckets = buckets + turn_bucket_offset
        horizon_slot = horizon_ptr + 2
    # NaN rewards (nan_policy="omit") stay out of every statistic.
    valid = in_range & (values == values)
    if SECOND_PASS:
        count = tl.load(stats_ptr + buckets, mask=valid, other=0.0)
        total = tl.load(stats_ptr + num_buckets + buckets, mask=valid, other=0.0)
        deviation = values - total / tl.maximum(count, 1.0)
        has_stats = valid & (count >= 2.0)
        squared = tl.where(has_stats, deviation * deviation, 0.0)
        tl.atomic_add(stats_ptr + 2 * num_buckets + buckets, squared, mask=has_stats, sem="relaxed")
        if BATCH_SCALE:
            # One atomic per program on the two horizon scalars instead of one per member.
            tl.atomic_add(horizon_slot, tl.sum(has_stats.to(tl.float64), axis=0), sem="relaxed")
            tl.atomic_add(horizon_slot + 1, tl.sum(squared, axis=0), sem="relaxed")
    else:
        ones = tl.full([BLOCK_SIZE], 1.0, tl.float64)
        tl.atomic_add(stats_ptr + buckets, ones, mask=valid, sem="relaxed")
        tl.atomic_add(stats_ptr + num_buckets + buckets, values, mask=valid, sem="relaxed")


@triton.jit
def _normalized(
    stats_ptr,
    horizon_ptr,
    buckets,
    values,
    active,
    num_buckets,
    eps,
    clip,
    HORIZON: tl.constexpr,
    SCALE: tl.constexpr,
    DDOF: tl.constexpr,
    CLIP: tl.constexpr,
):
    """Advantage of each member from its bucket statistics; 0 without >= 2 members or for NaN.

    ``DDOF`` 1: unbiased std (n - 1), 0: population std (n); ``CLIP``: clamp to ``[-clip, clip]``."""
    count = tl.load(stats_ptr + buckets, mask=active, other=0.0)
    total = tl.load(stats_ptr + num_buckets + buckets, mask=active, other=0.0)
    deviation = values - total / tl.maximum(count, 1.0)
    has_stats = active & (count >= 2.0) & (values == values)
    if SCALE == 0:
        squared = tl.load(stats_ptr + 2 * num_buckets + buckets, mask=active, other=0.0)
        advantage = deviation / (tl.sqrt(squared / tl.maximum(count - DDOF, 1.0)) + eps)
    elif SCALE == 1:
        members = tl.load(horizon_ptr + 2 * HORIZON)
        squared_sum = tl.load(horizon_ptr + 2 * HORIZON + 1)
        advantage = deviation / (tl.sqrt(squared_sum / tl.maximum(members - DDOF, 1.0)) + eps)
    else:
        advantage = deviation
    if CLIP:
        advantage = tl.minimum(tl.maximum(advantage, -clip), clip)
    return tl.where(has_stats, advantage, 0.0)


@triton.jit
def _hian_finalize_kernel(
    out_ptr,
    token_turn_ptr,
    session_rewards_ptr,
    session_weights_ptr,
    session_group_ptr,
    turn_rewards_ptr,
    turn_weights_ptr,
    turn_session_ptr,
    turn_index_ptr,
    stats_ptr,
    horizon_ptr,
    num_out,
    num_buckets,
    turn_bucket_offset,
    num_turn_positions,
    stride_session_rewards_row,
    stride_session_rewards_col,
    stride_turn_rewards_row,
    stride_turn_rewards_col,
    eps_hi,
    eps_lo,
    turn_weight_hi,
    turn_weight_lo,
    session_weight_hi,
    session_weight_lo,
    clip_hi,
    clip_lo,
    SESSION_COMPONENTS: tl.constexpr,
    BLOCK_SESSION_COMPONENTS: tl.constexpr,
    TURN_COMPONENTS: tl.constexpr,
    BLOCK_TURN_COMPONENTS: tl.constexpr,
    GROUP_TURN: tl.constexpr,
    TOKENS: tl.constexpr,
    SCALE: tl.constexpr,
    DDOF: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One fused advantage per turn (or per token, through ``token_turn``; -1 gets 0)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE).to(tl.int64)
    in_range = rows < num_out
    if TOKENS:
        turns = tl.load(token_turn_ptr + rows, mask=in_range, other=-1).to(tl.int64)
        active = in_range & (turns >= 0)
    else:
        turns = rows
        active = in_range
    # Scalars arrive as float32 pairs (Triton passes Python floats as fp32); hi + lo restores fp64.
    eps = tl.cast(eps_hi, tl.float64) + tl.cast(eps_lo, tl.float64)
    turn_weight = tl.cast(turn_weight_hi, tl.float64) + tl.cast(turn_weight_lo, tl.float64)
    session_weight = tl.cast(session_weight_hi, tl.float64) + tl.cast(session_weight_lo, tl.float64)
    clip = tl.cast(clip_hi, tl.float64) + tl.cast(clip_lo, tl.float64)

    turn_values = _combined_reward(
        turn_rewards_ptr,
        turn_weights_ptr,
        turns,
        active,
        stride_turn_rewards_row,
        stride_turn_rewards_col,
        TURN_COMPONENTS,
        BLOCK_TURN_COMPONENTS,
    )
    turn_buckets, sessions = _turn_bucket(
        turn_session_ptr, session_group_ptr, turn_index_ptr, turns, active, num_turn_positions, GROUP_TURN
    )
    turn_advantage = _normalized(
        stats_ptr,
        horizon_ptr,
        turn_buckets + turn_bucket_offset,
        turn_values,
        active,
        num_buckets,
        eps,
        clip,
        1,
        SCALE,
        DDOF,
        CLIP,
    )
    session_values = _combined_reward(
        session_rewards_ptr,
        session_weights_ptr,
        sessions,
        active,
        stride_session_rewards_row,
        stride_session_rewards_col,
        SESSION_COMPONENTS,
        BLOCK_SESSION_COMPONENTS,
    )
    session_buckets = tl.load(session_group_ptr + sessions, mask=active, other=0).to(tl.int64)
    session_advantage = _normalized(
        stats_ptr,
        horizon_ptr,
        session_buckets,
        session_values,
        active,
        num_buckets,
        eps,
        clip,
        0,
        SCALE,
        DDOF,
        CLIP,
    )
    advantage = tl.where(active, turn_weight * turn_advantage + session_weight * session_advantage, 0.0)
    tl.store(out_ptr + rows, advantage.to(out_ptr.dtype.element_ty), mask=in_range)


def _split_float(value: float) -> tuple[float, float]:
    high = float(np.float32(value))
    return high, float(np.float32(value - high))


def hian_advantages_triton(problem: HianProblem, options: AdvantageOptions) -> torch.Tensor:
    """Host launcher: allocate one zeroed statistics buffer, launch the three kernels."""
    turns, sessions = problem.turns, problem.sessions
    num_turns, num_sessions = turns.rewards.shape[0], sessions.rewards.shape[0]
    device = turns.rewards.device
    group_turn = options.turn_scope == "group_turn"
    num_turn_buckets = problem.num_groups * (problem.num_turn_positions if group_turn else 1)
    num_buckets = problem.num_groups + num_turn_buckets
    num_out = num_turns if problem.token_turn is None else problem.token_turn.shape[0]
    out = torch.zeros(num_out, dtype=problem.out_dtype, device=device)
    if num_turns == 0 or num_out == 0:
        return out

    # One allocation (one memset) for every statistic: [count, sum, squared] x buckets + horizon sums.
    stats = torch.zeros(3 * num_buckets + 4, dtype=torch.float64, device=device)
    horizon = stats[3 * num_buckets :]
    turn_index = problem.turn_index if problem.turn_index is not None else problem.turn_session
    token_turn = problem.token_turn if problem.token_turn is not None else problem.turn_session
    common = dict(
        SESSION_COMPONENTS=sessions.rewards.shape[1],
        BLOCK_SESSION_COMPONENTS=triton.next_power_of_2(sessions.rewards.shape[1]),
        TURN_COMPONENTS=turns.rewards.shape[1],
        BLOCK_TURN_COMPONENTS=triton.next_power_of_2(turns.rewards.shape[1]),
        GROUP_TURN=group_turn,
        BLOCK_SIZE=BLOCK,
    )
    num_session_blocks = triton.cdiv(num_sessions, BLOCK)
    moments_grid = (num_session_blocks + triton.cdiv(num_turns, BLOCK),)
    for second_pass in (False, True):
        _hian_moments_kernel[moments_grid](
            sessions.rewards,
            sessions.weights,
            problem.session_group,
            turns.rewards,
            turns.weights,
            problem.turn_session,
            turn_index,
            stats,
            horizon,
            num_sessions,
            num_turns,
            num_session_blocks,
            num_buckets,
            problem.num_groups,
            problem.num_turn_positions,
            sessions.rewards.stride(0),
            sessions.rewards.stride(1),
            turns.rewards.stride(0),
            turns.rewards.stride(1),
            SECOND_PASS=second_pass,
            BATCH_SCALE=options.scale == "batch",
            **common,
        )
    eps_hi, eps_lo = _split_float(options.eps)
    turn_weight_hi, turn_weight_lo = _split_float(options.turn_weight)
    session_weight_hi, session_weight_lo = _split_float(options.session_weight)
    clip_hi, clip_lo = _split_float(0.0 if options.clip is None else options.clip)
    _hian_finalize_kernel[(triton.cdiv(num_out, BLOCK),)](
        out,
        token_turn,
        sessions.rewards,
        sessions.weights,
        problem.session_group,
        turns.rewards,
        turns.weights,
        problem.turn_session,
        turn_index,
        stats,
        horizon,
        num_out,
        num_buckets,
        problem.num_groups,
        problem.num_turn_positions,
        sessions.rewards.stride(0),
        sessions.rewards.stride(1),
        turns.rewards.stride(0),
        turns.rewards.stride(1),
        eps_hi,
        eps_lo,
        turn_weight_hi,
        turn_weight_lo,
        session_weight_hi,
        session_weight_lo,
        clip_hi,
        clip_lo,
        TOKENS=problem.token_turn is not None,
        SCALE=_SCALE_CODES[options.scale],
        DDOF=1.0 if options.std == "unbiased" else 0.0,
        CLIP=options.clip is not None,
        **common,
    )
    return out
