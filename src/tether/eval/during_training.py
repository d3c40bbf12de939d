"""The figures logged at each evaluation of a run, and a task's accuracy on a set of problems.

An evaluation also keeps each held-out problem's outcome (:class:`Evaluation`), so a run can
report the gain between its first and last evaluation paired by problem: the same problems are
drawn at every evaluation of a run, so their difference is free of which problems were drawn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tether.config import Recipe
from tether.eval.stats import paired_difference_ci
from tether.generation.sampler import sample
from tether.rewards.functions import RewardFunction
from tether.stages.registry import STAGES
from tether.tasks import AdditionTask, Task, task_from_config


@dataclass
class Evaluation:
    """One evaluation: the ``figures`` it logs, and per figure that is a mean over held-out
    problems the problems' own values (``outcomes``: 1/0 for an accuracy), for paired gains."""

    figures: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, list[float]] = field(default_factory=dict)


def paired_gains(first: dict[str, list[float]], last: dict[str, list[float]]) -> dict[str, float]:
    """For each figure both evaluations kept per problem (their ``outcomes``): the gain
    ``last − first`` and its 95% interval paired by problem (``<figure>_gain``,
    ``_gain_ci_low``, ``_gain_ci_high``)."""
    gains: dict[str, float] = {}
    for key, after in last.items():
        before = first.get(key)
        if before is None or len(before) != len(after) or not after:
            continue
        mean, low, high = paired_difference_ci(before, after, bounds=None)
        gains |= {f"{key}_gain": mean, f"{key}_gain_ci_low": low, f"{key}_gain_ci_high": high}
    return gains


def evaluate_during_training(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    task: Task | None = None,
) -> dict[str, float]:
    """The figures of :func:`evaluate_run` (without a stage's reward)."""
    return evaluate_run(model, tokenizer, recipe, task).figures


def evaluate_run(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    task: Task | None = None,
    reward: RewardFunction | None = None,
) -> Evaluation:
    """Figures logged at each evaluation: for addition, greedy accuracy per length (the
    ``eval.digits`` table), for the stages whose registry row says so (RL, online DPO, XPO:
    ``evaluates_rl_distribution``) the accuracy on the RL and pre-training distributions, and
    the critical-token probe; for other tasks, accuracy on the RL distribution. With the stage's
    ``reward``, also its mean on the held-out completions (``eval/reward``): for prompt-only
    rows, which have no reference to check, the only figure."""
    from tether.eval.addition import addition_accuracy, critical_token_probabilities

    task = task or task_from_config(recipe.task, recipe.seed)
    evaluation = Evaluation()
    was_training = model.training
    model.eval()
    flat = evaluation.figures
    if recipe.task.name == "addition" and recipe.eval.digits:
        result = addition_accuracy(
            model,
            tokenizer,
            digits=recipe.eval.digits,
            n=recipe.eval.n,
            temperature=recipe.eval.temperature,
            seed=recipe.seed + 1,
            batch_size=recipe.eval.batch_size,
        )
        for kind in ("identical", "varying"):
            for d, cell in result[kind].items():
                flat[f"eval/acc_{kind}_{d}"] = cell["accuracy"]
    rl_distribution = STAGES[recipe.train.stage].evaluates_rl_distribution
    if rl_distribution or recipe.task.name != "addition":
        rng = random.Random(f"tether-eval/{recipe.seed}")
        problems = [task.rl_problem(rng) for _ in range(recipe.eval.n)]
        judged = judge(model, tokenizer, task, problems, recipe, reward)
        if task.has_references:
            evaluation.outcomes["eval/acc_rl"] = judged.correct
            flat["eval/acc_rl"] = _mean(judged.correct)
            if recipe.task.name != "addition":
                flat["eval/score"] = _mean(judged.scores)
        if judged.rewards is not None:
            evaluation.outcomes["eval/reward"] = judged.rewards
            flat["eval/reward"] = _mean(judged.rewards)
        if recipe.task.name == "addition":  # 1..N digits, without the long_fraction mix
            pretrain = AdditionTask(recipe.task.max_digits)
            problems = [pretrain.pretrain_problem(rng) for _ in range(recipe.eval.n)]
            flat["eval/acc_pretrain"] = task_accuracy(model, tokenizer, task, problems, recipe)[0]
    if recipe.task.name == "addition":  # the Fig. 4/7 probe on a fixed set of N+1-digit problems
        probe_rng = random.Random(f"tether-probe/{recipe.seed}")
        probe = [task.rl_problem(probe_rng) for _ in range(64)]
        for key, value in critical_token_probabilities(
            model, tokenizer, probe, recipe.task.max_digits
        ).items():
            flat[f"eval/{key}"] = value
    model.train(was_training)
    return evaluation


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@dataclass
class Judged:
    """Held-out completions judged: per problem, correct (1/0), the task's score, the reward."""

    correct: list[float]
    scores: list[float]
    rewards: list[float] | None


def task_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    problems: list[Any],
    recipe: Recipe,
) -> tuple[float, float]:
    """Accuracy and mean ``task.score`` on ``problems`` at ``eval.temperature`` (greedy by
    default), prompts formatted as the model expects (chat template where it has one)."""
    judged = judge(model, tokenizer, task, problems, recipe)
    return _mean(judged.correct), _mean(judged.scores)


@torch.no_grad()
def judge(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    problems: list[Any],
    recipe: Recipe,
    reward: RewardFunction | None = None,
) -> Judged:
    """Complete ``problems`` at ``eval.temperature`` (greedy by default) and judge each: the
    task's checker and score where the rows have a reference, and ``reward`` when given."""
    gen = torch.Generator(device=model.device).manual_seed(recipe.seed)
    out = sample(
        model,
        tokenizer,
        [task.model_input(tokenizer, p) for p in problems],
        max_new_tokens=task.max_new_tokens(),
        temperature=recipe.eval.temperature,
        generator=gen,
        batch_size=recipe.eval.batch_size,
    )
    pairs = list(zip(problems, out.texts, strict=True))
    correct = [float(task.is_correct(p, t)) for p, t in pairs] if task.has_references else []
    scores = [task.score(p, t) for p, t in pairs] if task.has_references else []
    rewards = None if reward is None else [float(r) for r in reward(problems, out.texts)]
    return Judged(correct, scores, rewards)
