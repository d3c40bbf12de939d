"""Preference pairs as a task: a prompt, a chosen response and a rejected one.

Two sources, one protocol (:class:`tether.tasks.Task`), for ``train.stage: dpo`` and
``train.stage: reward-model`` (:mod:`tether.stages.preference`):

- **``task.name: prefs-jsonl``** (:class:`PreferenceTask`): a user's JSON Lines file, one object
  per line, e.g. ``{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}`` (field names
  configurable; other fields ignored). It is read by the same line-by-line reader as
  :mod:`tether.tasks.jsonl`, so it fails and skips the same way: a one-line
  :class:`~tether.tasks.jsonl.DatasetError` for a file that cannot be used as a whole, and a
  counted skip (:class:`~tether.tasks.jsonl.SkipReport`) for each bad row, with the same
  reasons (``not_json``, ``missing_field``, ``empty_completion`` for an empty chosen *or*
  rejected response, ``too_long`` when prompt + the longer response exceed ``max_chars``...)
  plus ``same_response``: the chosen and rejected strings are identical, a pair that carries
  no preference. The kept rows live in a ``datasets.Dataset`` (columns ``prompt``,
  ``chosen``, ``rejected``, ``line``).
- **``task.name: multistep-prefs``** (:class:`MultistepPrefsTask`): pairs generated on the fly
  from the multistep-sums task, no file needed. Chosen is an expert solution (a uniformly
  random order, every step right); rejected is *the same chain with one arithmetic slip*:
  one step's result is off by 1..9, and the later steps add correctly onto the wrong value,
  so the final answer is wrong too. The two responses share everything before the slip,
  so the preference is about one local error, the kind DPO should learn to avoid.

- **``task.name: word-problems-prefs``** (:class:`WordProblemPrefsTask`): pairs on the
  word-problems task (:mod:`tether.tasks.word_problems`), for real chat models. Chosen is the
  right answer as the instruction asks for it, the bare number (``8``); rejected is a
  plausible wrong number (:func:`~tether.tasks.word_problems.wrong_answer`: the other
  operation's result, the answer off by one, or an operand). The problems are the plain
  task's, drawn from the same generator stream, so a run's held-out problems are the ones a
  ``word-problems`` run with the same seed and ``eval.n`` evaluates.

A problem is a :class:`PreferencePair`; its ``target`` is the chosen response, so the same
task also serves MLE on the chosen responses (``train.stage: mle``: SFT before DPO) and RL.

**Evaluation** (what ``evaluate_during_training`` logs as ``eval/acc_rl`` and ``eval/score``
for a completion generated from the prompt): for a file, ``is_correct`` is an exact match
with the chosen response after stripping surrounding whitespace, and ``score`` is 1 when the
completion is closer to the chosen response than to the rejected one by sentence BLEU (1 for
an exact match of the chosen response, 0.5 for a tie, 0 when closer to the rejected one),
so its mean is a win rate against the preference data. For ``multistep-prefs`` they are the
multistep checker and its graded step score (:func:`tether.tasks.multistep.score`); for
``word-problems-prefs`` the word-problem verifier and its place score
(:func:`tether.tasks.word_problems.place_score`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from sacrebleu.metrics import BLEU

import tether.tasks.multistep as multistep
import tether.tasks.word_problems as word_problems
from tether.tasks.addition import random_operand
from tether.tasks.base import Task
from tether.tasks.jsonl import (
    GENERATION_MARGIN,
    DatasetRows,
    RowSkip,
    SkipReport,
    check_string_fields,
    read_jsonl_rows,
)

PREFERENCE_FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "line": datasets.Value("int64"),
    }
)


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a chosen (preferred) and a rejected response; ``line`` is its 1-based
    line in the file (0 for generated pairs)."""

    prompt: str
    chosen: str
    rejected: str
    line: int = 0

    @property
    def target(self) -> str:
        """The reference completion (the name every task's problems share): the chosen one."""
        return self.chosen


@dataclass(frozen=True)
class SumPreferencePair(PreferencePair):
    """A generated multistep pair; ``operands`` let the multistep checker judge completions."""

    operands: tuple[int, ...] = ()

    @property
    def problem(self) -> multistep.Problem:
        return multistep.Problem(self.operands, self.chosen)


@dataclass(frozen=True)
class WordPreferencePair(PreferencePair):
    """A generated word-problem pair; ``problem`` lets the verifier judge completions."""

    problem: word_problems.Problem | None = None

    @property
    def word_problem(self) -> word_problems.Problem:
        assert self.problem is not None, "a WordPreferencePair is built with its problem"
        return self.problem


