"""The figures logged at each evaluation of a run, and a task's accuracy on a set of problems."""

from __future__ import annotations

import random
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tether.config import Recipe
from tether.generation.sampler import sample
from tether.stages.registry import STAGES
from tether.tasks import AdditionTask, Task, task_from_config


def evaluate_during_training(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    task: Task | None = None,
) -> dict[str, float]:
    """Figures logged at each evaluation: for addition, greedy accuracy per length (the
    ``eval.digits`` table), for the stages whose registry row says so (RL, online DPO, XPO:
    ``evaluates_rl_distribution``) the accuracy on the RL and pre-training distributions, and
    the critical-token probe; for other tasks, accuracy on the RL distribution."""
    from tether.eval.addition import addition_accuracy, critical_token_probabilities

    task = task or task_from_config(recipe.task, recipe.seed)
    was_training = model.training
    model.eval()
    flat: dict[str, float] = {}
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
        flat["eval/acc_rl"], score = task_accuracy(model, tokenizer, task, problems, recipe)
        if recipe.task.name != "addition":
            flat["eval/score"] = score
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
    return flat


@torch.no_grad()
def task_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    problems: list[Any],
    recipe: Recipe,
) -> tuple[float, float]:
    """Accuracy and mean ``task.score`` on ``problems`` at ``eval.temperature`` (greedy by
    default), prompts formatted as the model expects (chat template where it has one)."""
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
    correct = [task.is_correct(p, t) for p, t in zip(problems, out.texts, strict=True)]
    scores = [task.score(p, t) for p, t in zip(problems, out.texts, strict=True)]
    return sum(correct) / len(correct), sum(scores) / len(scores)
