"""tether.eval.stats: the 95% intervals of reports, against hand computations: Student-t
intervals of a mean (cut to a range when asked), Wilson intervals of a proportion, and the
percentile bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tether.eval.stats import UNIT_INTERVAL, bootstrap_ci, finite, mean_ci, wilson_ci

T_975_DF2 = 4.302652729749462  # Student t, 97.5% quantile, 2 degrees of freedom (tables: 4.303)
T_975_DF4 = 2.7764451051977934  # 4 degrees of freedom (tables: 2.776)
Z_975 = 1.959963984540054  # standard normal, 97.5% quantile


# ----------------------------------------------------------------------------- mean_ci


def test_t_interval_by_hand():
    # 1, 2, 3: mean 2, sample sd 1, half-width t(0.975, 2)·1/√3
    mean, low, high = mean_ci([1.0, 2.0, 3.0])
    half = T_975_DF2 / math.sqrt(3)
    assert mean == 2.0
    assert low == pytest.approx(2.0 - half, rel=1e-12)
    assert high == pytest.approx(2.0 + half, rel=1e-12)
    # five values: sd = √(Σ(v − 3)²/4) = √(10/4)
    mean, low, high = mean_ci([1, 2, 3, 4, 5])
    half = T_975_DF4 * math.sqrt(10 / 4) / math.sqrt(5)
    assert (mean, low, high) == pytest.approx((3.0, 3.0 - half, 3.0 + half), rel=1e-12)
    # another level: the 90% interval is narrower
    _, low90, high90 = mean_ci([1, 2, 3, 4, 5], level=0.9)
    assert low < low90 < 3.0 < high90 < high


def test_one_value_gives_a_degenerate_interval():
    assert mean_ci([0.25]) == (0.25, 0.25, 0.25)


def test_bounds_cut_the_interval_and_leave_the_mean():
    # accuracies of three seeds near 1: the t-interval reaches 1.11, above any accuracy
    values = [1.0, 0.9, 1.0]
    mean, low, high = mean_ci(values)
    sd = math.sqrt(((1 / 30) ** 2 * 2 + (2 / 30) ** 2) / 2)
    half = T_975_DF2 * sd / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((29 / 30, 29 / 30 - half, 29 / 30 + half))
    assert high > 1.1
    cut = mean_ci(values, bounds=UNIT_INTERVAL)
    assert cut == pytest.approx((29 / 30, 29 / 30 - half, 1.0))
    assert isinstance(cut[2], float)
    # near 0 the lower end is cut; inside the bounds nothing changes
    assert mean_ci([0.0, 0.1, 0.0], bounds=(0, 1))[1] == 0.0
    assert mean_ci([0.4, 0.5, 0.6], bounds=(0, 1)) == mean_ci([0.4, 0.5, 0.6])
    assert UNIT_INTERVAL == (0.0, 1.0)


def test_nan_inf_and_non_numbers_are_left_out():
    assert finite([1.0, math.nan, math.inf, -math.inf, "x", None, True, 2]) == [1.0, 2.0]
    assert mean_ci([math.nan, 2.0, math.inf]) == (2.0, 2.0, 2.0)
    assert mean_ci([1.0, math.nan, 2.0, 3.0]) == mean_ci([1.0, 2.0, 3.0])
    for empty in ([], [math.nan], [math.nan, math.inf], np.array([])):
        assert all(math.isnan(v) for v in mean_ci(empty))
        assert all(math.isnan(v) for v in mean_ci(empty, bounds=UNIT_INTERVAL))


# ----------------------------------------------------------------------------- wilson_ci


def wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    """(p + z²/2n ± z·√(p(1 − p)/n + z²/4n²)) / (1 + z²/n)."""
    p, z2 = k / n, Z_975**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_975 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


def test_wilson_interval_by_hand():
    # 8 of 10: the textbook interval (0.490, 0.943)
    low, high = wilson_ci(8, 10)
    assert (low, high) == pytest.approx(wilson_by_hand(8, 10), rel=1e-12)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    # 0 and n successes: the interval stays inside [0, 1] and is not degenerate
    assert wilson_ci(0, 10) == pytest.approx((0.0, wilson_by_hand(0, 10)[1]), abs=1e-15)
    assert wilson_ci(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_ci(10, 10)
    assert low == pytest.approx(0.7225, abs=1e-4) and high == pytest.approx(1.0, abs=1e-15)
    assert high <= 1.0
    # symmetric about ½: k and n − k mirror each other
    lo3, hi3 = wilson_ci(3, 10)
    lo7, hi7 = wilson_ci(7, 10)
    assert (lo3, hi3) == pytest.approx((1 - hi7, 1 - lo7), rel=1e-12)


def test_wilson_edge_cases():
    assert all(math.isnan(v) for v in wilson_ci(0, 0))
    with pytest.raises(ValueError, match="0..n"):
        wilson_ci(11, 10)
    with pytest.raises(ValueError, match="0..n"):
        wilson_ci(-1, 10)


# ----------------------------------------------------------------------------- bootstrap_ci
# (moved here from the tests of eval.addition, with its copy of bootstrap_ci)


def test_bootstrap_ci_contains_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    small, large = rng.normal(size=20), rng.normal(size=2000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s <= small.mean() <= hi_s
    assert lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 4  # width ~ 1/sqrt(n): 10x narrower expected
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)


def test_bootstrap_ci_degenerate_cases():
    assert bootstrap_ci(np.full(50, 0.7)) == (0.7, 0.7)
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)
    lo, hi = bootstrap_ci(np.array([]))
    assert math.isnan(lo) and math.isnan(hi)


def test_bootstrap_ci_of_zeros_and_ones_stays_in_the_unit_interval():
    values = np.array([1.0] * 19 + [0.0])
    lo, hi = bootstrap_ci(values)
    assert 0.0 <= lo <= values.mean() <= hi <= 1.0


def test_paired_difference_is_the_t_interval_of_the_differences():
    """before/after on 5 items: differences 1, 0, 0, 1, −1 → mean 0.2, sd 0.8367, t(0.975, 4)
    2.7764: 0.2 ± 1.0389, cut to [−1, 1]."""
    from tether.eval.stats import paired_difference_ci

    mean, low, high = paired_difference_ci([0, 1, 0, 0, 1], [1, 1, 0, 1, 0])
    half = 2.7764451051977987 * math.sqrt(0.7) / math.sqrt(5)
    assert mean == pytest.approx(0.2)
    assert low == pytest.approx(max(-1.0, 0.2 - half)) and high == pytest.approx(
        min(1.0, 0.2 + half)
    )
    with pytest.raises(ValueError, match="must match in number"):
        paired_difference_ci([1, 0], [1])
