"""Tasks: data plus its judge. No training code here.

A task gives problems (objects with ``.prompt`` and ``.target``) for pre-training and for RL,
a checker, a graded score in [0, 1] and a generation budget. ``get_task`` builds one from the
recipe's ``task`` section. :class:`tether.tasks.jsonl.JsonlTask` (a user's prompt/completion
file) and :class:`tether.tasks.preferences.PreferenceTask` (a user's preference pairs) implement
the same protocol but need a path, so they are built by their own constructors
(:func:`task_from_config` builds every kind).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from tether.tasks import addition, multistep, word_problems
from tether.tasks.base import Task
from tether.tasks.enumerable import EXPERT_BEST_SHARE, EnumerableTask
from tether.tasks.prompts import PromptFormat


@dataclass
class AdditionTask(Task):
    """Scratchpad addition: pre-training on 1..N digits, RL on N+1 (docs/methods.md §3)."""

    max_digits: int
    long_fraction: float = 0.0  # share of pre-training problems from the N+1 distribution
    alphabet = addition.ALPHABET

    def pretrain_problem(self, rng: random.Random) -> addition.Problem:
        if self.long_fraction and rng.random() < self.long_fraction:
            return addition.rl_problem(rng, self.max_digits)
        return addition.pretrain_problem(rng, self.max_digits)

    def rl_problem(self, rng: random.Random) -> addition.Problem:
        return addition.rl_problem(rng, self.max_digits)

    def is_correct(self, problem: addition.Problem, completion: str) -> bool:
        return addition.is_correct(problem, completion)

    def score(self, problem: addition.Problem, completion: str) -> float:
        """The share of answer digits that are right (:func:`addition.digit_score`)."""
        return addition.digit_score(problem, completion)

    def max_new_tokens(self) -> int:
        return addition.max_completion_tokens(self.max_digits + 1)


@dataclass(frozen=True)
class DigitProblem:
    prompt: str = "Digit:"
    target: str = "7"


class FirstDigitTask(Task):
    """A toy for tests and smoke runs: the completion must start with a digit.

    A random character-level model succeeds about 10% of the time, so RL has signal at once.
    """

    def pretrain_problem(self, rng: random.Random) -> DigitProblem:
        return DigitProblem(target=str(rng.randint(0, 9)))

    def rl_problem(self, rng: random.Random) -> DigitProblem:
        return DigitProblem()

    def is_correct(self, problem: DigitProblem, completion: str) -> bool:
        return isinstance(completion, str) and completion[:1].isdigit() and completion[:1].isascii()

    def score(self, problem: DigitProblem, completion: str) -> float:
        return float(self.is_correct(problem, completion))

    def max_new_tokens(self) -> int:
        return 2


@dataclass
class MultistepTask(Task):
    """Multistep sums (tasks.multistep): 3-4 operands of 1..``max_digits`` digits, summed in a
    random order with partial sums, so each prompt has many correct solutions.

    Pre-training and RL draw from the same distribution: the task is for imitating a diverse
    expert (IQLearn), not for length generalisation, so there is no N+1 split.
    """

    max_digits: int = multistep.DEFAULT_MAX_DIGITS
    min_operands: int = multistep.MIN_OPERANDS
    max_operands: int = multistep.MAX_OPERANDS

    def pretrain_problem(self, rng: random.Random) -> multistep.Problem:
        return multistep.make_problem(rng, self.max_digits, self.min_operands, self.max_operands)

    def rl_problem(self, rng: random.Random) -> multistep.Problem:
        return self.pretrain_problem(rng)

    def is_correct(self, problem: multistep.Problem, completion: str) -> bool:
        return multistep.is_correct(problem, completion)

    def score(self, problem: multistep.Problem, completion: str) -> float:
        return multistep.score(problem, completion)

    def max_new_tokens(self) -> int:
        return multistep.max_completion_tokens(self.max_digits, self.max_operands)


@dataclass
class WordProblemTask(Task):
    """Arithmetic word problems for real chat models (tasks.word_problems): a story with two
    operands of up to ``max_digits`` digits, one addition or subtraction, a verifier that reads
    the completion's final number. Pre-training (worked demonstrations) and RL draw from the
    same distribution."""

    max_digits: int = word_problems.DEFAULT_MAX_DIGITS
    operations: tuple[word_problems.Operation, ...] = word_problems.OPERATIONS
    instruction: str = word_problems.INSTRUCTIONS[word_problems.DEFAULT_INSTRUCTION]
    kinds: tuple[word_problems.Kind, ...] = word_problems.KINDS

    def pretrain_problem(self, rng: random.Random) -> word_problems.Problem:
        return word_problems.make_problem(
            rng, self.max_digits, self.operations, self.instruction, self.kinds
        )

    def rl_problem(self, rng: random.Random) -> word_problems.Problem:
        return self.pretrain_problem(rng)

    def is_correct(self, problem: word_problems.Problem, completion: str) -> bool:
        return word_problems.is_correct(problem, completion)

    def score(self, problem: word_problems.Problem, completion: str) -> float:
        """The share of the answer's places that are right (:func:`word_problems.place_score`)."""
        return word_problems.place_score(problem, completion)

    def max_new_tokens(self) -> int:
        return word_problems.MAX_NEW_TOKENS


