"""Evaluate a saved model by name: what ``tether eval`` and ``tether winrate`` run, and the
public ``tether.evaluate``.

A checkpoint's ``tether.json`` records how it was trained: the task, ``init`` (the model it
started from, its reference), the reward and the dpg target. Every setting the caller leaves
out is read from there, so ``evaluate_checkpoint("runs/x")`` evaluates a run on the task it
was trained on. A request that cannot run raises :class:`EvaluationError` with one line that
says what to pass; it names the command-line option, whose keyword argument here has the
same name (``--max-digits`` is ``max_digits=``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tether.config import Recipe, RewardConfig, TaskConfig, first_line
from tether.distributions.enumeration import NotEnumerableError
from tether.distributions.infalign import DecodeMode
from tether.eval import addition, imitation
from tether.eval.decisive import decisive_positions, summarise_decisive
from tether.eval.exact import exact_evaluation
from tether.eval.winrate import WinRateReport, evaluate_winrate, plot_winrate
from tether.models.loading import (
    ModelLoadError,
    checkpoint_meta,
    checkpoint_task,
    load_model_and_tokenizer,
    resolve_checkpoint,
)
from tether.rewards.functions import RewardError, build_reward
from tether.tasks import Task, task_from_config
from tether.tasks.prompts import PromptFormat

__all__ = ["EvaluationError", "RewardJudged", "checkpoint_winrate", "evaluate_checkpoint"]

REWARD_KINDS = ("checker", "graded", "python", "model")


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked; the one-line message says what to pass."""


