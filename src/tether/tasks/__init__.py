"""Tasks: data plus its judge. No training code here.

A task gives problems (objects with ``.prompt`` and ``.target``) for pre-training and for RL,
a checker, and a generation budget. ``get_task`` builds one from the recipe's ``task`` section.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

from tether.tasks import addition


class Task(Protocol):
    def pretrain_problem(self, rng: random.Random) -> Any: ...

    def rl_problem(self, rng: random.Random) -> Any: ...

    def is_correct(self, problem: Any, completion: str) -> bool: ...

    def max_new_tokens(self) -> int: ...


@dataclass
class AdditionTask:
    """Scratchpad addition: pre-training on 1..N digits, RL on N+1 (METHODS.md §3)."""

    max_digits: int
    long_fraction: float = 0.0  # share of pre-training problems from the N+1 distribution

    def pretrain_problem(self, rng: random.Random) -> addition.Problem:
        if self.long_fraction and rng.random() < self.long_fraction:
            return addition.rl_problem(rng, self.max_digits)
        return addition.pretrain_problem(rng, self.max_digits)

    def rl_problem(self, rng: random.Random) -> addition.Problem:
        return addition.rl_problem(rng, self.max_digits)

    def is_correct(self, problem: addition.Problem, completion: str) -> bool:
        return addition.is_correct(problem, completion)

    def max_new_tokens(self) -> int:
        return addition.max_completion_tokens(self.max_digits + 1)


@dataclass(frozen=True)
class DigitProblem:
    prompt: str = "Digit:"
    target: str = "7"


class FirstDigitTask:
    """A toy for tests and smoke runs: the completion must start with a digit.

    A random character-level model succeeds about 10% of the time, so RL has signal at once.
    """

    def pretrain_problem(self, rng: random.Random) -> DigitProblem:
        return DigitProblem(target=str(rng.randint(0, 9)))

    def rl_problem(self, rng: random.Random) -> DigitProblem:
        return DigitProblem()

    def is_correct(self, problem: DigitProblem, completion: str) -> bool:
        return isinstance(completion, str) and completion[:1].isdigit() and completion[:1].isascii()

    def max_new_tokens(self) -> int:
        return 2


def get_task(name: str, max_digits: int, long_fraction: float = 0.0) -> Task:
    if name == "addition":
        return AdditionTask(max_digits, long_fraction)
    if name == "first-digit":
        return FirstDigitTask()
    raise ValueError(f"task.name: unknown task {name!r} (known: addition, first-digit)")
