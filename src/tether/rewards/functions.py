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
  ``"path/to/file.py:name"``, called as ``name(prompt: str, completion: str) -> float``;
- ``kind: model``: a Bradley–Terry reward model trained with ``train.stage: reward-model``
  (``reward.model``: its checkpoint or run directory).

``reward.calibrate: true`` wraps any of them in :class:`CalibratedReward`, InfAlign's CTRL
(docs/methods.md §8): K reference samples per prompt are drawn once and their rewards cached; a
completion's reward becomes its mid-rank among them, then the chosen transform (identity,
log, e^{t·C}, −e^{−t·C}) is applied.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable, Sequence
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
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some built-ins have none: checked when called
        return fn  # type: ignore[no-any-return]
    try:
        signature.bind("prompt", "completion")
    except TypeError:
        raise RewardError(
            f"reward.function {spec!r}: must take two arguments (prompt, completion), "
            f"but its signature is {name}{signature}"
        ) from None
    return fn  # type: ignore[no-any-return]


class PythonReward:
    """A user's rule-based reward, ``fn(prompt, completion) -> float`` per completion. A value
    that is not a finite number is an error naming the function and the completion."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = load_function(spec)

    def __call__(self, problems: Sequence[Any], completions: Sequence[str]) -> Tensor:
        values = []
        for p, c in zip(problems, completions, strict=True):
            try:
                value = self.fn(p.prompt, c)
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
    if cfg.kind == "checker":
        return CheckerReward(task, recipe.rl.reward_correct, recipe.rl.reward_wrong)
    if cfg.kind == "graded":
        return GradedReward(task)
    if cfg.kind == "python":
        return PythonReward(cfg.function)
    if cfg.kind == "model":
        return ModelReward(cfg.model, device=device)
    raise RewardError(f"reward.kind: unknown kind {cfg.kind!r}")
