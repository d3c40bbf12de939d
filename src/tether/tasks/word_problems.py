"""Arithmetic word problems: a checkable task for real (pretrained, chat) language models.

One addition or subtraction of two numbers, put as a short story or as a direct question
(half each), and a verifier::

    prompt   Ava had 7 shells and lost 2 shells. How many shells does Ava have now? Answer
             with the number only.
    prompt   What is 5 + 3? Answer with the number only.
    target   5 + 3 = 8. The answer is 8.

Problems are generated from a seeded ``random.Random`` (no download): ``max_digits`` bounds
the operands and the answer (sums up to 10^max_digits − 1; a difference is at least 1). The
verifier reads the completion's final number (:func:`parse_final_number`): lenient about the
writing (``8``, ``8.``, ``$8``, ``**8**``, ``8.0``, ``1,234``, "The answer is 8 shells"),
strict about the value. A completion with an answer marker (``Answer:``, ``answer is``,
``####``) is read at the last marker; without one, its last number counts.

**Preference pairs** (``task.name: word-problems-prefs``, :mod:`tether.tasks.preferences`) put
the right answer, written as the instruction asks (``8``), over a plausible wrong one
(:func:`wrong_answers`: the other operation's result, the answer off by one, or an operand
copied from the question), picked by :func:`wrong_answer` from a generator seeded with the
prompt, so the pairs are a function of the problems and the problem stream is the task's own.

The design was chosen by measurement (``benchmarks/real_task_accuracy.py``; the table is in
docs/rl.md, "A task for real models"): SmolLM2-135M-Instruct, through its chat template with
its default system prompt, answers 16% [11.6, 21.7] of 200 problems with ``max_digits`` 1 when
sampling at T = 1 and 50.5% greedily, so RL has signal and room. At 2 digits it answers 4.5%.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from random import Random
from typing import Literal

Operation = Literal["+", "-"]

INSTRUCTIONS: dict[str, str] = {
    # the shipped design: a bare number (the measured accuracy is in the module docstring)
    "number": "Answer with the number only.",
    # alternatives the benchmark measures
    "answer-line": "End your reply with a line 'Answer: N', where N is the number.",
    "none": "",
}
DEFAULT_INSTRUCTION = "number"
DEFAULT_MAX_DIGITS = 1
OPERATIONS: tuple[Operation, ...] = ("+", "-")
# a story ("Mia had 5 apples and lost 2. ...") or a direct question ("What is 5 - 2?")
Kind = Literal["story", "question"]
KINDS: tuple[Kind, ...] = ("story", "question")

NAMES = (
    "Mia", "Leo", "Ava", "Sam", "Zoe", "Ben", "Lily", "Omar", "Nora", "Eli", "Ruby", "Max",
)  # fmt: skip
# (singular, plural)
ITEMS = (
    ("apple", "apples"), ("marble", "marbles"), ("sticker", "stickers"), ("book", "books"),
    ("pencil", "pencils"), ("cookie", "cookies"), ("coin", "coins"), ("shell", "shells"),
    ("card", "cards"), ("balloon", "balloons"),
)  # fmt: skip

# {name}, {friend}: two different names; {a}, {b}: "<count> <item>" phrases; {items}: plural
STORIES: dict[Operation, tuple[str, ...]] = {
    "+": (
        "{name} has {a}. {friend} gives {name} {b_more}. How many {items} does {name} have now?",
        "There are {a} in a box. {name} puts {b_more} into the box. How many {items} are in "
        "the box now?",
        "{name} had {a} and found {b_more}. How many {items} does {name} have in total?",
        "{name} has {a} and {friend} has {b}. How many {items} do they have together?",
    ),
    "-": (
        "{name} has {a}. {name} gives {b} to {friend}. How many {items} does {name} have left?",
        "There are {a} in a box. {name} takes {b} out of the box. How many {items} are left in "
        "the box?",
        "{name} had {a} and lost {b}. How many {items} does {name} have now?",
        "{name} has {a} and {friend} has {b}. How many more {items} does {name} have than "
        "{friend}?",
    ),
}
QUESTION = "What is {x} {op} {y}?"

# Generation budget: the instruction asks for a bare number, which the model gives in a few
# tokens; a model that explains first (its habit on stories, one sentence per step) is given
# room for a short worked answer, and a ramble past that is cut and judged as written so far.
MAX_NEW_TOKENS = 48
# far beyond any answer here; keeps int() within Python's digit limit
MAX_NUMBER_CHARS = 60


@dataclass(frozen=True)
class Problem:
    """``a op b`` put as a story (``template`` indexes ``STORIES[op]``) or a direct question."""

    a: int
    b: int
    op: Operation
    kind: Kind
    template: int
    name: str
    friend: str
    item: tuple[str, str]
    instruction: str = INSTRUCTIONS[DEFAULT_INSTRUCTION]

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def question(self) -> str:
        """The story and its question (or the direct question), without the instruction."""
        if self.kind == "question":
            return QUESTION.format(x=self.a, op=self.op, y=self.b)
        single, plural = self.item

        def count(n: int, more: bool = False) -> str:
            noun = single if n == 1 else plural
            return f"{n} more {noun}" if more else f"{n} {noun}"

        return STORIES[self.op][self.template].format(
            name=self.name,
            friend=self.friend,
            a=count(self.a),
            b=count(self.b),
            b_more=count(self.b, more=True),
            items=plural,
        )

    @property
    def prompt(self) -> str:
        return f"{self.question} {self.instruction}".strip()

    @property
    def target(self) -> str:
        """A worked demonstration: the equation, then the answer in a sentence."""
        return f"{self.a} {self.op} {self.b} = {self.answer}. The answer is {self.answer}."


def make_problem(
    rng: Random,
    max_digits: int = DEFAULT_MAX_DIGITS,
    operations: tuple[Operation, ...] = OPERATIONS,
    instruction: str = INSTRUCTIONS[DEFAULT_INSTRUCTION],
    kinds: tuple[Kind, ...] = KINDS,
) -> Problem:
    """A problem whose operands and answer have at most ``max_digits`` digits: a sum
    uniform in 2..10^max_digits − 1 split at a uniform point (both operands ≥ 1), or a
    difference a − b with a uniform in 2..10^max_digits − 1 and b in 1..a − 1 (answer ≥ 1);
    the operation, kind, template, names and item uniform."""
    if max_digits < 1:
        raise ValueError(f"max_digits must be >= 1, got {max_digits}")
    top = 10**max_digits - 1
    op = operations[rng.randrange(len(operations))]
    kind = kinds[rng.randrange(len(kinds))]
    if op == "+":
        total = rng.randint(2, top)
        a = rng.randint(1, total - 1)
        b = total - a
    else:
        a = rng.randint(2, top)
        b = rng.randint(1, a - 1)
    template = rng.randrange(len(STORIES[op]))
    name, friend = rng.sample(NAMES, 2)
    item = ITEMS[rng.randrange(len(ITEMS))]
    return Problem(a, b, op, kind, template, name, friend, item, instruction)


# ----------------------------------------------------------------------------- the verifier

# a number: thousands groups with commas ("1,234") or plain digits, an optional sign and
# decimals; "81." ends at the digits
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d,]*\d)")
# where a final answer is announced; the answer is the first number after the last of them
_MARKER = re.compile(r"answer\s*(?:is|:|=)|####", re.IGNORECASE)


def _value(token: str) -> int | float | None:
    digits = token.replace(",", "")
    if len(digits) > MAX_NUMBER_CHARS:
        return None
    if "." not in digits:
        return int(digits)  # exact, however long
    value = float(digits)
    return value if math.isfinite(value) else None


def parse_final_number(completion: object) -> int | float | None:
    """The number a completion gives as its answer, or None. Never raises.

    The first number after the last answer marker (``Answer:``, ``answer is``, ``####``)
    when a number follows one, else the last number in the text. Formatting is
    forgiven (``$81``, ``**81**``, ``81.``, ``1,234``, ``81.0``); the value is kept as
    written, so ``81.5`` is not 81.
    """
    if not isinstance(completion, str):
        return None
    numbers = list(_NUMBER.finditer(completion))
    if not numbers:
        return None
    markers = list(_MARKER.finditer(completion))
    if markers:
        after = [m for m in numbers if m.start() >= markers[-1].end()]
        if after:
            return _value(after[0].group())
    return _value(numbers[-1].group())


def is_correct(problem: Problem, completion: object) -> bool:
    """The final number equals the answer (:func:`parse_final_number`)."""
    return parse_final_number(completion) == problem.answer


def place_score(problem: Problem, completion: object) -> float:
    """A graded score in [0, 1]: the share of the answer's decimal places written right,
    aligned from the units, over the longer of the written and the true answer; 0 without a
    number or for a negative or fractional one, 1 exactly when :func:`is_correct`.

    E.g. for 81: "81" scores 1, "71" 0.5, "181" 2/3 (an extra digit counts as a wrong place).
    """
    written = parse_final_number(completion)
    if written is None or written < 0 or written != int(written):
        return 0.0
    pred, true = str(int(written)), str(problem.answer)
    width = max(len(pred), len(true))
    pred, true = pred.rjust(width), true.rjust(width)
    return sum(x == y for x, y in zip(pred, true, strict=True)) / width


# ----------------------------------------------------------------------------- wrong answers


def wrong_answers(problem: Problem) -> tuple[int, ...]:
    """The plausible wrong answers to ``problem``, ascending: the other operation's result
    (a + b for a difference, |a − b| for a sum), the answer ± 1, and either operand, leaving
    out the answer itself and negative numbers. Never empty (answer + 1 is always there).

    E.g. 7 − 2 = 5: 9 (added), 4 and 6 (off by one), 7 and 2 (operands) → (2, 4, 6, 7, 9).
    """
    n = problem.answer
    other = problem.a + problem.b if problem.op == "-" else abs(problem.a - problem.b)
    candidates = {other, n - 1, n + 1, problem.a, problem.b}
    return tuple(sorted(v for v in candidates if v >= 0 and v != n))


def wrong_answer(problem: Problem) -> int:
    """One of :func:`wrong_answers`, uniform, drawn by a generator seeded with the prompt: the
    same problem always gets the same wrong answer, and drawing it takes nothing from the
    caller's generator (so a preference task's problems are the plain task's)."""
    choices = wrong_answers(problem)
    return choices[Random(f"tether-wrong-answer/{problem.prompt}").randrange(len(choices))]
