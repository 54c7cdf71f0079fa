"""Comparison statistics on fixed data with known answers."""

from __future__ import annotations

import pytest

from duca_fast.train.stats import (
    mean_ci,
    paired_difference_ci,
    paired_permutation_test,
    per_seed_table,
    required_pairs_for_p,
)


def test_ci_of_a_constant_sample_is_the_constant():
    ci = mean_ci([0.125] * 7)
    assert (ci.mean, ci.low, ci.high, ci.n) == (0.125, 0.125, 0.125, 7)
    assert mean_ci([3.0]).low == mean_ci([3.0]).high == 3.0


def test_ci_of_two_points_covers_the_enumerable_bootstrap_distribution():
    # resampled means of {0, 1} are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and 97.5%
    # quantiles are 0 and 1, the 25%/75% ones (50% CI) are 0.5
    ci = mean_ci([0.0, 1.0])
    assert (ci.mean, ci.low, ci.high) == (0.5, 0.0, 1.0)
    narrow = mean_ci([0.0, 1.0], confidence=0.4)
    assert (narrow.low, narrow.high) == (0.5, 0.5)


def test_ci_of_a_large_sample_matches_the_normal_approximation():
    # 400 evenly spread values in [0, 1): sd ~ 0.2887, so the 95% CI is mean +- 1.96 * 0.2887 / 20
    values = [i / 400 for i in range(400)]
    ci = mean_ci(values)
    half_width = 1.959964 * (sum((v - ci.mean) ** 2 for v in values) / 400) ** 0.5 / 20
    assert ci.high - ci.mean == pytest.approx(half_width, rel=0.05)
    assert ci.mean - ci.low == pytest.approx(half_width, rel=0.05)


def test_ci_is_deterministic_and_narrows_with_more_data():
    values = [0.1, 0.3, 0.2, 0.25, 0.15, 0.4, 0.05, 0.2, 0.3, 0.1]
    assert mean_ci(values) == mean_ci(values)
    assert mean_ci(values, seed=1) != mean_ci(values, seed=2)
    ci = mean_ci(values)
    assert ci.low < ci.mean < ci.high and ci.mean == pytest.approx(0.205)
    wide, narrow = mean_ci(values[:4]), mean_ci(values * 4)
    assert narrow.high - narrow.low < wide.high - wide.low


def test_exact_permutation_test_by_enumeration():
    # d = [1, 2, 3]: of the 8 sign flips, |sum| is 6 for (+++) and (---) only -> p = 2/8
    test = paired_permutation_test([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert test.exact and test.n == 3
    assert (test.mean_difference, test.p_value) == (2.0, 0.25)
    # d = [1, -1, 2]: |sum| >= 2 for sums 2, -2, 4, -4 out of {2, 0, 4, 2, -2, -4, 0, -2} -> 6/8
    assert paired_permutation_test([1.0, 0.0, 2.0], [0.0, 1.0, 0.0]).p_value == 0.75
    # a tie with itself: identical samples give p = 1
    assert paired_permutation_test([0.2, 0.5], [0.2, 0.5]).p_value == 1.0


def test_permutation_test_is_symmetric_in_its_arguments():
    a, b = [0.3, 0.1, 0.4, 0.2, 0.5], [0.2, 0.2, 0.1, 0.3, 0.1]
    forward, backward = paired_permutation_test(a, b), paired_permutation_test(b, a)
    assert forward.p_value == backward.p_value
    assert forward.mean_difference == pytest.approx(-backward.mean_difference)


def test_monte_carlo_agrees_with_exact_and_never_gives_zero():
    a = [0.12, 0.18, 0.09, 0.15, 0.2, 0.11, 0.14, 0.16, 0.1, 0.13, 0.17, 0.19]
    b = [0.1, 0.12, 0.11, 0.1, 0.14, 0.12, 0.1, 0.13, 0.12, 0.09, 0.15, 0.11]
    exact = paired_permutation_test(a, b)
    sampled = paired_permutation_test(a, b, exact_max_pairs=0, resamples=40_000, seed=3)
    assert exact.exact and not sampled.exact
    assert sampled.p_value == pytest.approx(exact.p_value, abs=0.01)
    # every difference positive and n = 12: only all-plus and all-minus reach it, p = 2 / 4096
    shifted = [x + 0.01 * (i + 1) for i, x in enumerate(b)]
    assert paired_permutation_test(shifted, b).p_value == 2 / 2**12
    # 30 positive differences: a random sign flip essentially never reaches them, yet p is 1 / 1001, not 0
    far = paired_permutation_test([1.0 + i for i in range(30)], [0.0] * 30, exact_max_pairs=0, resamples=1000)
    assert far.p_value == 1 / 1001 and not far.exact


def test_paired_difference_ci():
    ci = paired_difference_ci([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert (ci.mean, ci.low, ci.high) == (0.5, 0.5, 0.5)


def test_per_seed_table():
    values = {"duca": {1: 0.2, 0: 0.1, 2: 0.3}, "grpo": {0: 0.1, 1: 0.1, 2: 0.1}}
    table = per_seed_table(values, baseline="grpo")
    lines = table.splitlines()
    assert lines[0] == "| seed | duca | grpo |"
    assert lines[2:5] == ["| 0 | 0.100 | 0.100 |", "| 1 | 0.200 | 0.100 |", "| 2 | 0.300 | 0.100 |"]
    assert lines[5].startswith("| mean [95% CI] | 0.200 [") and lines[5].endswith("| 0.100 [0.100, 0.100] |")
    # differences [0, 0.1, 0.2]: flips with |sum| >= 0.3 are (.,+,+) and (.,-,-) for either sign of 0 -> 4/8
    assert lines[7] == "| p (paired permutation) | 0.500 | — |"
    with pytest.raises(ValueError, match="seeds"):
        per_seed_table({"duca": {0: 0.1}, "grpo": {1: 0.1}})
    with pytest.raises(ValueError, match="baseline"):
        per_seed_table(values, baseline="gdpo")


def test_required_pairs_and_bad_input():
    assert required_pairs_for_p(0.05) == 6  # 2 / 2^5 = 0.0625 > 0.05 >= 2 / 2^6
    assert required_pairs_for_p(0.01) == 8
    with pytest.raises(ValueError, match="non-empty"):
        mean_ci([])
    with pytest.raises(ValueError, match="non-finite value at index 1"):
        mean_ci([0.0, float("nan")])
    with pytest.raises(ValueError, match="paired"):
        paired_permutation_test([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0], confidence=1.0)
