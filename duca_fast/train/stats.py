"""Statistics for algorithm comparisons over seeds: bootstrap CIs, a paired permutation test, per-seed tables.

All of it is deterministic: every random draw comes from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def _as_sample(name: str, values: Sequence[float]) -> np.ndarray:
    sample = np.asarray(values, dtype=np.float64)
    if sample.ndim != 1 or sample.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {sample.shape}")
    if not np.isfinite(sample).all():
        raise ValueError(
            f"{name} has a non-finite value at index {int(np.flatnonzero(~np.isfinite(sample))[0])}"
        )
    return sample


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


def _check_resamples(resamples: int) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")


@dataclass(frozen=True)
class MeanCI:
    """A sample mean with its percentile bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    """Sample size (seeds)."""

    def format(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def mean_ci(
    values: Sequence[float], *, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> MeanCI:
    """Mean and percentile bootstrap CI: resample the values with replacement ``resamples`` times, take the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled means (Efron &
    Tibshirani 1993, ch. 13). A single value gives the degenerate interval [x, x]."""
    sample = _as_sample("values", values)
    _check_confidence(confidence)
    _check_resamples(resamples)
    rng = np.random.default_rng(seed)
    means = sample[rng.integers(0, sample.size, size=(resamples, sample.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    mean = float(sample.mean())
    # Rounding of resampled means of a constant sample must not put the interval beside the mean.
    return MeanCI(mean=mean, low=min(float(low), mean), high=max(float(high), mean), n=sample.size)


def paired_difference_ci(
    a: Sequence[float],
    b: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> MeanCI:
    """Bootstrap CI of the mean paired difference ``a_i - b_i`` (pairs share a seed)."""
    return mean_ci(_differences(a, b), confidence=confidence, resamples=resamples, seed=seed)


def _differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    first, second = _as_sample("a", a), _as_sample("b", b)
    if first.size != second.size:
        raise ValueError(f"a and b must be paired (same length), got {first.size} and {second.size}")
    return first - second


@dataclass(frozen=True)
class PermutationTest:
    """Result of a two-sided paired permutation (sign-flip) test."""

    mean_difference: float
    """Observed mean of ``a_i - b_i``."""
    p_value: float
    exact: bool
    """All ``2^n`` sign assignments were enumerated (else Monte-Carlo)."""
    n: int


def paired_permutation_test(
    a: Sequence[float],
    b: Sequence[float],
    *,
    exact_max_pairs: int = 16,
    resamples: int = 100_000,
    seed: int = 0,
) -> PermutationTest:
    """Two-sided paired permutation test of "a and b have the same mean" (Fisher's sign-flip test).

    Under the null hypothesis each difference ``d_i = a_i - b_i`` is as likely to have either sign. The
    p-value is the share of sign assignments whose ``|mean(+-d_i)|`` reaches the observed ``|mean(d)|``:
    all ``2^n`` of them when ``n <= exact_max_pairs``, otherwise ``resamples`` random ones with the
    ``(1 + hits) / (1 + resamples)`` estimate, which never gives 0 (Phipson & Smyth 2010).
    """
    differences = _differences(a, b)
    _check_resamples(resamples)
    n = differences.size
    observed = abs(differences.mean())
    # Means that tie with the observed one up to rounding count as reaching it.
    tolerance = 1e-12 * max(1.0, float(np.abs(differences).max()))
    if n <= exact_max_pairs:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        hits = int((np.abs(signs @ differences / n) >= observed - tolerance).sum())
        p_value, exact = hits / signs.shape[0], True
    else:
        rng = np.random.default_rng(seed)
        hits = 0
        for start in range(0, resamples, 10_000):
            signs = rng.choice((1.0, -1.0), size=(min(10_000, resamples - start), n))
            hits += int((np.abs(signs @ differences / n) >= observed - tolerance).sum())
        p_value, exact = (1 + hits) / (1 + resamples), False
    return PermutationTest(mean_difference=float(differences.mean()), p_value=p_value, exact=exact, n=n)


def per_seed_table(
    values: Mapping[str, Mapping[int, float]],
    *,
    baseline: str | None = None,
    digits: int = 3,
    confidence: float = 0.95,
    seed: int = 0,
) -> str:
    """A Markdown table: one row per seed, one column per algorithm, then the mean with its bootstrap CI
    and, against ``baseline``, the paired mean difference with its CI and the permutation test p-value.

    ``values[algorithm][seed]`` is one run's number (e.g. its evaluation conversion rate). Every algorithm
    must have the same seeds (the pairing); a missing seed is an error, never silently dropped.
    """
    if not values:
        raise ValueError("values must name at least one algorithm")
    names = list(values)
    seeds = sorted(values[names[0]])
    for name in names:
        if sorted(values[name]) != seeds:
            raise ValueError(
                f"values[{name!r}] has seeds {sorted(values[name])}, expected {seeds} like {names[0]!r}"
            )
    if baseline is not None and baseline not in values:
        raise ValueError(f"baseline {baseline!r} is not one of {names}")
    level = f"{100 * confidence:g}%"
    lines = ["| seed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(f"{values[n][s]:.{digits}f}" for n in names) + " |" for s in seeds]
    columns = {n: [values[n][s] for s in seeds] for n in names}
    means = [mean_ci(columns[n], confidence=confidence, seed=seed).format(digits) for n in names]
    lines.append(f"| mean [{level} CI] | " + " | ".join(means) + " |")
    if baseline is not None:
        deltas, p_values = [], []
        for name in names:
            if name == baseline:
                deltas.append("—")
                p_values.append("—")
                continue
            difference = paired_difference_ci(
                columns[name], columns[baseline], confidence=confidence, seed=seed
            )
            test = paired_permutation_test(columns[name], columns[baseline], seed=seed)
            deltas.append(
                f"{difference.mean:+.{digits}f} [{difference.low:+.{digits}f}, {difference.high:+.{digits}f}]"
            )
            p_values.append(_format_p(test))
        lines.append(f"| − {baseline} [{level} CI] | " + " | ".join(deltas) + " |")
        lines.append("| p (paired permutation) | " + " | ".join(p_values) + " |")
    return "\n".join(lines) + "\n"


def _format_p(test: PermutationTest) -> str:
    text = f"{test.p_value:.3f}" if test.p_value >= 0.001 else f"{test.p_value:.1e}"
    return text if test.exact else f"{text} (MC)"


def required_pairs_for_p(alpha: float) -> int:
    """Fewest pairs with which an exact sign-flip test can reach ``p <= alpha`` at all (the smallest
    possible two-sided p is ``2 / 2^n``); a study with fewer seeds cannot show significance at ``alpha``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return max(1, math.ceil(math.log2(2 / alpha)))