def evaluate_checkpoint(
    model: str | Path,
    *,
    task: str | None = None,
    digits: Sequence[int] = (1, 2, 3, 4, 5),
    n: int = 1000,
    temperature: float = 0.0,
    certainty: bool = False,
    max_digits: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    temperatures: Sequence[float] | None = None,
    k: int = 4,
    rewards: bool = False,
    exact: bool = False,
    reference: str | Path | None = None,
    beta: float | None = None,
    progress: bool = False,
    prompt_format: PromptFormat | None = None,
    data: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a model on its task; the figures as a JSON-ready dict.

    ``model`` is a shipped or installed model name (``tether models``), a checkpoint, a run
    directory or any Hugging Face folder; ``task`` defaults to the task it was trained on
    (addition, with its defaults, for a model that records none), ``data`` to the file that
    task read (``task.path``: a jsonl or prefs-jsonl task needs one), ``prompt_format`` to
    the format it was trained with (:func:`tether.generation.texts.checkpoint_prompt_format`).
    What is measured follows the task:

    - **addition**: greedy (``temperature`` 0) or sampled Pass@1 accuracy on ``n`` problems
      per digit length in ``digits`` and kind, with 95% intervals
      (:func:`tether.eval.addition.addition_accuracy`), under ``"accuracy"``; with
      ``certainty`` also the critical-token certainty analysis (Table 1) under
      ``"certainty"``, for the model's N (``max_digits``, default: the checkpoint's).
    - **any other task** (or addition with ``temperatures`` or ``rewards``): ``n`` prompts,
      ``k`` samples each, accuracy, score and diversity at each of ``temperatures`` (default:
      ``[temperature]``) under ``"sweep"`` (:func:`tether.eval.imitation.diversity_sweep`);
      with ``rewards`` the Spearman correlation of the model's implicit (IQLearn) reward with
      the task score under ``"rewards"``, and three examples r̂ token by token under
      ``"reward_examples"``.
    - ``exact=True`` (the enumerable task only): every response enumerated, and the exact
      KLs, entropy and reward of the policy, the reference and the target p* ∝
      π_ref·exp(r/β) (:func:`tether.eval.exact.exact_evaluation`). ``reference`` defaults to
      the checkpoint's init and ``beta`` to the dpg stage's β (or its moment or constraint
      target).

    A task of prompt-only rows (``task.completion_field: null``) has no reference to check
    samples against: it is judged by the reward the checkpoint records (python or model), the
    sweep's ``score`` being the mean reward and its ``accuracy`` the share of samples with a
    positive reward (:class:`RewardJudged`), and ``"judged_by"`` names the reward.

    ``seed`` fixes the problems and the sampling. ``progress`` shows a bar (addition).
    """
    if max_digits is not None and not 1 <= max_digits <= 18:
        raise EvaluationError(f"--max-digits {max_digits}: must lie in 1..18 (N of the model)")
    path = resolve_checkpoint(str(model))
    trained_on = checkpoint_task(path)
    task_name = task or trained_on.get("name", "addition")
    settings = _Settings(prompt_format, None if data is None else str(data))
    if exact:
        return _exact(path, task_name, trained_on, reference, beta, settings)
    if reference is not None or beta is not None:
        raise EvaluationError("--reference and --beta go with --exact")
    if task_name != "addition" or temperatures or rewards:
        sweep = list(temperatures) if temperatures else [temperature]
        return _sampled(
            path,
            task_name,
            trained_on,
            n,
            sweep,
            temperature,
            k,
            rewards,
            seed,
            settings,
            certainty,
            max_digits,
        )
    return _addition(
        path, trained_on, digits, n, temperature, certainty, max_digits, seed, batch_size, progress
    )


def _addition(
    path: Path,
    trained_on: dict[str, Any],
    digits: Sequence[int],
    n: int,
    temperature: float,
    certainty: bool,
    max_digits: int | None,
    seed: int,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    """Addition: accuracy per digit length and kind; the critical-token certainty."""
    certainty_n = _model_n(max_digits, trained_on) if certainty else None
    model, tokenizer = load_model_and_tokenizer(str(path))
    result: dict[str, Any] = {"checkpoint": str(path), "task": "addition"}
    result["accuracy"] = addition.addition_accuracy(
        model,
        tokenizer,
        list(digits),
        n,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    if certainty_n is not None:
        result["certainty"] = addition.critical_certainty(
            model,
            tokenizer,
            certainty_n,
            n,
            seed=seed,
            temperature=temperature,
            batch_size=batch_size,
        )
    return result


def _model_n(max_digits: int | None, trained_on: dict[str, Any]) -> int:
    """N of an addition model: ``max_digits``, else the one its checkpoint records."""
    if max_digits is not None:
        return max_digits
    if trained_on.get("max_digits") is None:
        raise EvaluationError(
            "--certainty needs --max-digits N (the checkpoint does not record it)"
        )
    return int(trained_on["max_digits"])


@dataclass(frozen=True)
class _Settings:
    """What the caller sets over the checkpoint's recorded task: the prompt format and the
    data file (None: the recorded ones)."""

    prompt_format: PromptFormat | None = None
    data: str | None = None


def _task_config(name: str, trained_on: dict[str, Any], **overrides: Any) -> TaskConfig:
    """The task ``name`` with the checkpoint's own settings when it was trained on it (its
    fixed training set aside), else the task's defaults; ``overrides`` on top."""
    fields = {**trained_on, "train_size": None} if trained_on.get("name") == name else {}
    return TaskConfig.model_validate({**fields, "name": name, **overrides})


def _build_task(
    name: str, trained_on: dict[str, Any], settings: _Settings, **overrides: Any
) -> tuple[TaskConfig, Task]:
    """The task config and the task ``name`` (:func:`_task_config`), with the settings' data
    file and prompt format; a one-line EvaluationError naming ``--task`` otherwise."""
    if settings.data is not None:
        overrides["path"] = settings.data
    if settings.prompt_format is not None:
        overrides["chat_template"] = settings.prompt_format.chat_template
        overrides["system_prompt"] = settings.prompt_format.system_prompt
    try:
        cfg = _task_config(name, trained_on, **overrides)
        return cfg, task_from_config(cfg)
    except ValueError as err:  # pydantic's ValidationError, a DatasetError
        hint = ""
        recorded = trained_on.get("path") if trained_on.get("name") == name else None
        if name in ("jsonl", "prefs-jsonl") and settings.data is None and not recorded:
            hint = " (give the data file: --data FILE)"
        raise EvaluationError(f"--task {name!r}: {_first_error(err)}{hint}") from None