# every task.name, with what it is: the one list of tasks (config validates task.name against it)
TASKS: dict[str, str] = {
    "addition": "scratchpad addition: pre-training on 1..N digits, RL on N+1 (the critical-token task)",
    "first-digit": "a toy for smoke runs: the completion must start with a digit",
    "multistep": "sums of 3-4 operands with partial sums, many correct solutions (IQLearn)",
    "word-problems": "one + or - as a story or a question, for real chat models (SmolLM2); "
    "a final-number verifier; set task.max_digits: 1",
    "jsonl": "your prompt/completion JSON Lines file (task.path)",
    "multistep-prefs": "preference pairs over multistep solutions (DPO, reward model)",
    "addition-chat": "multi-digit sums put as a plain question ('What is 347 + 589?'), answered "
    "in the model's own words and judged by its final number: critical tokens of a chat model "
    "(tether eval --certainty); task.max_digits bounds the sum",
    "word-problems-prefs": "preference pairs on word problems: the right number over a "
    "plausible wrong one (DPO, reward model on SmolLM2); set task.max_digits: 1",
    "prefs-jsonl": "your preference JSON Lines file: prompt, chosen, rejected (task.path)",
    "enumerable": "a response space small enough to enumerate: exact KL and target diagnostics",
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
# the tasks whose problems are preference pairs (train.stage dpo and reward-model need one;
# the stages that sample and score refuse one)
PREFERENCE_TASK_NAMES: tuple[str, ...] = ("multistep-prefs", "word-problems-prefs", "prefs-jsonl")


def get_task(
    name: str,
    max_digits: int,
    long_fraction: float = 0.0,
    demonstrations: str = "uniform",
    expert_share: float | None = None,
) -> Task:
    """The task called ``name``. ``max_digits`` is N for ``addition``, the largest operand
    length for ``multistep`` and ``multistep-prefs`` (2 is their intended setting), the longest
    operand and answer for ``word-problems`` and ``word-problems-prefs`` (1 is their intended
    setting) and the longest answer
    for ``enumerable``; ``long_fraction`` applies to ``addition`` only, ``demonstrations``
    (uniform or expert answers for MLE) and ``expert_share`` (None: the default) to
    ``enumerable`` only. ``first-digit`` ignores them."""
    if name == "addition":
        return AdditionTask(max_digits, long_fraction)
    if name == "first-digit":
        return FirstDigitTask()
    if name == "multistep":
        return MultistepTask(max_digits)
    if name == "word-problems":
        return WordProblemTask(max_digits)
    if name == "enumerable":
        share = EXPERT_BEST_SHARE if expert_share is None else expert_share
        return EnumerableTask(max_digits, demonstrations, share)
    if name == "multistep-prefs":
        # here, not at the top: tasks.preferences imports ``datasets`` (half a second), which
        # only the preference and JSONL tasks need
        from tether.tasks.preferences import MultistepPrefsTask

        return MultistepPrefsTask(max_digits)
    if name == "addition-chat":
        return WordProblemTask(max_digits, operations=("+",), instruction="", kinds=("question",))
    if name == "word-problems-prefs":
        from tether.tasks.preferences import WordProblemPrefsTask

        return WordProblemPrefsTask(max_digits)
    raise ValueError(f"task.name: unknown task {name!r} (known: {', '.join(TASK_NAMES)})")


@dataclass
class FixedPool(Task):
    """The small-data setting: ``size`` training problems drawn once (seeded) from ``task``;
    pre-training samples come from that pool, RL and evaluation problems stay fresh."""

    task: Task
    problems: list[Any]

    @classmethod
    def draw(cls, task: Task, size: int, seed: int) -> FixedPool:
        rng = random.Random(f"tether-pool/{seed}")
        return cls(task, [task.pretrain_problem(rng) for _ in range(size)])

    def pretrain_problem(self, rng: random.Random) -> Any:
        return self.problems[rng.randrange(len(self.problems))]

    def rl_problem(self, rng: random.Random) -> Any:
        return self.task.rl_problem(rng)

    def is_correct(self, problem: Any, completion: str) -> bool:
        return self.task.is_correct(problem, completion)

    def score(self, problem: Any, completion: str) -> float:
        return self.task.score(problem, completion)

    def max_new_tokens(self) -> int:
        return self.task.max_new_tokens()

    def __post_init__(self) -> None:
        self.report = self.task.report  # a file's rows kept and skipped, as the task read them
        self.alphabet = self.task.alphabet


def task_from_config(cfg: Any, seed: int = 0) -> Task:
    """The task a recipe's ``task`` section describes (a :class:`tether.config.TaskConfig`).
    Raises :class:`tether.tasks.jsonl.DatasetError` for an unusable JSONL file."""
    task: Task
    # the file tasks are imported here, not at the top: they import ``datasets`` (half a second)
    if cfg.name == "jsonl":
        from tether.tasks.jsonl import JsonlTask

        task = JsonlTask.from_file(
            cfg.path,
            prompt_field=cfg.prompt_field,
            completion_field=cfg.completion_field,
            max_chars=cfg.max_chars,
            strict=cfg.strict,
        )
    elif cfg.name == "prefs-jsonl":
        from tether.tasks.preferences import PreferenceTask

        task = PreferenceTask.from_file(
            cfg.path,
            prompt_field=cfg.prompt_field,
            chosen_field=cfg.chosen_field,
            rejected_field=cfg.rejected_field,
            max_chars=cfg.max_chars,
            strict=cfg.strict,
        )
    else:
        task = get_task(
            cfg.name, cfg.max_digits, cfg.long_fraction, cfg.demonstrations, cfg.expert_share
        )
    if cfg.train_size is not None:
        task = FixedPool.draw(task, cfg.train_size, seed)
    task.prompt_format = PromptFormat.of(cfg)
    return task
