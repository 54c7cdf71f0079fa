"""DynaMO's rollout allocation: more sessions for the scenarios whose success is most uncertain.

Source: "DynaMO" (arXiv 2602.19208), official code ``GithubX-F/DynaMO-RL`` (commit 496c27f):
``recipe/dynamo/dynamo_ray_trainer.py`` ``get_rollout_n_per_prompt`` (the allocator) and
``verl/utils/dataset/rl_dataset.py`` ``update_rank`` (the priority); run script
``examples/dynamo_trainer/run_qwen2.5-math-7b.sh``: a mean of 16 rollouts per prompt within [8, 24].

- ``dynamo_priority(successes, trials)``: the unbiased Bernoulli variance ``k (G - k) / (G (G - 1))`` plus
  ``1e-6 (1 - p)`` (a tie-break towards harder prompts), floored at 0.01; 0.01 when ``p >= 0.85``; -1 (no
  weight) with fewer than 4 trials.
- ``allocate_rollouts(priority, sample_counts, total, minimum, maximum, initial_budget)``: per prompt a
  count within ``[minimum, maximum]`` summing to ``total`` (clipped to what the bounds allow): prompts seen
  fewer than ``initial_budget`` times first get the difference (exploration); every prompt is topped up to
  ``minimum``; the rest is water-filled in proportion to the priority (largest-remainder rounding,
  capacity above ``maximum`` handed back to the others round after round); with no positive priority left,
  one at a time in prompt order.

Differences from their code, by design: ties of the fractional parts go to the earlier prompt (their
``argsort`` is unstable, so their order is unspecified); their one-at-a-time fallbacks can push a prompt
above the maximum, ours stop at it; the trainer (``rollout.allocation: dynamo``)
plays an in-step pilot of ``minimum`` sessions per scenario and weights the rest by the pilot's
successes, where they weight by each prompt's lifetime statistics from earlier epochs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def dynamo_priority(successes: int, trials: int) -> float:
    """DynaMO's weight of a prompt with ``successes`` of ``trials`` (see the module docstring)."""
    if trials < 0 or not 0 <= successes <= max(trials, 0):
        raise ValueError(f"need 0 <= successes <= trials, got successes={successes}, trials={trials}")
    if trials < 4:
        return -1.0
    p = successes / trials
    if p >= 0.85:
        return 0.01
    variance = successes * (trials - successes) / (trials * (trials - 1))
    return max(variance + 1e-6 * (1.0 - p), 0.01)


def allocate_rollouts(
    priority: Sequence[float],
    sample_counts: Sequence[int],
    total: int,
    *,
    minimum: int = 8,
    maximum: int = 24,
    initial_budget: int = 8,
) -> list[int]:
    """Rollouts per prompt (see the module docstring); ``sum == clip(total, n*minimum, n*maximum)``."""
    weights = np.asarray(priority, dtype=np.float64)
    seen = np.asarray(sample_counts, dtype=np.int64)
    if weights.ndim != 1 or seen.shape != weights.shape:
        raise ValueError(
            f"priority and sample_counts must be 1-D of one length, got {weights.shape} and {seen.shape}"
        )
    if not np.isfinite(weights).all():
        raise ValueError(f"priority must be finite, got {weights.tolist()}")
    if minimum < 0 or maximum < minimum:
        raise ValueError(f"need 0 <= minimum <= maximum, got minimum={minimum}, maximum={maximum}")
    count = weights.shape[0]
    if count == 0:
        return []
    initial_budget = max(minimum, initial_budget)
    total = int(np.clip(total, count * minimum, count * maximum))
    counts = np.zeros(count, dtype=np.int64)

    # 1. Exploration of prompts seen fewer than initial_budget times (scaled down when it overflows).
    exploration = np.minimum(np.maximum(0, initial_budget - seen), maximum)
    if exploration.sum() <= total:
        counts += exploration
    else:
        counts = np.maximum((exploration * (total / exploration.sum())).astype(np.int64), minimum)
        while counts.sum() > total and (counts > minimum).any():
            candidates = np.flatnonzero(counts > minimum)
            counts[candidates[np.argmax(counts[candidates])]] -= 1
    left = total - int(counts.sum())

    # 2. Everyone up to the minimum (scaled down when the budget is short).
    needed = np.maximum(0, minimum - counts)
    if left > 0 and needed.sum() > 0:
        grant = needed if needed.sum() <= left else (needed * (left / needed.sum())).astype(np.int64)
        counts += grant
        left -= int(grant.sum())

    # 3. Water-fill the rest in proportion to the priority, capped at the maximum.
    weights = np.where(weights < 1e-8, 0.0, weights)
    while left > 0:
        eligible = np.flatnonzero((counts < maximum) & (weights > 1e-8))
        if eligible.size == 0:
            left = _round_robin(counts, left, maximum)
            break
        ideal = left * weights[eligible] / weights[eligible].sum()
        grant = np.floor(ideal).astype(np.int64)
        extra = left - int(grant.sum())  # the shares sum to left: an integer
        if extra > 0:
            grant[np.argsort(-(ideal - grant), kind="stable")[:extra]] += 1
        grant = np.minimum(grant, maximum - counts[eligible])
        counts[eligible] += grant
        left -= int(grant.sum())

    # 4. Rounding leftovers, one at a time (their final fix-up).
    difference = total - int(counts.sum())
    if difference > 0:
        _round_robin(counts, difference, maximum)
    elif difference < 0:
        slots = np.flatnonzero(counts > minimum)
        for i in range(-difference if slots.size else 0):
            counts[slots[i % slots.size]] -= 1
    return counts.tolist()


def _round_robin(counts: np.ndarray, units: int, maximum: int) -> int:
    """Hand out ``units`` one at a time in prompt order to prompts below ``maximum``; returns what is left.

    Their fallback cycles over the prompts that were below the maximum when it started and can push
    some above it; this one skips a prompt once it is full."""
    while units > 0:
        open_slots = np.flatnonzero(counts < maximum)
        if open_slots.size == 0:
            break
        grant = min(units, open_slots.size)
        counts[open_slots[:grant]] += 1
        units -= grant
    return units


def dynamo_group_sizes(
    conversions: Sequence[int], pilot: int, mean: int, minimum: int, maximum: int
) -> list[int]:
    """Sessions per scenario after a pilot of ``pilot`` sessions each with ``conversions[i]`` successes:
    DynaMO's priorities water-filled to ``mean`` per scenario on average within [``minimum``, ``maximum``]."""
    return allocate_rollouts(
        [dynamo_priority(k, pilot) for k in conversions],
        [pilot] * len(conversions),
        mean * len(conversions),
        minimum=minimum,
        maximum=maximum,
    )


def group_size_metrics(sizes: Sequence[int]) -> dict[str, float]:
    """``rollout/group_size_{min,max,std}`` of a step's allocation."""
    return {
        "rollout/group_size_min": float(min(sizes)),
        "rollout/group_size_max": float(max(sizes)),
        "rollout/group_size_std": float(np.std(np.asarray(sizes, dtype=np.float64), ddof=1)),
    }