class RewardJudged(Task):
    """A prompt-only task judged by a reward (what ``tether eval`` and ``tether winrate`` do
    without references): ``score`` is the reward and ``is_correct`` a positive reward; the
    rest is the task's own. Each completion's reward is computed once."""

    def __init__(self, task: Task, reward: Any) -> None:
        self.task, self.reward = task, reward
        self.report, self.prompt_format = task.report, task.prompt_format
        # by (problem, completion); the problem is kept so its id is not reused
        self._cache: dict[tuple[int, str], tuple[Any, float]] = {}

    def pretrain_problem(self, rng: random.Random) -> Any:
        return self.task.pretrain_problem(rng)

    def rl_problem(self, rng: random.Random) -> Any:
        return self.task.rl_problem(rng)

    def score(self, problem: Any, completion: str) -> float:
        key = (id(problem), completion)
        if key not in self._cache:
            self._cache[key] = (problem, float(self.reward([problem], [completion])[0]))
        return self._cache[key][1]

    def is_correct(self, problem: Any, completion: str) -> bool:
        return self.score(problem, completion) > 0

    def max_new_tokens(self) -> int:
        return self.task.max_new_tokens()


def _judged_by_reward(
    path: Path, task: Task, task_cfg: TaskConfig, kind: str, function: str | None, model: Any
) -> RewardJudged:
    """``task`` (prompt-only rows) judged by the reward ``kind`` (python or model)."""
    if kind not in ("python", "model"):
        raise EvaluationError(
            f"{path}: task {task_cfg.name} has prompt-only rows (task.completion_field null), "
            f"so there is no reference to check against, and the reward is {kind}: evaluate "
            "with a python or model reward (a checkpoint trained with one records it)"
        )
    reward_cfg = RewardConfig(kind=kind, function=function, model=model)  # type: ignore[arg-type]
    # a container for build_reward's two sections, not a training recipe: not validated as one
    holder = Recipe.model_construct(task=task_cfg, reward=reward_cfg)
    return RewardJudged(task, build_reward(holder, task))


def _first_error(err: Exception) -> str:
    """The first message of a pydantic ValidationError (else the first line), without the
    "Value error, " prefix."""
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        message = str(first.get("msg", "")).removeprefix("Value error, ")
        loc = ".".join(str(x) for x in first.get("loc", ()))
        return f"{loc}: {message}" if loc and not message.startswith(loc) else message
    return first_line(err)


def _sampled(
    path: Path,
    task_name: str,
    trained_on: dict[str, Any],
    n: int,
    temperatures: list[float],
    temperature: float,
    k: int,
    rewards: bool,
    seed: int,
    settings: _Settings,
    certainty: bool = False,
    max_digits: int | None = None,
) -> dict[str, Any]:
    """Any task: accuracy, score and diversity per temperature; the implicit reward; with
    ``certainty``, the decisive positions of the model's greedy answers and its certainty
    there (:mod:`tether.eval.decisive`). ``max_digits`` overrides the task's."""
    overrides = {} if max_digits is None else {"max_digits": max_digits}
    task_cfg, task = _build_task(task_name, trained_on, settings, **overrides)
    judged_by = None
    if not task.has_references:
        saved = dict(checkpoint_meta(path).get("reward") or {})
        kind = saved.get("kind", "checker")
        task = _judged_by_reward(
            path, task, task_cfg, kind, saved.get("function"), saved.get("model")
        )
        judged_by = {key: saved[key] for key in ("kind", "function", "model") if saved.get(key)}
    model, tokenizer = load_model_and_tokenizer(str(path))
    rng = random.Random(f"tether-eval/{seed}")
    problems = [task.rl_problem(rng) for _ in range(n)]
    result: dict[str, Any] = {"checkpoint": str(path), "task": task_name, "n": n, "k": k}
    if judged_by is not None:
        result["judged_by"] = judged_by
    result["sweep"] = imitation.diversity_sweep(
        model, tokenizer, task, problems, temperatures=temperatures, k=k, seed=seed
    )
    if rewards:
        result.update(_reward_figures(model, tokenizer, task, problems, k, temperature, seed))
    if certainty:
        if not task.has_references:
            raise EvaluationError(
                f"--certainty: task {task_name} has no references to tell a decisive token by"
            )
        correct, branches = decisive_positions(model, tokenizer, task, problems)
        result["decisive"] = summarise_decisive(correct, branches, seed=seed)
    return result


