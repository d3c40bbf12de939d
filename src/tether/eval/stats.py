"""Statistics for reports: intervals of means across seeds or problems, of proportions, and of
paired differences.

Every interval here is a 95% interval by default. Intervals of quantities bounded to a range
(accuracies and other proportions: [0, 1]) are cut to that range: the true value lies in it, so
cutting loses no coverage and never reports an impossible figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

UNIT_INTERVAL = (0.0, 1.0)  # the range of a proportion: mean_ci(values, bounds=UNIT_INTERVAL)


def finite(values: Sequence[float] | np.ndarray) -> list[float]:
    """The finite numbers among ``values`` (NaN, inf and non-numbers dropped)."""
    out = []
    for v in np.asarray(values, dtype=object).ravel().tolist():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out.append(float(v))
    return out


def mean_ci(
    values: Sequence[float] | np.ndarray,
    level: float = 0.95,
    bounds: tuple[float, float] | None = None,
) -> tuple[float, float, float]:
    """Mean and a Student-t interval of the mean, ``(mean, low, high)``; the interval is cut
    to ``bounds`` when given (``(0, 1)`` for proportions). NaN for no finite value; a
    degenerate interval for one value."""
    arr = finite(values)
    if not arr:
        return math.nan, math.nan, math.nan
    mean = sum(arr) / len(arr)
    if len(arr) < 2:
        low, high = mean, mean
    else:
        sd = math.sqrt(sum((v - mean) ** 2 for v in arr) / (len(arr) - 1))
        half = float(stats.t.ppf(0.5 + level / 2, len(arr) - 1)) * sd / math.sqrt(len(arr))
        low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, float(bounds[0])), min(high, float(bounds[1]))
    return mean, low, high


def bootstrap_ci(
    values: np.ndarray | Sequence[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean: resample ``values`` with replacement ``n_boot``
    times and take the ``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled means.

    NaN for an empty input; ``(v, v)`` for constant values. For values in [0, 1] the interval
    stays in [0, 1] (every resampled mean does).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return (math.nan, math.nan)
    if np.all(x == x[0]):  # every resample has the same mean; skip the rounding noise
        return (float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: inside [0, 1] by construction, and
    sensible at 0 and n successes (where the normal interval collapses). NaN for n = 0."""
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in 0..n, got {successes} of {n}")
    z = float(stats.norm.ppf(0.5 + level / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference_ci(
    before: Sequence[float],
    after: Sequence[float],
    level: float = 0.95,
    bounds: tuple[float, float] | None = (-1.0, 1.0),
) -> tuple[float, float, float]:
    """The mean of ``after − before`` over paired items (the same problems, or the same seeds)
    and a Student-t interval of it, ``(mean, low, high)``, cut to ``bounds`` (a difference of
    two proportions lies in [−1, 1]). Pairing removes what the items share: the spread is that
    of the per-item differences, not of each side."""
    if len(before) != len(after):
        raise ValueError(f"paired values must match in number: {len(before)} and {len(after)}")
    return mean_ci([a - b for a, b in zip(after, before, strict=True)], level, bounds)