# ----------------------------------------------------------------------------- files


def _check_preference_row(
    obj: Any, fields: tuple[str, str, str], max_chars: int | None
) -> list[str] | RowSkip:
    values = check_string_fields(obj, fields)
    if isinstance(values, RowSkip):
        return values
    prompt, chosen, rejected = values
    for name, text in zip(fields[1:], (chosen, rejected), strict=True):
        if not text.strip():
            return RowSkip("empty_completion", f"field {name!r} is empty")
    if chosen == rejected:
        return RowSkip(
            "same_response", f"fields {fields[1]!r} and {fields[2]!r} are the same string"
        )
    longest = len(prompt) + max(len(chosen), len(rejected))
    if max_chars is not None and longest > max_chars:
        return RowSkip(
            "too_long",
            f"prompt + longer response is {longest} characters, over max_chars={max_chars}",
        )
    return values


def load_preference_dataset(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    max_chars: int | None = None,
    strict: bool = False,
) -> tuple[datasets.Dataset, SkipReport]:
    """The usable pairs as a ``datasets.Dataset`` (string columns ``prompt``, ``chosen``,
    ``rejected``, whatever the file calls them, and int ``line``) plus the skip report.

    Raises :class:`~tether.tasks.jsonl.DatasetError` for an unusable file, or any bad row
    when ``strict``, and ``ValueError`` for bad arguments (module docstring).
    """
    fields = (prompt_field, chosen_field, rejected_field)
    if not all(fields) or len(set(fields)) != 3:
        raise ValueError(
            f"prompt_field, chosen_field and rejected_field must be three different non-empty "
            f"names, got {fields}"
        )
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 or None, got {max_chars}")
    columns, report = read_jsonl_rows(
        path,
        ("prompt", "chosen", "rejected"),
        lambda obj: _check_preference_row(obj, fields, max_chars),
        strict,
    )
    return datasets.Dataset.from_dict(columns, features=PREFERENCE_FEATURES), report