def _reward_figures(
    model: Any,
    tokenizer: Any,
    task: Task,
    problems: list[Any],
    k: int,
    temperature: float,
    seed: int,
) -> dict[str, Any]:
    """The implicit reward against the task score (at a temperature of at least 1, so the
    samples differ), and three samples' rewards token by token."""
    corr = imitation.reward_correlation(
        model, tokenizer, task, problems, k=k, temperature=max(temperature, 1.0), seed=seed
    )
    examples = []
    for i in range(min(3, len(corr["completions"]))):
        prompt = problems[corr["prompt_index"][i]].prompt
        pairs = imitation.per_token_rewards(
            model,
            tokenizer,
            prompt,
            corr["completions"][i],
            task.prompt_format,
            add_eos=corr["finished"][i],
        )
        examples.append({"prompt": prompt, "tokens": imitation.format_token_rewards(pairs)})
    keys = ("spearman_rho", "p_value", "spearman_rho_within", "n", "mean_return")
    return {"rewards": {key: corr[key] for key in keys}, "reward_examples": examples}


def _exact(
    path: Path,
    task_name: str,
    trained_on: dict[str, Any],
    reference: str | Path | None,
    beta: float | None,
    settings: _Settings,
) -> dict[str, Any]:
    """Exact figures of the policy, the reference and the target over the enumerated space;
    the reference and the target from the arguments, else from the checkpoint's tether.json."""
    if task_name != "enumerable":
        raise EvaluationError(
            f"--exact lists every response, which only the enumerable task allows; "
            f"{path} is evaluated on {task_name} (train on task.name enumerable, or pass "
            "--task enumerable)"
        )
    try:
        task_cfg = _task_config(task_name, trained_on)
        task = task_from_config(task_cfg)
    except ValidationError as err:
        message = err.errors()[0]["msg"].removeprefix("Value error, ")
        raise EvaluationError(f"--exact: {message}") from None
    if settings.prompt_format is not None:
        task.prompt_format = settings.prompt_format
    meta = checkpoint_meta(path)
    ref_name = str(reference) if reference else meta.get("init")
    if ref_name is None:
        raise EvaluationError(
            f"--exact: {path} records no reference (no init in its tether.json): "
            "give --reference REF"
        )
    recorded = dict(meta.get("dpg") or {})
    moments: dict[str, float] = {}
    if beta is None and recorded.get("target") == "moments":
        moments = dict(recorded["moments"])
    elif beta is not None:
        if not beta > 0:
            raise EvaluationError(f"--beta {beta}: must be > 0")
    elif recorded.get("target") != "constraint":
        beta = recorded.get("beta")
        if beta is None:
            raise EvaluationError(
                f"--exact: give --beta B, the target's temperature ({path} was not trained "
                "by the dpg stage, which records it)"
            )
    model, tokenizer = load_model_and_tokenizer(str(path))
    try:
        ref_model, _ = load_model_and_tokenizer(ref_name)
    except ModelLoadError as err:
        source = "--reference" if reference else "the checkpoint's init; give --reference"
        raise EvaluationError(f"reference ({source}): {err}") from None
    try:
        figures = exact_evaluation(model, ref_model, tokenizer, task, beta=beta, moments=moments)
    except NotEnumerableError as err:
        raise EvaluationError(f"--exact: {err}") from None
    return {
        "checkpoint": str(path),
        "reference": ref_name,
        "task": {"name": task_name, "max_digits": task_cfg.max_digits},
        **figures,
    }


# ----------------------------------------------------------------------------- win rate


