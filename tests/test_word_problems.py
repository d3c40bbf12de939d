"""The word-problem task (tether.tasks.word_problems): generation, the verifier, the registry."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from real_tokenizer import bpe_tokenizer
from tether.config import load_recipe
from tether.tasks import TASKS, WordProblemTask, get_task, task_from_config
from tether.tasks import word_problems as wp
from tether.tasks.prompts import format_prompt


def _problems(n: int, max_digits: int = 1, seed: int = 0, **kw) -> list[wp.Problem]:
    rng = random.Random(seed)
    return [wp.make_problem(rng, max_digits, **kw) for _ in range(n)]


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("max_digits", [1, 2, 3])
def test_operands_and_answers_stay_within_max_digits(max_digits):
    top = 10**max_digits - 1
    for p in _problems(400, max_digits):
        assert 1 <= p.a <= top and 1 <= p.b <= top
        assert 1 <= p.answer <= top  # sums at most `top`, differences at least 1
        if p.op == "-":
            assert p.a > p.b
        assert p.name != p.friend


def test_generation_is_seeded_and_covers_every_kind_template_and_operation():
    assert _problems(50, seed=3) == _problems(50, seed=3)
    assert _problems(50, seed=3) != _problems(50, seed=4)
    seen = {(p.kind, p.op, p.template) for p in _problems(600)}
    stories = {("story", op, i) for op in "+-" for i in range(len(wp.STORIES[op]))}  # type: ignore[index]
    assert stories <= seen
    assert {op for kind, op, _ in seen if kind == "question"} == {"+", "-"}
    only = {(p.kind, p.op) for p in _problems(100, kinds=("question",), operations=("-",))}
    assert only == {("question", "-")}
    with pytest.raises(ValueError, match="max_digits"):
        wp.make_problem(random.Random(0), 0)


def test_prompts_read_as_written_by_hand():
    p = wp.Problem(5, 1, "+", "story", 2, "Mia", "Leo", ("apple", "apples"))
    assert p.prompt == (
        "Mia had 5 apples and found 1 more apple. How many apples does Mia have in total? "
        "Answer with the number only."
    )
    assert p.answer == 6
    q = wp.Problem(7, 3, "-", "question", 0, "Mia", "Leo", ("apple", "apples"), "")
    assert q.prompt == "What is 7 - 3?" and q.answer == 4
    s = wp.Problem(1, 1, "-", "story", 0, "Ava", "Sam", ("coin", "coins"))
    assert (
        s.question == "Ava has 1 coin. Ava gives 1 coin to Sam. How many coins does Ava have left?"
    )


def test_the_demonstration_is_worked_and_verifies():
    for p in _problems(100, 2):
        assert p.target == f"{p.a} {p.op} {p.b} = {p.answer}. The answer is {p.answer}."
        assert wp.is_correct(p, p.target)


# ----------------------------------------------------------------------------- the verifier


@pytest.mark.parametrize(
    ("completion", "value"),
    [
        ("81", 81),
        ("81.", 81),
        ("$81", 81),
        ("**81**", 81),
        ("81.0", 81.0),
        ("81.5", 81.5),  # kept as written: not 81
        ("1,234 apples", 1234),
        ("-3", -3),
        ("Mia has 6 + 8 = 14 apples.", 14),  # the last number
        ("23 + 58 = 81. The answer is 81.", 81),
        ("The answer is 81 because 23 + 58 = 81, not 80", 81),  # after the last marker
        ("Answer: 81\n(23 + 58 = 81, or 82 if you count one more)", 81),
        ("#### 101\nThe answer is: 101", 101),
        ("The answer is eighty-one, not 80", 80),  # no number after the marker: the last one
        ("23-58", 58),  # a minus between numbers is not a sign
        ("no number at all", None),
        ("", None),
        ("9" * 100, None),  # absurdly long
    ],
)
def test_parse_final_number(completion, value):
    parsed = wp.parse_final_number(completion)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("junk", [None, 81, b"81", ["81"], "\x00\uffff", "1e400", "." * 50])
def test_the_verifier_never_raises(junk):
    p = wp.Problem(40, 41, "+", "question", 0, "Mia", "Leo", ("apple", "apples"))
    assert wp.is_correct(p, junk) in (True, False)
    assert 0.0 <= wp.place_score(p, junk) <= 1.0


@settings(max_examples=300, deadline=None)
@given(
    completion=st.one_of(
        st.text(max_size=80), st.text(alphabet="0123456789,.-$* \nAnswer:is#", max_size=80)
    ),
    seed=st.integers(0, 10**6),
)
def test_the_checker_accepts_any_model_output(completion, seed):
    task = get_task("word-problems", 2)
    problem = task.pretrain_problem(random.Random(seed))
    assert task.is_correct(problem, completion) in (True, False)
    assert 0.0 <= task.score(problem, completion) <= 1.0
    assert task.is_correct(problem, completion) == (task.score(problem, completion) == 1.0)


def test_correctness_is_strict_about_the_value_and_the_score_counts_places():
    p = wp.Problem(23, 58, "+", "question", 0, "Mia", "Leo", ("apple", "apples"))
    assert wp.is_correct(p, "The answer is 81.") and wp.is_correct(p, "81.0")
    assert not wp.is_correct(p, "81.5") and not wp.is_correct(p, "80") and not wp.is_correct(p, "")
    # places aligned from the units, over the longer of the two
    assert wp.place_score(p, "81") == 1.0
    assert wp.place_score(p, "71") == 0.5  # units right, tens wrong
    assert wp.place_score(p, "181") == pytest.approx(2 / 3)  # an extra place counts as wrong
    assert wp.place_score(p, "1") == 0.5  # " 1" against "81"
    assert wp.place_score(p, "18") == 0.0
    assert wp.place_score(p, "-81") == 0.0 and wp.place_score(p, "81.5") == 0.0
    assert wp.place_score(p, "no answer") == 0.0


# ----------------------------------------------------------------------------- the task


def test_the_task_is_registered_and_configurable(tmp_path):
    assert "word-problems" in TASKS
    task = get_task("word-problems", 1)
    assert isinstance(task, WordProblemTask) and task.max_digits == 1
    assert task.max_new_tokens() == wp.MAX_NEW_TOKENS
    rng = random.Random(0)
    problem = task.rl_problem(rng)
    assert task.is_correct(problem, str(problem.answer))
    assert task.score(problem, str(problem.answer)) == 1.0
    assert task.pretrain_problem(random.Random(1)) == task.rl_problem(random.Random(1))

    recipe = load_recipe(None, ["task.name=word-problems", "task.max_digits=2"])
    built = task_from_config(recipe.task)
    assert isinstance(built, WordProblemTask) and built.max_digits == 2


def test_prompts_go_through_the_chat_template():
    tok = bpe_tokenizer()
    task = get_task("word-problems", 1)
    problem = task.rl_problem(random.Random(0))
    text = task.model_input(tok, problem)
    assert text == format_prompt(tok, problem.prompt, task.prompt_format)
    assert text.startswith("<|im_start|>user\n" + problem.prompt)
    assert text.endswith("<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- preference pairs


def test_wrong_answers_by_hand():
    def wrong(a, op, b):
        return wp.wrong_answers(
            wp.Problem(a, b, op, "question", 0, "Mia", "Leo", ("coin", "coins"))
        )

    # 7 - 2 = 5: the sum 9, off by one 4 and 6, the operands 7 and 2
    assert wrong(7, "-", 2) == (2, 4, 6, 7, 9)
    # 3 + 3 = 6: the difference 0, off by one 5 and 7, the operand 3 (once)
    assert wrong(3, "+", 3) == (0, 3, 5, 7)
    # 2 - 1 = 1: the sum 3, off by one 0 and 2, the operands 2 and 1 (1 is the answer: left out)
    assert wrong(2, "-", 1) == (0, 2, 3)
    # 1 + 2 = 3: the difference 1, off by one 2 and 4, the operands 1 and 2
    assert wrong(1, "+", 2) == (1, 2, 4)


@pytest.mark.parametrize("max_digits", [1, 2])
def test_every_wrong_answer_is_wrong_non_negative_and_seeded_by_the_prompt(max_digits):
    seen = set()
    for p in _problems(300, max_digits):
        wrong = wp.wrong_answer(p)
        assert wrong in wp.wrong_answers(p) and wrong != p.answer and wrong >= 0
        assert not wp.is_correct(p, str(wrong)) and wp.is_correct(p, str(p.answer))
        assert wp.wrong_answer(p) == wrong  # a function of the problem
        seen.add(wrong - p.answer)
    assert {-1, 1} <= seen and len(seen) > 4  # off by one, and the other kinds of slip


def test_the_preference_task_pairs_the_plain_tasks_problems():
    from tether.tasks.preferences import WordPreferencePair, WordProblemPrefsTask

    assert "word-problems-prefs" in TASKS
    prefs, plain = get_task("word-problems-prefs", 1), get_task("word-problems", 1)
    assert isinstance(prefs, WordProblemPrefsTask) and prefs.max_digits == 1
    assert prefs.max_new_tokens() == wp.MAX_NEW_TOKENS
    rng_a, rng_b = random.Random("tether-eval/0"), random.Random("tether-eval/0")
    for _ in range(50):
        pair, problem = prefs.rl_problem(rng_a), plain.rl_problem(rng_b)
        assert isinstance(pair, WordPreferencePair) and pair.problem == problem
        assert pair.prompt == problem.prompt and pair.target == pair.chosen
        assert pair.chosen == str(problem.answer)
        assert pair.rejected == str(wp.wrong_answer(problem))
        assert prefs.is_correct(pair, f"The answer is {pair.chosen}.")
        assert not prefs.is_correct(pair, pair.rejected)
        assert prefs.score(pair, pair.chosen) == 1.0
    assert prefs.pretrain_problem(random.Random(1)) == prefs.rl_problem(random.Random(1))
    recipe = load_recipe(None, ["task.name=word-problems-prefs", "task.max_digits=1"])
    assert isinstance(task_from_config(recipe.task), WordProblemPrefsTask)


def test_addition_chat_is_a_plain_sum_judged_by_the_final_number():
    """task addition-chat: "What is a + b?" without an instruction, sums only, bounded by
    max_digits; the model's own wording is judged by its final number."""
    task = get_task("addition-chat", 3)
    rng = random.Random(0)
    for _ in range(100):
        p = task.rl_problem(rng)
        assert p.op == "+" and p.kind == "question" and p.answer <= 999
        assert p.prompt == f"What is {p.a} + {p.b}?"
        assert task.is_correct(p, f"{p.a} + {p.b} = {p.answer}")
        assert not task.is_correct(p, f"The sum is {p.answer + 1}.")
    assert "addition-chat" in TASKS
