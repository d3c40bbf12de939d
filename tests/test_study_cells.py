"""tether.studies.common.interval_cell: the table cell of a figure across seeds in the study
reports, mean ± the half-width of its 95% t-interval, or mean [low, high] where the interval is
cut to the figure's range."""

from __future__ import annotations

import math

from tether.eval.stats import UNIT_INTERVAL
from tether.studies.common import interval_cell

T_975_DF2 = 4.302652729749462  # Student t, 97.5% quantile, 2 degrees of freedom


def test_a_symmetric_interval_is_mean_plus_minus_half_width():
    # 0.4, 0.5, 0.6: sd 0.1, half-width t·0.1/√3 = 0.248
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert interval_cell([0.4, 0.5, 0.6]) == f"0.500 ± {half:.3f}" == "0.500 ± 0.248"
    # inside the bounds nothing is cut
    assert interval_cell([0.4, 0.5, 0.6], bounds=UNIT_INTERVAL) == "0.500 ± 0.248"
    assert interval_cell([0.4, 0.5, 0.6], digits=2) == "0.50 ± 0.25"


def test_an_accuracy_near_1_is_cut_to_1_and_shown_as_low_high():
    # 1.0, 0.9, 1.0: 0.967 ± 0.143 would reach 1.110, which no accuracy can
    assert interval_cell([1.0, 0.9, 1.0]) == "0.967 ± 0.143"
    assert interval_cell([1.0, 0.9, 1.0], bounds=UNIT_INTERVAL) == "0.967 [0.823, 1.000]"
    assert interval_cell([0.0, 0.1, 0.0], bounds=UNIT_INTERVAL) == "0.033 [0.000, 0.177]"
    # a correlation in [−1, 1]
    assert interval_cell([-1.0, -0.9, -1.0], bounds=(-1.0, 1.0)) == "-0.967 [-1.000, -0.823]"


def test_one_seed_is_the_mean_alone():
    assert interval_cell([0.25]) == "0.250"
    assert interval_cell([0.25], bounds=UNIT_INTERVAL) == "0.250"
