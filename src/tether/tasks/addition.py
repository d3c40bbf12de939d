"""Scratchpad addition (Lee et al. 2024), the task of the critical-token paper.

Prompt ``Input:\\n{a}+{b}\\nTarget:``; the target is a scratchpad that peels one digit off
each operand per line, then the answer as space-separated digits (docs/methods.md §3)::

    <scratch>
    [1,2,3,4] + [5,6,7] , A=[] , C=0 , 4+7+0=11 , A->1 , C->1
    ...
    [] + [] , A=[1,8,0,1] C=0 , END
    </scratch>
    1 8 0 1

Everything here is plain Python: generators, the checker, and the critical-token locator.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

SCRATCH_OPEN = "<scratch>"
SCRATCH_CLOSE = "</scratch>"


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return make_prompt(self.a, self.b)

    @property
    def target(self) -> str:
        return make_target(self.a, self.b)

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def digits(self) -> tuple[int, int]:
        return len(str(self.a)), len(str(self.b))


def make_prompt(a: int, b: int) -> str:
    return f"Input:\n{a}+{b}\nTarget:"


def _digit_list(digits: list[int]) -> str:
    return "[" + ",".join(str(d) for d in digits) + "]"


def make_target(a: int, b: int) -> str:
    """The scratchpad and answer for ``a + b`` (non-negative integers), without EOS."""
    if a < 0 or b < 0:
        raise ValueError(f"operands must be non-negative, got {a} and {b}")
    xs = [int(c) for c in str(a)]
    ys = [int(c) for c in str(b)]
    acc: list[int] = []  # answer digits so far, most significant first
    carry = 0
    lines = []
    while xs or ys:
        x = xs[-1] if xs else 0
        y = ys[-1] if ys else 0
        total = x + y + carry
        digit, new_carry = total % 10, total // 10
        lines.append(
            f"{_digit_list(xs)} + {_digit_list(ys)} , A={_digit_list(acc)} , C={carry} , "
            f"{x}+{y}+{carry}={total} , A->{digit} , C->{new_carry}"
        )
        xs, ys = xs[:-1], ys[:-1]
        acc = [digit] + acc
        carry = new_carry
    lines.append(f"[] + [] , A={_digit_list(acc)} C={carry} , END")
    answer = ([carry] if carry else []) + acc
    body = "\n".join(lines)
    return f"\n{SCRATCH_OPEN}\n{body}\n{SCRATCH_CLOSE}\n" + " ".join(str(d) for d in answer)


# Extra new tokens beyond the longest reference completion: EOS, and slack so that a model
# that is off by a few characters is judged wrong rather than cut off.
GENERATION_MARGIN = 16


def max_completion_tokens(digits: int) -> int:
    """A generation budget for problems whose longer operand has ``digits`` digits.

    All nines gives the longest scratchpad of that length (a carry on every line, two-digit
    sums, and an extra answer digit); shorter operands only shorten the lines.
    """
    largest = 10**digits - 1
    return len(make_target(largest, largest)) + GENERATION_MARGIN


# ----------------------------------------------------------------------------- answers


_ANSWER_RE = re.compile(r"^\s*([0-9](?: [0-9])*)\s*$")
MAX_ANSWER_DIGITS = 1000  # far beyond any task length; keeps int() within Python's limit


def parse_answer(completion: object) -> int | None:
    """The integer on the line after ``</scratch>``, or None. Never raises."""
    if not isinstance(completion, str):
        return None
    idx = completion.find(SCRATCH_CLOSE)
    if idx < 0:
        return None
    rest = completion[idx + len(SCRATCH_CLOSE) :].lstrip("\n")
    line = rest.split("\n", 1)[0]
    if len(line) > 2 * MAX_ANSWER_DIGITS:
        return None
    m = _ANSWER_RE.match(line)
    if m is None:
        return None
    return int(m.group(1).replace(" ", ""))


def is_correct(problem: Problem, completion: object) -> bool:
    """Exact match of the answer line; never raises on arbitrary output."""
    return parse_answer(completion) == problem.answer


def digit_score(problem: Problem, completion: object) -> float:
    """A graded score in [0, 1]: the share of answer digits that are right, aligned from the
    units digit, over the longer of the written and the true answer; 0 without an answer
    line, 1 exactly when :func:`is_correct`. Never raises.

    E.g. for 1234 + 4321 = 5555: "5 5 5 5" scores 1, "5 5 4 5" 0.75, "5 5 5" 0.75 (three of
    four places right), "1 5 5 5 5" 0.8 (an extra digit counts as a wrong place).
    """
    written = parse_answer(completion)
    if written is None:
        return 0.0
    pred, true = str(written), str(problem.answer)
    width = max(len(pred), len(true))
    pred, true = pred.rjust(width, " "), true.rjust(width, " ")
    return sum(a == b for a, b in zip(pred, true, strict=True)) / width


# ----------------------------------------------------------------------------- sampling


def random_operand(rng: random.Random, n_digits: int) -> int:
    """Uniform integer with exactly ``n_digits`` digits (0..9 for one digit)."""
    if n_digits < 1:
        raise ValueError(f"n_digits must be >= 1, got {n_digits}")
    if n_digits == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (n_digits - 1), 10**n_digits - 1)


def pretrain_problem(rng: random.Random, max_digits: int) -> Problem:
    """Pre-training distribution: each operand's length uniform over 1..N."""
    la, lb = rng.randint(1, max_digits), rng.randint(1, max_digits)
    return Problem(random_operand(rng, la), random_operand(rng, lb))


