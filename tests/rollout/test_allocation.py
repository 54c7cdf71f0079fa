"""DynaMO's allocation against a transcription of its code, by hand, and in the twin's trainer."""

import json
import math

import numpy as np
import pytest

from duca_fast.rollout.allocation import allocate_rollouts, dynamo_priority
from duca_fast.train.config import ConfigError, load_config
from duca_fast.train.loop import train
from tests.train.acts_configs import ACTS_CONFIG, tiny_acts_config


def official(priority, sample_counts, total, n_min, n_max, initial_budget):
    """GithubX-F/DynaMO-RL (496c27f) ``get_rollout_n_per_prompt``, transcribed step by step."""
    n = len(priority)
    n_min = max(0, n_min)
    n_max = max(n_min, n_max)
    initial_budget = max(n_min, initial_budget)
    total = int(np.clip(total, n * n_min, n * n_max))
    need = np.minimum(np.maximum(0, initial_budget - np.asarray(sample_counts)), n_max)
    counts = np.zeros(n, dtype=np.int64)
    if need.sum() > 0:
        if need.sum() <= total:
            counts[need > 0] = need[need > 0]
            left = total - need.sum()
        else:
            scaled = np.maximum((need * (total / need.sum())).astype(np.int64), n_min)
            while scaled.sum() > total:
                cands = np.where(scaled > n_min)[0]
                if len(cands) == 0:
                    break
                scaled[cands[np.argmax(scaled[cands])]] -= 1
            counts = scaled
            left = total - counts.sum()
    else:
        left = total
    if left > 0:
        min_need = np.maximum(0, n_min - counts)
        if min_need.sum() > 0:
            if min_need.sum() <= left:
                counts += min_need
                left -= min_need.sum()
            else:
                part = (min_need * (left / min_need.sum())).astype(np.int64)
                counts += part
                left -= part.sum()
    if left == 0:
        return counts.tolist()
    prio = np.asarray(priority, dtype=np.float64).copy()
    prio[prio < 1e-8] = 0.0
    while left > 0:
        elig = np.where((counts < n_max) & (prio > 1e-8))[0]
        if len(elig) == 0:
            fb = np.where(counts < n_max)[0]
            if len(fb) == 0:
                break
            for i in range(left):
                counts[fb[i % len(fb)]] += 1
            left = 0
            break
        ideal = left * prio[elig] / prio[elig].sum()
        add = np.floor(ideal).astype(np.int64)
        rem = int(np.round(left - add.sum()))
        if rem > 0:
            order = np.argsort(-(ideal - add))
            for i in range(rem):
                add[order[i]] += 1
        add = np.minimum(add, n_max - counts[elig])
        counts[elig] += add
        left -= add.sum()
    diff = total - counts.sum()
    if diff > 0:
        fb = np.where(counts < n_max)[0]
        for i in range(diff):
            counts[fb[i % len(fb)]] += 1
    elif diff < 0:
        fb = np.where(counts > n_min)[0]
        for i in range(-diff):
            counts[fb[i % len(fb)]] -= 1
    return counts.tolist()


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_official_allocator(seed):
    rng = np.random.default_rng(seed)
    prompts = int(rng.integers(1, 12))
    # Distinct priorities (the official tie order is unspecified); some prompts unseen or mastered.
    priority = rng.permutation(np.linspace(0.0, 0.25, prompts) + rng.random(prompts) * 1e-3)
    priority[rng.random(prompts) < 0.2] = -1.0
    counts = rng.integers(0, 20, prompts)
    n_min, n_max = int(rng.integers(0, 9)), int(rng.integers(9, 30))
    total = int(rng.integers(0, prompts * 30))
    budget = int(rng.integers(0, 12))
    got = allocate_rollouts(priority, counts, total, minimum=n_min, maximum=n_max, initial_budget=budget)
    theirs = official(priority, counts, total, n_min, n_max, budget)
    assert sum(got) == sum(theirs) == int(np.clip(total, prompts * n_min, prompts * n_max))
    assert all(n_min <= n <= n_max for n in got)
    if max(theirs) <= n_max:
        assert got == theirs
    else:
        # Their round-robin fallback overshoots the maximum (ours stops at it): the same shares otherwise.
        assert sum(abs(a - b) for a, b in zip(got, theirs)) <= 2 * (max(theirs) - n_max) * prompts


def test_by_hand_and_priority():
    # Pilot of 8 per scenario already seen: the 8 x 4 extra sessions by variance, within [8, 24].
    assert dynamo_priority(4, 8) == pytest.approx(16 / 56 + 1e-6 * 0.5)
    assert dynamo_priority(0, 8) == 0.01 and dynamo_priority(8, 8) == 0.01 and dynamo_priority(7, 8) == 0.01
    assert dynamo_priority(1, 3) == -1.0
    weights = [dynamo_priority(k, 8) for k in (4, 2, 0, 8)]
    got = allocate_rollouts(weights, [8] * 4, 64, minimum=8, maximum=24)
    # Each gets its pilot's 8; the other 32 by weight: 17.58, 13.19, 0.62, 0.62 -> floors 17, 13, 0, 0 and
    # the two units left to the largest remainders (0.62, 0.62). The first is capped at 24 (8 + 16): its
    # extra unit goes round again, to the largest share (the second scenario).
    ideal = [32 * w / sum(weights) for w in weights]
    assert [math.floor(x) for x in ideal] == [17, 13, 0, 0]
    assert got == [24, 8 + 13 + 1, 8 + 1, 8 + 1] and sum(got) == 64
    # Capacity above the maximum goes back to the others.
    assert allocate_rollouts([1.0, 0.01], [8, 8], 48, minimum=8, maximum=24) == [24, 24]
    with pytest.raises(ValueError, match="minimum <= maximum"):
        allocate_rollouts([1.0], [8], 16, minimum=9, maximum=8)


def test_twin_trains_with_dynamo_allocation(tmp_path):
    config = tiny_acts_config(
        tmp_path,
        "rollout.allocation=dynamo",
        "rollout.group_size=6",
        "rollout.allocation_min=4",
        "rollout.allocation_max=10",
    )
    run_dir = train(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert 4 <= row["rollout/group_size_min"] <= 6 <= row["rollout/group_size_max"] <= 10
        assert math.isfinite(row["loss/total"])
    with pytest.raises(ConfigError, match="allocation_min <= group_size"):
        load_config(ACTS_CONFIG, ["rollout.allocation=dynamo", "rollout.allocation_min=9"])
    with pytest.raises(ConfigError, match=r"allocation=dynamo and rollout\.oversample_groups are exclusive"):
        load_config(
            None, ["rollout.allocation=dynamo", "rollout.oversample_groups=2", "rollout.driver=async"]
        )
