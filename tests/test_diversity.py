"""Diversity metrics against cases worked by hand."""

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.eval.diversity import (
    distinct_n,
    mean_distinct_n,
    mean_self_bleu,
    mean_token_entropy,
    self_bleu,
)
from tether.tasks.multistep import Problem, expert_solution


def test_self_bleu_of_identical_samples_is_100():
    assert self_bleu(["12+30=42,42+5=47;47"] * 4) == pytest.approx(100.0)
    assert self_bleu(["the cat sat on the mat"] * 3, tokenize="13a") == pytest.approx(100.0)


def test_self_bleu_of_disjoint_samples_is_near_zero():
    assert self_bleu(["abcd", "efgh", "ijkl", "mnop"]) < 1.0
    assert self_bleu(["one two three", "four five six"], tokenize="13a") < 1.0


def test_self_bleu_ranks_a_diverse_expert_below_a_collapsed_one():
    rng = random.Random(0)
    p = Problem((12, 7, 30, 5), "")
    diverse = [expert_solution(p.operands, rng) for _ in range(8)]
    collapsed = [diverse[0]] * 8
    assert 20.0 < self_bleu(diverse) < self_bleu(collapsed) == pytest.approx(100.0)


def test_self_bleu_handles_empty_samples_and_needs_two():
    assert self_bleu(["", ""]) == 0.0
    assert 0.0 <= self_bleu(["", "abc", "abc"]) <= 100.0
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu(["abc"])


def test_mean_self_bleu_averages_groups():
    groups = [["ab", "ab"], ["abcd", "efgh"]]
    assert mean_self_bleu(groups) == pytest.approx(
        (self_bleu(groups[0]) + self_bleu(groups[1])) / 2
    )
    assert math.isnan(mean_self_bleu([]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=20), min_size=2, max_size=4))
def test_self_bleu_is_in_range_on_arbitrary_text(samples):
    assert 0.0 <= self_bleu(samples) <= 100.0


def test_distinct_n_by_hand():
    # characters: "abab" has bigrams ab, ba, ab; "abc" has ab, bc -> {ab, ba, bc} / 5
    assert distinct_n(["abab", "abc"], 2) == pytest.approx(3 / 5)
    assert distinct_n(["abab", "abc"], 1) == pytest.approx(3 / 7)
    assert distinct_n(["aaaa"], 1) == pytest.approx(1 / 4)
    # words: "the cat the cat", "the dog" -> bigrams (the cat)(cat the)(the cat)(the dog)
    assert distinct_n(["the cat the cat", "the dog"], 2, level="word") == pytest.approx(3 / 4)
    assert distinct_n(["a b", "a  b"], 1, level="word") == pytest.approx(2 / 4)
    assert distinct_n(["a b"], 1, level="char") == pytest.approx(1.0)  # 'a', ' ', 'b'


def test_distinct_n_edge_cases():
    assert distinct_n([], 2) == 0.0
    assert distinct_n(["a", ""], 2) == 0.0  # no sample is long enough
    assert distinct_n(["xy", "xy"], 2) == 0.5
    with pytest.raises(ValueError):
        distinct_n(["abc"], 0)
    with pytest.raises(ValueError):
        distinct_n(["abc"], 1, level="byte")  # type: ignore[arg-type]
    assert mean_distinct_n([["ab", "ab"], ["ab", "cd"]], 2) == pytest.approx((0.5 + 1.0) / 2)
    assert math.isnan(mean_distinct_n([], 1))


def test_entropy_of_uniform_logits_is_log_v():
    logits = torch.zeros(2, 3, 99)
    mask = torch.ones(2, 3)
    assert float(mean_token_entropy(logits, mask)) == pytest.approx(math.log(99), rel=1e-6)


def test_entropy_of_one_hot_logits_is_zero_and_mask_selects_positions():
    logits = torch.zeros(1, 2, 5)
    logits[0, 0] = torch.tensor([50.0, 0, 0, 0, 0])  # nearly one-hot
    logits[0, 1] = torch.tensor([0.0, -math.inf, -math.inf, -math.inf, -math.inf])  # one-hot
    assert float(mean_token_entropy(logits, torch.tensor([[1.0, 1.0]]))) < 1e-18
    logits[0, 1] = 0.0  # uniform over 5, excluded by the mask
    assert float(mean_token_entropy(logits, torch.tensor([[1, 0]]))) == pytest.approx(
        0.0, abs=1e-18
    )
    assert float(mean_token_entropy(logits, torch.tensor([[0, 1]]))) == pytest.approx(math.log(5))


def test_entropy_is_fp32_for_half_logits_and_nan_for_an_empty_mask():
    logits = torch.randn(3, 4, 7).to(torch.bfloat16)
    out = mean_token_entropy(logits, torch.ones(3, 4))
    assert out.dtype == torch.float32 and out.ndim == 0
    assert 0.0 < float(out) <= math.log(7) + 1e-6
    assert math.isnan(float(mean_token_entropy(logits, torch.zeros(3, 4))))
    nan_padding = torch.zeros(1, 2, 3)
    nan_padding[0, 1] = math.nan  # garbage at a masked-out position does not leak
    assert float(mean_token_entropy(nan_padding, torch.tensor([[1, 0]]))) == pytest.approx(
        math.log(3)
    )
    with pytest.raises(ValueError, match="mask shape"):
        mean_token_entropy(logits, torch.ones(3))
