"""Rewards for sampled completions: rule-based, graded, user-written, learned, and calibrated.

Every reward here is a callable ``reward(problems, completions) -> Tensor [B]`` (float32, on the
CPU, no gradient): ``problems`` are the task's problem objects (each has ``.prompt``) and
``completions`` the decoded texts. The RL stage, the online preference stages and
``tether winrate`` all take one, built from the recipe's ``reward`` section by
:func:`build_reward`:

- ``kind: checker``: the task's checker, ``rl.reward_correct`` / ``rl.reward_wrong``;
- ``kind: graded``: the task's graded score in [0, 1] (the share of right answer digits for
  ``addition``, of valid steps for ``multistep``);
- ``kind: python``: a function of your own, ``reward.function: "package.module:name"`` or
  ``"path/to/file.py:name"``, called as ``name(prompt: str, completion: str) -> float``; its
  further parameters receive the row's columns of the same name
  (``def reward(prompt, completion, answer)`` reads the row's ``answer``; ``**fields`` takes
  every column), so a prompt-only JSONL file can carry what judging needs (:class:`PythonReward`);
- ``kind: model``: a Bradley–Terry reward model trained with ``train.stage: reward-model``
  (``reward.model``: its checkpoint or run directory).

``reward.calibrate: true`` wraps any of them in :class:`CalibratedReward`, InfAlign's CTRL
(docs/methods.md §8): K reference samples per prompt are drawn once and their rewards cached; a
completion's reward becomes its mid-rank among them, then the chosen transform (identity,
log, e^{t·C}, −e^{−t·C}) is applied.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tether.distributions.infalign import DecodeMode, calibrate, default_t, optimise_t, transform
from tether.rewards.reward_model import load_reward_model


class RewardError(ValueError):
    """A reward that cannot be built or returned a bad value; the message names it."""


class RewardFunction(Protocol):
    def __call__(self, problems: Sequence[Any], completions: Sequence[str]) -> Tensor: ...


class CheckerReward:
    """The task's exact checker: ``correct`` if right, ``wrong`` otherwise."""

    def __init__(self, task: Any, correct: float = 1.0, wrong: float = -1.0):
        self.task, self.correct, self.wrong = task, float(correct), float(wrong)

    def __call__(self, problems: Sequence[Any], completions: Sequence[str]) -> Tensor:
        ok = [self.task.is_correct(p, c) for p, c in zip(problems, completions, strict=True)]
        return torch.tensor([self.correct if k else self.wrong for k in ok], dtype=torch.float32)


class GradedReward:
    """The task's graded score in [0, 1] (``task.score``)."""

    def __init__(self, task: Any):
        self.task = task

    def __call__(self, problems: Sequence[Any], completions: Sequence[str]) -> Tensor:
        scores = [self.task.score(p, c) for p, c in zip(problems, completions, strict=True)]
        return torch.tensor(scores, dtype=torch.float32)