class PreferenceTask(DatasetRows):
    """Preference pairs from a user's file behind the Task protocol (module docstring).

    Pre-training and RL problems are rows drawn uniformly with the caller's ``rng``.
    ``bleu_tokenize`` is sacrebleu's tokenizer for the score (``13a`` for word-level text,
    ``char`` for text without spaces). The generation budget is the longest response in UTF-8
    bytes plus a margin, as in :class:`~tether.tasks.jsonl.JsonlTask`.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        report: SkipReport | None = None,
        *,
        bleu_tokenize: str = "13a",
        max_new_tokens: int | None = None,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("PreferenceTask needs at least one pair")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 or None, got {max_new_tokens}")
        self.dataset = dataset
        self.report = report
        self._bleu = BLEU(effective_order=True, tokenize=bleu_tokenize)
        if max_new_tokens is None:
            responses = [*dataset["chosen"], *dataset["rejected"]]
            longest = max(len(text.encode("utf-8")) for text in responses)
            max_new_tokens = longest + GENERATION_MARGIN
        self._max_new_tokens = max_new_tokens

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        prompt_field: str = "prompt",
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        max_chars: int | None = None,
        strict: bool = False,
        bleu_tokenize: str = "13a",
        max_new_tokens: int | None = None,
    ) -> PreferenceTask:
        """Load ``path`` with :func:`load_preference_dataset` (same errors) and wrap it; the
        skip report is kept as ``.report`` (the training loop prints its summary)."""
        ds, report = load_preference_dataset(
            path,
            prompt_field=prompt_field,
            chosen_field=chosen_field,
            rejected_field=rejected_field,
            max_chars=max_chars,
            strict=strict,
        )
        return cls(ds, report, bleu_tokenize=bleu_tokenize, max_new_tokens=max_new_tokens)

    def pair(self, index: int) -> PreferencePair:
        row = self.dataset[index]
        return PreferencePair(row["prompt"], row["chosen"], row["rejected"], int(row["line"]))

    def is_correct(self, problem: PreferencePair, completion: str) -> bool:
        """Exact match with the chosen response after stripping whitespace; never raises."""
        return isinstance(completion, str) and completion.strip() == problem.chosen.strip()

    def _bleu_to(self, completion: str, reference: str) -> float:
        try:
            return float(self._bleu.sentence_score(completion, [reference]).score)
        except Exception:  # a metric must not stop training on odd output
            return 0.0

    def score(self, problem: PreferencePair, completion: str) -> float:
        """1 if the completion is closer (sentence BLEU) to the chosen response than to the
        rejected one, 0.5 on a tie, 0 otherwise; an exact chosen match is 1. Never raises."""
        if self.is_correct(problem, completion):
            return 1.0
        if not isinstance(completion, str):
            return 0.0
        to_chosen = self._bleu_to(completion, problem.chosen)
        to_rejected = self._bleu_to(completion, problem.rejected)
        if to_chosen == to_rejected:
            return 0.5
        return 1.0 if to_chosen > to_rejected else 0.0

    def max_new_tokens(self) -> int:
        return self._max_new_tokens


# ----------------------------------------------------------------------------- generated

MAX_SLIP = 9  # a slipped step's result is off by 1..MAX_SLIP


def slipped_solution(ordered: tuple[int, ...] | list[int], step: int, delta: int) -> str:
    """The solution adding ``ordered`` left to right with an arithmetic slip: step ``step``
    (0-based) writes its result ``delta`` off, and later steps add correctly onto the wrong
    value. ``(12, 30, 5)``, step 0, delta 1 gives ``12+30=43,43+5=48;48``."""
    xs = [int(x) for x in ordered]
    if not 0 <= step < len(xs) - 1:
        raise ValueError(f"step must be in 0..{len(xs) - 2}, got {step}")
    if delta == 0:
        raise ValueError("delta must not be 0 (that is no slip)")
    steps = []
    running = xs[0]
    for k, x in enumerate(xs[1:]):
        result = running + x + (delta if k == step else 0)
        steps.append(f"{running}+{x}={result}")
        running = result
    return multistep.STEP_SEP.join(steps) + multistep.ANSWER_SEP + str(running)


@dataclass
class MultistepPrefsTask(Task):
    """Generated preference pairs on multistep sums (module docstring): chosen = an expert
    solution, rejected = the same order with one slipped step. Pre-training and RL draw from
    the same distribution; judged by the multistep checker and step score."""

    max_digits: int = multistep.DEFAULT_MAX_DIGITS
    min_operands: int = multistep.MIN_OPERANDS
    max_operands: int = multistep.MAX_OPERANDS

    def pretrain_problem(self, rng: random.Random) -> SumPreferencePair:
        n = rng.randint(self.min_operands, self.max_operands)
        operands = tuple(random_operand(rng, rng.randint(1, self.max_digits)) for _ in range(n))
        order = list(operands)
        rng.shuffle(order)
        step = rng.randrange(n - 1)
        # a slip downwards only where the result stays non-negative
        running = sum(order[: step + 2])
        delta = rng.randint(1, MAX_SLIP)
        if running - delta >= 0 and rng.random() < 0.5:
            delta = -delta
        prompt = multistep.make_prompt(operands)
        chosen = multistep.solution_for_order(order)
        return SumPreferencePair(
            prompt, chosen, slipped_solution(order, step, delta), operands=operands
        )

    def rl_problem(self, rng: random.Random) -> SumPreferencePair:
        return self.pretrain_problem(rng)

    def is_correct(self, problem: SumPreferencePair, completion: str) -> bool:
        return multistep.is_correct(problem.problem, completion)

    def score(self, problem: SumPreferencePair, completion: str) -> float:
        return multistep.score(problem.problem, completion)

    def max_new_tokens(self) -> int:
        # a slip adds at most one digit to the numbers after it
        return multistep.max_completion_tokens(self.max_digits, self.max_operands) + 2 * (
            self.max_operands - 1
        )


def word_problem_pair(problem: word_problems.Problem) -> WordPreferencePair:
    """The pair of ``problem``: its answer over :func:`~tether.tasks.word_problems.wrong_answer`,
    both as bare numbers."""
    return WordPreferencePair(
        problem.prompt,
        str(problem.answer),
        str(word_problems.wrong_answer(problem)),
        problem=problem,
    )


@dataclass
class WordProblemPrefsTask(Task):
    """Generated preference pairs on word problems (module docstring): the right answer over
    a plausible wrong one. Pre-training and RL draw the word-problems task's problems from the
    same stream; judged by its verifier and place score."""

    max_digits: int = word_problems.DEFAULT_MAX_DIGITS

    def pretrain_problem(self, rng: random.Random) -> WordPreferencePair:
        return word_problem_pair(word_problems.make_problem(rng, self.max_digits))

    def rl_problem(self, rng: random.Random) -> WordPreferencePair:
        return self.pretrain_problem(rng)

    def is_correct(self, problem: WordPreferencePair, completion: str) -> bool:
        return word_problems.is_correct(problem.word_problem, completion)

    def score(self, problem: WordPreferencePair, completion: str) -> float:
        return word_problems.place_score(problem.word_problem, completion)

    def max_new_tokens(self) -> int:
        return word_problems.MAX_NEW_TOKENS
