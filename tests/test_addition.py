"""The scratchpad generator, checker and critical-token locator against hand-worked cases."""

import random

import pytest

from tether.tasks.addition import (
    Problem,
    critical_positions,
    equal_length_problem,
    is_correct,
    make_prompt,
    parse_answer,
    pretrain_problem,
    rl_problem,
    varying_length_problem,
)

METHODS_EXAMPLE = """
<scratch>
[1,2,3,4] + [5,6,7] , A=[] , C=0 , 4+7+0=11 , A->1 , C->1
[1,2,3] + [5,6] , A=[1] , C=1 , 3+6+1=10 , A->0 , C->1
[1,2] + [5] , A=[0,1] , C=1 , 2+5+1=8 , A->8 , C->0
[1] + [] , A=[8,0,1] , C=0 , 1+0+0=1 , A->1 , C->0
[] + [] , A=[1,8,0,1] C=0 , END
</scratch>
1 8 0 1"""


def test_prompt_format():
    assert make_prompt(1234, 567) == "Input:\n1234+567\nTarget:"


def test_target_matches_methods_example_with_carries_and_unequal_lengths():
    assert Problem(1234, 567).target == METHODS_EXAMPLE


def test_final_carry_is_prepended_to_the_answer():
    assert Problem(99, 1).target == (
        "\n<scratch>\n"
        "[9,9] + [1] , A=[] , C=0 , 9+1+0=10 , A->0 , C->1\n"
        "[9] + [] , A=[0] , C=1 , 9+0+1=10 , A->0 , C->1\n"
        "[] + [] , A=[0,0] C=1 , END\n"
        "</scratch>\n"
        "1 0 0"
    )


def test_zero_operands():
    assert Problem(0, 0).target == (
        "\n<scratch>\n[0] + [0] , A=[] , C=0 , 0+0+0=0 , A->0 , C->0\n[] + [] , A=[0] C=0 , END\n</scratch>\n0"
    )
    assert Problem(5, 0).target.endswith("</scratch>\n5")


def test_shorter_first_operand():
    assert Problem(7, 85).target == (
        "\n<scratch>\n"
        "[7] + [8,5] , A=[] , C=0 , 7+5+0=12 , A->2 , C->1\n"
        "[] + [8] , A=[2] , C=1 , 0+8+1=9 , A->9 , C->0\n"
        "[] + [] , A=[9,2] C=0 , END\n"
        "</scratch>\n"
        "9 2"
    )


@pytest.mark.parametrize("seed", range(5))
def test_every_generated_target_parses_to_the_sum(seed):
    rng = random.Random(seed)
    for _ in range(200):
        p = pretrain_problem(rng, 6)
        assert parse_answer(p.target) == p.a + p.b
        assert is_correct(p, p.target)


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        None,
        42,
        b"bytes",
        "</scratch>",
        "</scratch>\n",
        "</scratch>\n1 2 x",
        "</scratch>\n12 3",
        "</scratch>\n-1",
        "\n<scratch>\n[1,2] + [3",  # truncated mid-scratchpad
        "</scratch>\n" + "9 " * 10000,
        "\x00\xff\u2603</scratch>\n\u0661",  # arabic-indic digit one is not an ASCII digit
        "</scratch></scratch>\n1",
    ],
    ids=lambda g: repr(g)[:20],
)
def test_parser_and_checker_never_raise(garbage):
    parse_answer(garbage)
    assert is_correct(Problem(1, 2), garbage) is False


def test_parser_accepts_trailing_text_on_later_lines_only():
    assert parse_answer("...\n</scratch>\n1 8 0 1\n<eos junk>") == 1801
    assert parse_answer("...\n</scratch>\n1 8 0 1 junk") is None


def _marked(problem, n):
    """The marked characters, line by line (scratchpad lines 1, 2, 3)."""
    t = problem.target
    by_line = {}
    for i in critical_positions(problem, n):
        line = t.count("\n", 0, i) - 1  # line 1 follows "\n<scratch>\n"
        by_line.setdefault(line, []).append(t[i])
    return {k: "".join(v) for k, v in by_line.items()}


def test_critical_positions_hand_worked():
    """The released code's rule: for an operand of n > N digits (gap n − N), the last 2·gap
    characters of its list before "]" on scratchpad lines 1-3, with the original gap."""
    p = Problem(1234, 567)
    # line 1 starts at offset 11 ("\n<scratch>\n"); "[1,2,3,4]": the comma after 3 and the 4
    assert critical_positions(p, 3)[:2] == [17, 18]
    # lines 2 and 3: the last comma and digit of the shortened lists [1,2,3] and [1,2]
    assert _marked(p, 3) == {1: ",4", 2: ",3", 3: ",2"}
    line2 = p.target.index("\n[1,2,3] + [5,6]") + 1
    assert critical_positions(p, 3)[2:4] == [line2 + 4, line2 + 5]
    # a gap of 2: four characters per line, on every line
    assert _marked(Problem(12345, 678), 3) == {1: ",4,5", 2: ",3,4", 3: ",2,3"}
    assert _marked(Problem(12345, 678), 4) == {1: ",5", 2: ",4", 3: ",3"}
    # both operands of N+1 digits: both lists marked on each line
    q = Problem(1234, 5678)
    assert _marked(q, 3) == {1: ",4,8", 2: ",3,7", 3: ",2,6"}
    # the second operand holds the long list
    r = Problem(12, 34567)
    assert _marked(r, 3) == {1: ",6,7", 2: ",5,6", 3: ",4,5"}
    # fewer lines asked: only those
    assert _marked(p, 3) != _marked_lines(p, 3, 1) and _marked_lines(p, 3, 1) == {1: ",4"}


def _marked_lines(problem, n, lines):
    t = problem.target
    by_line = {}
    for i in critical_positions(problem, n, lines=lines):
        by_line.setdefault(t.count("\n", 0, i) - 1, []).append(t[i])
    return {k: "".join(v) for k, v in by_line.items()}


def test_no_critical_positions_within_pretraining_lengths():
    assert critical_positions(Problem(123, 456), 3) == []
    assert critical_positions(Problem(1, 2), 1) == []


def test_rl_distribution():
    rng = random.Random(0)
    N = 3
    same = 0
    for _ in range(2000):
        p = rl_problem(rng, N)
        la, lb = p.digits
        assert max(la, lb) == N + 1
        assert min(la, lb) >= 1
        same += la == lb
    assert 0.45 < same / 2000 < 0.6  # half equal N+1, plus nothing else reaches N+1


def test_pretraining_lengths_are_balanced():
    rng = random.Random(1)
    counts = {d: 0 for d in range(1, 5)}
    for _ in range(8000):
        la, lb = pretrain_problem(rng, 4).digits
        counts[la] += 1
        counts[lb] += 1
    assert all(abs(c / 16000 - 0.25) < 0.02 for c in counts.values())


def test_eval_distributions():
    rng = random.Random(2)
    for _ in range(100):
        assert equal_length_problem(rng, 4).digits == (4, 4)
        assert max(varying_length_problem(rng, 4).digits) == 4


def test_long_fraction_mixes_in_n_plus_1_problems():
    from tether.tasks import get_task

    rng = random.Random(3)
    pure = get_task("addition", 3)
    assert all(max(pure.pretrain_problem(rng).digits) <= 3 for _ in range(2000))
    mixed = get_task("addition", 3, long_fraction=0.1)
    long = sum(max(mixed.pretrain_problem(rng).digits) == 4 for _ in range(5000))
    assert 0.08 < long / 5000 < 0.12
