"""The task contract: what every stage and evaluation asks of a task."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import Any, Protocol

from tether.tasks.prompts import PromptFormat, format_prompt


class DataReport(Protocol):
    """What a task read from a file says of it: rows kept and skipped, and why."""

    def summary(self) -> str: ...


class Task(ABC):
    """Problems (objects with ``.prompt`` and ``.target``) for pre-training and for RL, a checker,
    a graded score in [0, 1] and a generation budget. A task read from a file also keeps its
    ``report`` (rows kept and skipped), which a run logs and puts in its summary. Its
    ``prompt_format`` says how a prompt is given to a model (:func:`format_prompt`)."""

    def model_input(self, tokenizer: Any, problem: Any) -> str:
        """The model's input for ``problem``: its prompt in this task's format."""
        return format_prompt(tokenizer, problem.prompt, self.prompt_format)

    report: DataReport | None = None
    # task.chat_template and task.system_prompt: how the prompts are put to a model
    prompt_format: PromptFormat = PromptFormat()
    # the characters its completions are written in, where the task has a closed set (the
    # scratchpad's); None for open text. rl.certainty_support: task restricts the reference's
    # certainty to them (and EOS)
    alphabet: str | None = None

    @property
    def has_references(self) -> bool:
        """Whether the checker and the score can judge a completion: False for prompt-only rows
        (``task.completion_field: null``), which only the recipe's reward can judge."""
        return True

    @abstractmethod
    def pretrain_problem(self, rng: random.Random) -> Any: ...

    @abstractmethod
    def rl_problem(self, rng: random.Random) -> Any: ...

    @abstractmethod
    def is_correct(self, problem: Any, completion: str) -> bool: ...

    def score(self, problem: Any, completion: str) -> float:
        """Graded quality in [0, 1]; tasks without partial credit return float(is_correct)."""
        return float(self.is_correct(problem, completion))

    @abstractmethod
    def max_new_tokens(self) -> int: ...
