"""Multistep sums: a small task with many correct reasoning chains per prompt.

The prompt lists 3 or 4 small operands; the solution adds them one at a time, in any order,
writing each partial sum, then the answer after ``;``::

    prompt   Sum 12 7 30 5:
    target   12+30=42,42+5=47,47+7=54;54

The first step adds two operands; every later step adds one unused operand to the previous
result. A prompt with n distinct operands has n! distinct correct solutions (24 for four), and
the expert (:func:`expert_solution`) picks one uniformly at random each time it is asked.

**Why it stands in for GSM8k.** The IQLearn paper (Wulfmeier et al. 2024) imitates expert
demonstrations on GSM8k, where (a) the same question has many valid step-by-step solutions, so
the expert distribution is diverse and an imitation method can either cover it or collapse onto
one mode, and (b) the final answer is checkable and so, less strictly, are the intermediate
steps. This task keeps both properties at a scale a character-level model learns in minutes on
a CPU: the diversity is real (all orderings are equally likely under the expert, so a policy's
coverage of them and its Self-BLEU are meaningful), each step is an arithmetic fact that can be
checked against the operands still unused, and the answer is an integer. What it lacks is
language: there is no paraphrase, only reordering, so it measures mode coverage and step
validity, not fluency.

Every character is printable ASCII (letters of ``Sum``, space, digits, ``:+=,;``), all in
:func:`tether.models.loading.char_tokenizer`'s vocabulary. The parsers and checkers here never raise on
arbitrary model output.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from dataclasses import dataclass

from tether.tasks.addition import random_operand

PROMPT_PREFIX = "Sum "
PROMPT_SUFFIX = ":"
STEP_SEP = ","
ANSWER_SEP = ";"

MIN_OPERANDS = 3
MAX_OPERANDS = 4
DEFAULT_MAX_DIGITS = 2
# all_solutions enumerates n! orderings: keep n where that stays cheap
ENUMERATION_LIMIT = 8
# Extra new tokens beyond the longest expert solution: EOS, and slack so that a model that is
# off by a few characters is judged wrong rather than cut off (as in tasks.addition).
GENERATION_MARGIN = 16
# far beyond any operand or sum here; keeps int() within Python's digit limit
MAX_NUMBER_DIGITS = 100


@dataclass(frozen=True)
class Problem:
    """One prompt and one expert solution of it (``target``), sampled with the problem."""

    operands: tuple[int, ...]
    target: str

    @property
    def prompt(self) -> str:
        return make_prompt(self.operands)

    @property
    def answer(self) -> int:
        return sum(self.operands)


def make_prompt(operands: tuple[int, ...] | list[int]) -> str:
    return PROMPT_PREFIX + " ".join(str(x) for x in operands) + PROMPT_SUFFIX


def solution_for_order(ordered: tuple[int, ...] | list[int]) -> str:
    """The solution string that adds ``ordered`` left to right.

    ``(12, 30, 5, 7)`` gives ``12+30=42,42+5=47,47+7=54;54``. One operand gives just ``;x``
    (no step), which never occurs in the task but keeps the function total.
    """
    xs = [int(x) for x in ordered]
    if not xs:
        raise ValueError("a solution needs at least one operand")
    if any(x < 0 for x in xs):
        raise ValueError(f"operands must be non-negative, got {xs}")
    steps = []
    running = xs[0]
    for x in xs[1:]:
        steps.append(f"{running}+{x}={running + x}")
        running += x
    return STEP_SEP.join(steps) + ANSWER_SEP + str(running)


def expert_solution(operands: tuple[int, ...] | list[int], rng: random.Random) -> str:
    """One expert solution: the operands added in an order drawn uniformly from all orders."""
    order = list(operands)
    rng.shuffle(order)
    return solution_for_order(order)


def all_solutions(operands: tuple[int, ...] | list[int]) -> list[str]:
    """Every distinct correct solution (sorted): n! strings for n distinct operands, fewer
    with repeated ones. The support of the expert distribution, for coverage metrics."""
    if len(operands) > ENUMERATION_LIMIT:
        raise ValueError(f"at most {ENUMERATION_LIMIT} operands to enumerate, got {len(operands)}")
    return sorted({solution_for_order(p) for p in itertools.permutations(operands)})


def make_problem(
    rng: random.Random,
    max_digits: int = DEFAULT_MAX_DIGITS,
    min_operands: int = MIN_OPERANDS,
    max_operands: int = MAX_OPERANDS,
) -> Problem:
    """A problem of ``min_operands..max_operands`` operands (count uniform), each with a length
    uniform over 1..``max_digits`` digits (so short and long operands are balanced, as in
    tasks.addition's pre-training), and one expert solution of it."""
    if max_digits < 1:
        raise ValueError(f"max_digits must be >= 1, got {max_digits}")
    if not 2 <= min_operands <= max_operands:
        raise ValueError(
            f"need 2 <= min_operands <= max_operands, got {min_operands} and {max_operands}"
        )
    n = rng.randint(min_operands, max_operands)
    operands = tuple(random_operand(rng, rng.randint(1, max_digits)) for _ in range(n))
    return Problem(operands, expert_solution(operands, rng))


def max_completion_tokens(
    max_digits: int = DEFAULT_MAX_DIGITS, max_operands: int = MAX_OPERANDS
) -> int:
    """A generation budget (characters = tokens with the char tokenizer) for any problem of
    :func:`make_problem` with these bounds.

    All operands ``10**max_digits - 1`` give the longest solution: in any order, step k's
    left term, right term and result are at most k, 1 and k+1 times the largest operand, so
    no other operands give a longer string.
    """
    largest = 10**max_digits - 1
    return len(solution_for_order([largest] * max_operands)) + GENERATION_MARGIN


# ----------------------------------------------------------------------------- checking

_NUMBER = rf"[0-9]{{1,{MAX_NUMBER_DIGITS}}}"
_STEP_RE = re.compile(rf"({_NUMBER})\+({_NUMBER})=({_NUMBER})")
_ANSWER_RE = re.compile(_NUMBER)


def _split(completion: str) -> tuple[str, str | None]:
    """(steps part, answer part or None when there is no ``;``)."""
    idx = completion.find(ANSWER_SEP)
    if idx < 0:
        return completion, None
    return completion[:idx], completion[idx + 1 :]


def parse_final(completion: object) -> int | None:
    """The integer after the first ``;`` (surrounding whitespace allowed, ASCII digits only,
    nothing else after it), or None. Never raises."""
    if not isinstance(completion, str):
        return None
    _, answer = _split(completion)
    if answer is None:
        return None
    m = _ANSWER_RE.fullmatch(answer.strip())
    return int(m.group(0)) if m else None


def parse_steps(completion: object) -> list[tuple[int, int, int] | None]:
    """The steps before the first ``;``, split on ``,``: ``(a, b, c)`` for ``a+b=c`` (spaces
    around a step allowed, leading zeros read as the number), None for a step that is not of
    that form. An empty steps part gives no steps. Never raises."""
    if not isinstance(completion, str):
        return []
    steps_part, _ = _split(completion)
    if not steps_part.strip():
        return []
    out: list[tuple[int, int, int] | None] = []
    for chunk in steps_part.split(STEP_SEP):
        m = _STEP_RE.fullmatch(chunk.strip())
        out.append((int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None)
    return out


def is_correct(problem: Problem, completion: object) -> bool:
    """The final answer (after ``;``) equals the sum; the steps are not checked. Never raises."""
    return parse_final(completion) == problem.answer


def step_validity(problem: Problem, completion: object) -> list[bool]:
    """For each written step, whether it is valid given the steps before it. Never raises.

    Step 1 ``a+b=c`` is valid when a and b are two of the operands (as a multiset: a repeated
    operand may be used as often as it appears) and c = a + b. Step k > 1 ``a+b=c`` is valid
    when a is the result written in step k-1, b is an operand not yet used, and c = a + b.
    State advances as written even past an invalid step (an operand it names is consumed if
    still unused; its result becomes the running value), so one slip costs one step, not
    every step after it. A malformed step is invalid and changes nothing.
    """
    remaining = Counter(problem.operands)
    running: int | None = None
    valid: list[bool] = []
    for step in parse_steps(completion):
        if step is None:
            valid.append(False)
            continue
        a, b, c = step
        if running is None:  # first well-formed step: both terms must be operands
            uses_operands = remaining[a] > 0 and remaining[b] > (1 if a == b else 0)
            for x in (a, b):
                if remaining[x] > 0:
                    remaining[x] -= 1
        else:
            uses_operands = a == running and remaining[b] > 0
            if remaining[b] > 0:
                remaining[b] -= 1
        valid.append(uses_operands and a + b == c)
        running = c
    return valid


def score(problem: Problem, completion: object) -> float:
    """A graded score in [0, 1]; 1 exactly for every expert solution. Never raises.

    score = (valid steps + [final answer correct]) / (max(written steps, n − 1) + 1)

    where n is the number of operands (a full solution has n − 1 steps), validity is
    :func:`step_validity`, and the final answer is :func:`is_correct`. Missing steps count as
    invalid, and extra steps beyond n − 1 (which can never be valid, as no operand is left)
    enlarge the denominator, so padding cannot help. The answer alone is worth 1/n.
    """
    valid = step_validity(problem, completion)
    expected_steps = max(len(problem.operands) - 1, 0)
    denominator = max(len(valid), expected_steps) + 1
    return (sum(valid) + float(is_correct(problem, completion))) / denominator