def load_function(spec: str) -> Callable[..., Any]:
    """``"package.module:name"`` or ``"path/to/file.py:name"`` → the function. Raises
    :class:`RewardError` naming what is missing."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise RewardError(
            f"reward.function {spec!r}: expected 'package.module:name' or 'file.py:name'"
        )
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise RewardError(f"reward.function {spec!r}: no such file {where!r}")
        module_spec = importlib.util.spec_from_file_location(f"tether_reward_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            raise RewardError(f"reward.function {spec!r}: cannot load {where!r}")
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            raise RewardError(f"reward.function {spec!r}: {where} failed to import: {err}") from err
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise RewardError(f"reward.function {spec!r}: cannot import {where!r}: {err}") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"reward.function {spec!r}: {where} has no function {name!r}")
    return fn  # type: ignore[no-any-return]


def row_fields(problem: Any) -> dict[str, Any]:
    """The columns a problem's row offers a Python reward: a JSONL row's ``fields`` (every
    column of the row, by the file's names), else a dataclass problem's fields (``a`` and
    ``b`` of an addition problem, ``operands`` and ``target`` of a multistep one)."""
    fields = getattr(problem, "fields", None)
    if isinstance(fields, dict):
        return fields
    if dataclasses.is_dataclass(problem) and not isinstance(problem, type):
        return {f.name: getattr(problem, f.name) for f in dataclasses.fields(problem)}
    return {}


@dataclass(frozen=True)
class RewardSignature:
    """What a Python reward's parameters ask for: the first two, positional, are the prompt and
    the completion; ``columns`` are the further parameters, each the row's column of that name
    (``required`` those without a default); ``every_column`` a ``**fields`` parameter, which
    takes every column not bound otherwise."""

    columns: tuple[str, ...]
    required: tuple[str, ...]
    every_column: bool
    positional: tuple[str, ...]  # the names of the prompt and completion parameters

    @classmethod
    def of(cls, fn: Callable[..., Any], spec: str) -> RewardSignature:
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # some built-ins have none: called with two arguments
            return cls((), (), False, ())
        params = list(signature.parameters.values())
        positional_kinds = (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )
        head = [p for p in params[:2] if p.kind in positional_kinds]
        var_positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
        named = [
            p
            for p in params[len(head) :]
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ]
        required = [p.name for p in named if p.default is inspect.Parameter.empty]
        bad_only = [
            p.name
            for p in params[len(head) :]
            if p.kind is inspect.Parameter.POSITIONAL_ONLY and p.default is inspect.Parameter.empty
        ]
        if (len(head) < 2 and not var_positional) or bad_only:
            raise RewardError(
                f"reward.function {spec!r}: must take two arguments (prompt, completion), "
                f"then any of the row's columns by name, but its signature is "
                f"{spec.rpartition(':')[2]}{signature}"
            )
        every = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        return cls(
            tuple(p.name for p in named), tuple(required), every, tuple(p.name for p in head)
        )

    def keywords(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments for a row with columns ``fields`` (a missing optional column
        is left to its default; a missing required one is the caller's to report)."""
        if self.every_column:
            return {k: v for k, v in fields.items() if k not in self.positional}
        return {k: fields[k] for k in self.columns if k in fields}


class PythonReward:
    """A user's rule-based reward, ``fn(prompt, completion, [columns...]) -> float`` per
    completion: the prompt (the task's prompt, before formatting), the sampled completion, and
    for each further parameter the row's column of that name (:class:`RewardSignature`,
    :func:`row_fields`). Given the ``task``, a required parameter no row column answers is
    refused when the reward is built, in one line naming the column and the file; a row that
    lacks one when called is refused the same way. A value that is not a finite number is an
    error naming the function and the completion."""

    def __init__(self, spec: str, task: Any = None):
        self.spec = spec
        self.fn = load_function(spec)
        self.signature = RewardSignature.of(self.fn, spec)
        self.source, self.task_known = _task_source(task), task is not None
        if task is not None:
            self._check_columns(task)

    def _check_columns(self, task: Any) -> None:
        """Every required parameter is a column of every row of ``task`` (a JSONL file: all of
        its rows; another task: one of its problems)."""
        for name in self.signature.required:
            if hasattr(task, "rows_without"):
                lines = task.rows_without(name)
                if not lines:
                    continue
                if len(lines) == len(task):
                    columns = ", ".join(task.column_names())
                    raise RewardError(
                        f"reward.function {self.spec!r}: parameter {name!r} has no column in "
                        f"{self.source} (its columns: {columns})"
                    )
                raise RewardError(
                    f"reward.function {self.spec!r}: parameter {name!r}: column {name!r} is "
                    f"missing from {len(lines)} rows of {self.source} (first: line {lines[0]})"
                )
            fields = row_fields(task.rl_problem(random.Random(0)))
            if name not in fields:
                columns = ", ".join(fields) or "none"
                raise RewardError(
                    f"reward.function {self.spec!r}: parameter {name!r} has no column in "
                    f"{self.source} (its problems' fields: {columns})"
                )

    def _call(self, problem: Any, completion: str) -> Any:
        if not self.signature.columns and not self.signature.every_column:
            return self.fn(problem.prompt, completion)
        fields = row_fields(problem)
        for name in self.signature.required:
            if name not in fields:
                line = getattr(problem, "line", None)
                where = self.source if self.task_known else "its row"
                if line:
                    where = f"line {line} of {self.source}" if self.task_known else f"line {line}"
                raise RewardError(
                    f"reward.function {self.spec!r}: parameter {name!r} has no column in {where}"
                )
        return self.fn(problem.prompt, completion, **self.signature.keywords(fields))

    def __call__(self, problems: Sequence[Any], completions: Sequence[str]) -> Tensor:
        values = []
        for p, c in zip(problems, completions, strict=True):
            try:
                value = self._call(p, c)
            except RewardError:
                raise
            except Exception as err:  # the user's code: name it, the error and the input
                raise RewardError(
                    f"reward.function {self.spec!r} raised {err!r} on completion {c[:60]!r}"
                ) from err
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise RewardError(
                    f"reward.function {self.spec!r} returned {value!r} for completion {c[:60]!r}: "
                    "it must return a finite number"
                )
            values.append(number)
        return torch.tensor(values, dtype=torch.float32)


def _task_source(task: Any) -> str:
    """How messages name where a task's rows come from: its file, else its kind."""
    if task is None:
        return "the task"
    source = getattr(task, "source", None)
    return str(source) if source else f"task {type(task).__name__}"


class ModelReward:
    """A learned Bradley–Terry reward model (``train.stage: reward-model``), scoring prompt +
    completion as it was trained, in chunks of ``batch_size``."""

    def __init__(self, path: str, device: str | torch.device = "cpu", batch_size: int = 64):
        self.model = load_reward_model(path, device=device)
        self.batch_size = batch_size

    def __call__(self, problems: Sequence[Any], completions: Sequence[str]) -> Tensor:
        prompts = [p.prompt for p in problems]
        out = []
        for i in range(0, len(prompts), self.batch_size):
            j = i + self.batch_size
            out.append(self.model.score(prompts[i:j], list(completions[i:j])).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


class CalibratedReward:
    """CTRL's reward (docs/methods.md §8): Φ(C(x, y)) with C the mid-rank of r(x, y) among the
    rewards of K reference samples for the same prompt.

    ``reference_sampler(prompts, k)`` returns k completions per prompt (prompt-major: the k
    samples of prompt 0, then of prompt 1, ...) drawn from π_ref; their base rewards are cached
    by prompt text, so each prompt costs K reference samples once. Call :meth:`details` for the
    raw and calibrated rewards too; :meth:`__call__` returns Φ only.

    The best-of-N transform is used as e^{t·(C−1)} = e^{−t}·e^{t·C}, in (0, 1] like C itself:
    the KL-RL optimum at coefficient β is that of e^{t·C} at β·e^{t}, and one range of
    ``rl.kl_coef`` serves the raw, calibrated and transformed rewards alike (−e^{−t·C}, for
    worst-of-N, already lies in [−1, 0)).
    """

    def __init__(
        self,
        base: RewardFunction,
        reference_sampler: Callable[[list[str], int], list[str]],
        k: int,
        kind: str = "identity",
        t: float | str | None = None,
        n: int = 4,
    ):
        if k < 1:
            raise RewardError(f"reward.reference_samples must be >= 1, got {k}")
        self.base = base
        self.sampler = reference_sampler
        self.k = k
        self.kind = kind
        mode_of: DecodeMode = "best" if kind == "exp" else "worst"
        if kind in ("exp", "neg_exp") and t is None:
            t = default_t(n, mode_of)
        elif kind in ("exp", "neg_exp") and t == "optimise":
            t = optimise_t(n, mode_of)  # near π_ref: ≈ 2N, about a second
        self.t = None if t is None else float(t)
        self.cache: dict[str, Tensor] = {}

    def reference_rewards(self, problems: Sequence[Any]) -> Tensor:
        """[B, K] cached reference rewards, sampling K completions for unseen prompts."""
        missing: dict[str, Any] = {}
        for p in problems:
            if p.prompt not in self.cache:
                missing.setdefault(p.prompt, p)
        if missing:
            prompts = list(missing)
            texts = self.sampler(prompts, self.k)
            repeated = [missing[q] for q in prompts for _ in range(self.k)]
            rewards = self.base(repeated, texts).reshape(len(prompts), self.k)
            for q, row in zip(prompts, rewards, strict=True):
                self.cache[q] = row
        return torch.stack([self.cache[p.prompt] for p in problems])

    def warm(self, problems: Sequence[Any], chunk: int = 32, progress: bool = False) -> None:
        """Fill the cache for ``problems`` up front, ``chunk`` prompts at a time (a progress
        bar with ``progress``)."""
        todo = list({p.prompt: p for p in problems if p.prompt not in self.cache}.values())
        bar = tqdm(
            total=len(todo),
            desc=f"reference rewards (K={self.k})",
            unit="prompt",
            disable=True if not progress or not todo else None,  # None: off unless a terminal
        )
        for i in range(0, len(todo), chunk):
            self.reference_rewards(todo[i : i + chunk])
            bar.update(len(todo[i : i + chunk]))
        bar.close()

    def details(self, problems: Sequence[Any], completions: Sequence[str]) -> dict[str, Tensor]:
        raw = self.base(problems, completions)
        c = calibrate(raw, self.reference_rewards(problems))
        # the log floor: half a rank below the lowest reference (C = 0 would give −∞)
        phi = transform(c, self.kind, self.t, log_floor=1.0 / (2 * self.k))  # type: ignore[arg-type]
        if self.kind == "exp":  # e^{t·(C−1)} ∈ (0, 1]: the same optimum at β·e^{−t}
            phi = phi * math.exp(-float(self.t))  # type: ignore[arg-type]
        return {"raw": raw, "calibrated": c, "reward": phi.float()}

    def __call__(self, problems: Sequence[Any], completions: Sequence[str]) -> Tensor:
        return self.details(problems, completions)["reward"]

    def state_dict(self) -> dict[str, Any]:
        return {"cache": dict(self.cache)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cache = dict(state["cache"])


def build_reward(recipe: Any, task: Any, device: str | torch.device = "cpu") -> RewardFunction:
    """The base reward a recipe's ``reward`` section names (before any calibration)."""
    cfg = recipe.reward
    if cfg.kind in ("checker", "graded", None) and not task.has_references:
        raise RewardError(
            f"reward.kind {cfg.kind or 'checker'}: task.completion_field is null, so the rows hold no "
            "reference to judge by: use reward.kind python (reward.function, which may read "
            "the row's columns) or model"
        )
    if cfg.kind in ("checker", None):  # None: a stage's default, the checker outside one
        return CheckerReward(task, recipe.rl.reward_correct, recipe.rl.reward_wrong)
    if cfg.kind == "graded":
        return GradedReward(task)
    if cfg.kind == "python":
        return PythonReward(cfg.function, task)
    if cfg.kind == "model":
        return ModelReward(cfg.model, device=device)
    raise RewardError(f"reward.kind: unknown kind {cfg.kind!r}")