def rl_problem(rng: random.Random, max_digits: int) -> Problem:
    """RL distribution on N+1 digits: one operand has N+1 digits; the other has 1..N digits
    or N+1 digits, half each; the long operand's side is random."""
    long_len = max_digits + 1
    other_len = long_len if rng.random() < 0.5 else rng.randint(1, max_digits)
    long_op, other = random_operand(rng, long_len), random_operand(rng, other_len)
    return Problem(long_op, other) if rng.random() < 0.5 else Problem(other, long_op)


def equal_length_problem(rng: random.Random, digits: int) -> Problem:
    """Both operands have ``digits`` digits (the paper's Table 4)."""
    return Problem(random_operand(rng, digits), random_operand(rng, digits))


def varying_length_problem(rng: random.Random, digits: int) -> Problem:
    """One operand has ``digits`` digits, the other 1..digits, random side (Table 5)."""
    long_op, other = random_operand(rng, digits), random_operand(rng, rng.randint(1, digits))
    return Problem(long_op, other) if rng.random() < 0.5 else Problem(other, long_op)


# ----------------------------------------------------------------------------- critical tokens


def critical_positions(problem: Problem, max_digits: int, lines: int = 3) -> list[int]:
    """Character offsets in ``problem.target`` of the critical tokens, as the released code of
    Vassoyan et al. (2025) marks them (``Prompt.extract_critical_tokens``): for every operand
    whose original length n exceeds N = ``max_digits`` (gap = n − N), on each of the first
    ``lines`` scratchpad lines, the last 2·gap characters of that operand's list before its
    ``]``, alternately a digit and a comma. On line 1 these are the comma after the N-th digit
    (the comma-vs-``]`` decision a model pre-trained on ≤ N digits has never had to make) and
    the digits beyond; on lines 2 and 3 the same count of characters at the end of the
    shortened list. The gap is the original one, not recomputed per line. Returned sorted;
    empty when no operand exceeds N digits.
    """
    target = problem.target
    gaps = [len(str(problem.a)) - max_digits, len(str(problem.b)) - max_digits]
    positions: list[int] = []
    line_start = target.index(SCRATCH_OPEN) + len(SCRATCH_OPEN) + 1
    for _ in range(lines):
        line_end = target.find("\n", line_start)
        line = target[line_start:line_end]
        if line.startswith("[] + []"):
            break
        # the two operand lists are the first two bracketed groups of the line
        for gap, m in zip(gaps, list(re.finditer(r"\[([0-9,]*)\]", line))[:2], strict=False):
            if gap <= 0:
                continue
            close = m.end(1)  # the offset of the list's "]" in the line
            marked = min(2 * gap, close - m.start(1))  # never past the list's "["
            positions += [line_start + close - 1 - i for i in range(marked)]
        line_start = line_end + 1
    return sorted(positions)


# Every character a scratchpad target is written in: the digits, the list and line syntax,
# "<scratch>", "</scratch>", "END" and the newlines (one target with every digit in it is
# enough: the format has no other characters).
ALPHABET = "".join(sorted(set(make_target(1234567890, 9876543210) + "0123456789")))
