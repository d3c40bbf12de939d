"""Multistep sums: the format, a diverse expert that always passes, and checkers that never
raise on arbitrary output."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.models.loading import char_tokenizer
from tether.tasks import MultistepTask, get_task
from tether.tasks.multistep import (
    Problem,
    all_solutions,
    expert_solution,
    is_correct,
    make_problem,
    make_prompt,
    max_completion_tokens,
    parse_final,
    parse_steps,
    score,
    solution_for_order,
    step_validity,
)

P = Problem((12, 7, 30, 5), "12+30=42,42+5=47,47+7=54;54")


def test_format_of_prompt_and_solution():
    assert P.prompt == "Sum 12 7 30 5:"
    assert make_prompt([3, 4, 5]) == "Sum 3 4 5:"
    assert solution_for_order((12, 30, 5, 7)) == "12+30=42,42+5=47,47+7=54;54"
    assert P.answer == 54


def test_every_character_is_in_the_char_tokenizer():
    tok = char_tokenizer()
    rng = random.Random(0)
    text = "".join(p.prompt + p.target for p in (make_problem(rng, 3) for _ in range(200)))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_expert_solutions_are_correct_and_score_one():
    rng = random.Random(1)
    for _ in range(300):
        p = make_problem(rng, max_digits=2)
        assert 3 <= len(p.operands) <= 4
        assert all(0 <= x <= 99 for x in p.operands)
        for sol in (p.target, expert_solution(p.operands, rng)):
            assert is_correct(p, sol)
            assert score(p, sol) == 1.0
            assert all(step_validity(p, sol))
            assert len(sol) + 1 <= max_completion_tokens(2, 4)  # EOS fits the budget


def test_shuffled_orders_give_many_distinct_solutions():
    rng = random.Random(2)
    seen = {expert_solution(P.operands, rng) for _ in range(400)}
    assert len(seen) == 24  # 4! orders, all reached
    assert seen == set(all_solutions(P.operands))
    assert len(all_solutions((5, 5, 9))) == 3  # a repeated operand merges orders


def test_wrong_final_answer_fails():
    wrong = "12+30=42,42+5=47,47+7=54;55"
    assert not is_correct(P, wrong)
    assert parse_final(wrong) == 55
    assert score(P, wrong) == pytest.approx(3 / 4)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("12+30=42,42+5=47,47+7=54;54", 1.0),
        ("12+30=43,43+5=48,48+7=55;55", 2 / 4),  # one slip: later steps chain from it
        ("12+30=42,42+5=47;47", 2 / 4),  # stopped early: a step missing, answer wrong
        (";54", 1 / 4),  # the answer alone
        ("12+30=42,42+5=47,47+7=54,54+0=54;54", 4 / 5),  # padding with a step costs
        ("12+12=24,24+7=31,31+30=61;61", 2 / 4),  # 12 used twice: step 1 invalid
        ("12+30=42,42+30=72,72+5=77;77", 2 / 4),  # 30 reused in step 2
        ("12+30=42,40+5=45,45+7=52;52", 2 / 4),  # step 2 does not chain from 42
        ("12 + 30 = 42,42+5=47,47+7=54 ; 54", 2 / 4),  # malformed step 1: 42 is no operand
        (" 12+30=42 , 42+5=47 , 47+7=54 ; 54 ", 1.0),  # spaces around steps are fine
        ("garbage", 0.0),
        ("", 0.0),
    ],
)
def test_graded_score(completion, expected):
    assert score(P, completion) == pytest.approx(expected)


def test_repeated_operand_may_be_used_as_often_as_it_appears():
    p = Problem((5, 5, 9), "5+5=10,10+9=19;19")
    assert score(p, "5+5=10,10+9=19;19") == 1.0
    assert score(p, "5+9=14,14+5=19;19") == 1.0
    assert step_validity(p, "9+5=14,14+9=23;23") == [True, False]


def test_parsers():
    assert parse_final("1+2=3;3") == 3
    assert parse_final("1+2=3; 3 \n") == 3
    assert parse_final("1+2=3") is None
    assert parse_final("1+2=3;3;3") is None
    assert parse_final(";-3") is None
    assert parse_final(";٣") is None  # a non-ASCII digit is not an answer
    assert parse_final(";" + "9" * 5000) is None  # far beyond Python's int-from-str limit
    assert parse_final(None) is None
    assert parse_steps("1+2=3,x,03+4=7;7") == [(1, 2, 3), None, (3, 4, 7)]
    assert parse_steps(";7") == []


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_checkers_never_raise_on_arbitrary_text(text):
    for completion in (text, P.target[:5] + text, text + ";54", "12+30=42," + text):
        assert parse_final(completion) is None or parse_final(completion) >= 0
        assert isinstance(is_correct(P, completion), bool)
        assert 0.0 <= score(P, completion) <= 1.0
        parse_steps(completion)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789+=,; ", max_size=60), st.integers(0, 2**32))
def test_score_stays_in_unit_interval_on_near_miss_text(text, seed):
    p = make_problem(random.Random(seed))
    assert 0.0 <= score(p, text) <= 1.0
    assert 0.0 <= score(p, p.target + text) <= 1.0


def test_generation_budget_covers_the_longest_solution():
    longest = solution_for_order([99, 99, 99, 99])
    assert longest == "99+99=198,198+99=297,297+99=396;396"
    assert max_completion_tokens(2, 4) == len(longest) + 16


def test_task_protocol_and_registry():
    task = get_task("multistep", 2)
    assert isinstance(task, MultistepTask)
    rng = random.Random(3)
    p = task.pretrain_problem(rng)
    q = task.rl_problem(rng)
    assert task.is_correct(p, p.target) and task.is_correct(q, q.target)
    assert task.score(p, p.target) == 1.0
    assert task.max_new_tokens() == max_completion_tokens(2, 4)
    assert get_task("multistep", 1).pretrain_problem(rng).operands[0] <= 9
    # the existing tasks gained a 0/1 score
    add = get_task("addition", 3)
    ap = add.rl_problem(rng)
    assert add.score(ap, ap.target) == 1.0 and add.score(ap, "nope") == 0.0
    fd = get_task("first-digit", 3)
    assert fd.score(fd.rl_problem(rng), "7") == 1.0
    with pytest.raises(ValueError, match="multistep"):
        get_task("nope", 3)


def test_make_problem_rejects_bad_bounds():
    with pytest.raises(ValueError):
        make_problem(random.Random(0), max_digits=0)
    with pytest.raises(ValueError):
        make_problem(random.Random(0), min_operands=1)
    with pytest.raises(ValueError):
        make_problem(random.Random(0), min_operands=5, max_operands=4)