def checkpoint_winrate(
    policy: str | Path,
    *,
    reference: str | Path | None = None,
    ns: Sequence[int] = (1, 2, 4, 8, 16),
    mode: DecodeMode = "best",
    prompts: int = 64,
    samples: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
    reward: str | None = None,
    reward_function: str | None = None,
    reward_model: str | None = None,
    task: str | None = None,
    max_digits: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
    plot: str | Path | None = None,
    prompt_format: PromptFormat | None = None,
    data: str | Path | None = None,
) -> WinRateReport:
    """InfAlign's inference-time win rate of a saved policy against its reference
    (:func:`tether.eval.winrate.evaluate_winrate`), with what it needs read from the policy's
    tether.json: ``reference`` defaults to its init, ``task`` to its task (``max_digits``
    overrides N), the reward to its reward section without calibration (``reward``: checker,
    graded, python with ``reward_function``, or model with ``reward_model``; calibration is a
    monotone map per prompt, which the win rate ignores). ``plot`` writes a PNG of win rate
    against N. ``prompt_format`` (default: the policy's recorded one) formats the prompts of
    both sides; ``data`` replaces the task's file (``task.path``). On prompt-only rows the
    accuracies are the shares of samples with a positive reward (:class:`RewardJudged`). The
    report's ``info`` records the policy, reference, task, reward (and plot)."""
    path = resolve_checkpoint(str(policy))
    meta = checkpoint_meta(path)
    reference_name = str(reference) if reference else meta.get("init")
    if not reference_name:
        raise EvaluationError(
            f"{policy}: no reference model recorded in its tether.json (no init): pass "
            "--reference REF (the model it was trained from)"
        )
    trained_on = dict(meta.get("task") or {})
    task_name = task or trained_on.get("name", "addition")
    overrides = {} if max_digits is None else {"max_digits": max_digits}
    settings = _Settings(prompt_format, None if data is None else str(data))
    task_cfg, task_obj = _build_task(task_name, trained_on, settings, **overrides)
    kind, function, model_path = _reward_choice(
        dict(meta.get("reward") or {}), reward, reward_function, reward_model
    )
    if not task_obj.has_references and kind in ("checker", "graded"):
        raise EvaluationError(
            f"--reward {kind}: task {task_name} has prompt-only rows (no reference to check "
            "against): pass --reward python --reward-function FILE.py:NAME, or --reward model"
        )
    try:
        reward_cfg = RewardConfig(kind=kind, function=function, model=model_path)  # type: ignore[arg-type]
        # a container for build_reward's two sections, not a training recipe
        reward_fn = build_reward(Recipe.model_construct(task=task_cfg, reward=reward_cfg), task_obj)
    except RewardError:
        raise
    except ValueError as err:
        raise EvaluationError(f"--reward {kind}: {_first_error(err)}") from None
    if not task_obj.has_references:
        task_obj = RewardJudged(task_obj, reward_fn)

    policy_model, tokenizer = load_model_and_tokenizer(str(path))
    try:
        reference_model, reference_tokenizer = load_model_and_tokenizer(reference_name)
    except ModelLoadError as err:
        if reference:
            raise
        raise EvaluationError(
            f"the reference recorded as the policy's init cannot be loaded ({err}): "
            "pass --reference REF"
        ) from None
    if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise EvaluationError(
            f"the reference {reference_name!r} has a different tokenizer from the policy: "
            "the KL and a fair comparison need the same one"
        )
    report = evaluate_winrate(
        policy_model,
        reference_model,
        tokenizer,
        task_obj,
        reward_fn,
        ns=ns,
        mode=mode,
        prompts=prompts,
        samples=samples,
        temperature=temperature,
        seed=seed,
        max_new_tokens=max_new_tokens,
        progress=progress,
        batch_size=batch_size,
        prompt_format=prompt_format,
    )
    report.label = str(policy)
    report.info = {
        "policy": str(path),
        "reference": str(reference_name),
        "task": task_cfg.model_dump(exclude_defaults=True) | {"name": task_cfg.name},
        "reward": {
            k: v for k, v in reward_cfg.model_dump().items() if k in ("kind", "function", "model")
        },
    }
    if plot is not None:
        report.info["plot"] = str(plot_winrate(report, plot))
    return report


def _reward_choice(
    saved: dict[str, Any], kind: str | None, function: str | None, model: str | None
) -> tuple[str, str | None, str | None]:
    """The raw reward to judge by, as (kind, function, model): the one asked for, else the
    policy's own (``saved``, its tether.json reward section), else the checker."""
    kind = kind or ("python" if function else "model" if model else saved.get("kind", "checker"))
    if kind not in REWARD_KINDS:
        raise EvaluationError(f"--reward {kind!r}: choose checker, graded, python or model")
    if function and kind != "python":
        raise EvaluationError(f"--reward-function is for --reward python (the reward is {kind})")
    if model and kind != "model":
        raise EvaluationError(f"--reward-model is for --reward model (the reward is {kind})")
    function = function or (saved.get("function") if kind == "python" else None)
    model = model or (saved.get("model") if kind == "model" else None)
    if kind == "python" and not function:
        raise EvaluationError(
            "--reward python needs --reward-function 'module:name' or 'file.py:name'"
        )
    if kind == "model" and not model:
        raise EvaluationError(
            "--reward model needs --reward-model PATH (a reward-model checkpoint)"
        )
    return kind, function, model
