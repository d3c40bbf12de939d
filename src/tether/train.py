"""The one training loop: ask the stage for a batch, compute its loss, step, log, evaluate,
checkpoint. It knows nothing about any particular method.

A run directory holds ``config.yaml`` (the resolved recipe), ``metrics.jsonl`` (one JSON object
per logged step, always with ``step``), ``summary.json`` (final figures, written last),
``checkpoints/step-NNNNNN/`` and ``model/`` (the final checkpoint). Every checkpoint is a
``save_pretrained`` directory, loadable with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from tether.config import Recipe, dump_recipe
from tether.models import build_model, char_tokenizer, load_model_and_tokenizer
from tether.sampling import sample
from tether.stages import make_stage
from tether.tasks import Task, get_task
from tether.tasks.addition import GENERATION_MARGIN


class RunDirError(ValueError):
    """The run directory cannot be used; nothing was written."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(
            f"run directory {str(out)!r} already exists and is not empty; choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)


def save_checkpoint(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, meta: dict[str, Any]
) -> None:
    """Write to a temporary sibling, then rename, so a crash never leaves a half checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "tether.json").write_text(json.dumps(meta, indent=2) + "\n")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


class MetricsLog:
    """metrics.jsonl always; accelerate trackers too when configured."""

    def __init__(self, path: Path, accelerator: Accelerator):
        self.path = path
        self.accelerator = accelerator
        self.trackers = bool(accelerator.log_with)

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers:
            self.accelerator.log(values, step=step)


def tracker_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe as flat scalars (``optim/lr``...): what TensorBoard's hparams accept."""
    from tether.report import flatten

    flat = flatten(recipe.model_dump(mode="json"))
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def evaluate_during_training(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, recipe: Recipe
) -> dict[str, float]:
    """Figures logged at each evaluation: for addition, greedy accuracy per length (the
    ``eval.digits`` table), for RL the accuracy on the RL and pre-training distributions, and
    the critical-token probe; for other tasks, accuracy on the RL distribution."""
    from tether.evaluate import addition_accuracy, critical_token_probabilities

    task = get_task(recipe.task.name, recipe.task.max_digits)
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
    if recipe.train.stage == "rl" or recipe.task.name != "addition":
        rng = random.Random(f"tether-eval/{recipe.seed}")
        flat["eval/acc_rl"] = task_accuracy(
            model, tokenizer, task, [task.rl_problem(rng) for _ in range(recipe.eval.n)], recipe
        )
        if recipe.task.name == "addition":
            problems = [task.pretrain_problem(rng) for _ in range(recipe.eval.n)]
            flat["eval/acc_pretrain"] = task_accuracy(model, tokenizer, task, problems, recipe)
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
) -> float:
    """Accuracy on ``problems`` at ``eval.temperature`` (greedy by default)."""
    gen = torch.Generator(device=model.device).manual_seed(recipe.seed)
    out = sample(
        model,
        tokenizer,
        [p.prompt for p in problems],
        max_new_tokens=max(len(p.target) for p in problems) + GENERATION_MARGIN,
        temperature=recipe.eval.temperature,
        generator=gen,
        batch_size=recipe.eval.batch_size,
    )
    correct = [task.is_correct(p, t) for p, t in zip(problems, out.texts, strict=True)]
    return sum(correct) / len(correct)


def build_policy(recipe: Recipe) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if recipe.model.init is not None:
        model, tokenizer = load_model_and_tokenizer(recipe.model.init)
        model.train()
        return model, tokenizer
    tokenizer = char_tokenizer(model_max_length=recipe.model.max_positions)
    m = recipe.model
    model = build_model(
        tokenizer, m.arch, m.n_layer, m.n_head, m.n_embd, m.max_positions, m.dropout
    )
    return model, tokenizer


def make_optimizer(
    model: torch.nn.Module, recipe: Recipe, extra: list[torch.nn.Parameter] | None = None
) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases, norms)."""
    params = [p for p in model.parameters() if p.requires_grad] + list(extra or [])
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    o = recipe.optim
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
    )


def train(recipe: Recipe, out: Path, progress: bool = True) -> dict[str, Any]:
    """Run a recipe into ``out``; returns the summary (also written to summary.json)."""
    prepare_run_dir(out)
    (out / "config.yaml").write_text(dump_recipe(recipe))
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    seed_everything(recipe.seed)

    accelerator = Accelerator(log_with=recipe.tracking.trackers or None, project_dir=str(out))
    if recipe.tracking.trackers:
        accelerator.init_trackers(recipe.name, config=tracker_config(recipe))
    model, tokenizer = build_policy(recipe)
    model.to(accelerator.device)
    stage = make_stage(recipe, tokenizer, model, accelerator.device)
    optimizer = make_optimizer(model, recipe, stage.parameters())
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=recipe.optim.warmup_steps,
        num_training_steps=recipe.train.steps,
        min_lr_rate=recipe.optim.min_lr_ratio,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    log = MetricsLog(out / "metrics.jsonl", accelerator)
    meta = {
        "description": recipe.description,
        "recipe": recipe.name,
        "task": recipe.task.model_dump(),
        "seed": recipe.seed,
    }
    n_params = sum(p.numel() for p in model.parameters())

    t_start = time.perf_counter()
    tokens_since, t_since = 0, t_start
    last: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    if recipe.train.stage == "rl":  # the starting model's figures at step 0
        last_eval = evaluate_during_training(accelerator.unwrap_model(model), tokenizer, recipe)
        log.log(0, last_eval)
    bar = tqdm(
        range(1, recipe.train.steps + 1), desc=recipe.name, disable=not progress, dynamic_ncols=True
    )
    for step in bar:
        batch = stage.next_batch()
        for _ in range(stage.epochs_per_batch):  # PPO: several updates on one rollout
            loss, stats = stage.loss(model, batch)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"step {step}: loss is {loss.item()}; stopping (last checkpoint kept)"
                )
            accelerator.backward(loss)
            grad_norm = float("nan")
            if recipe.optim.grad_clip is not None:
                grad_norm = float(accelerator.clip_grad_norm_(trainable, recipe.optim.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        tokens_since += batch.num_tokens

        if step % recipe.train.log_every == 0 or step == recipe.train.steps:
            now = time.perf_counter()
            last = {
                **stats,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_since / max(now - t_since, 1e-9),
                "elapsed_s": now - t_start,
            }
            tokens_since, t_since = 0, now
            log.log(step, last)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
        if step % recipe.train.eval_every == 0 or step == recipe.train.steps:
            last_eval = evaluate_during_training(accelerator.unwrap_model(model), tokenizer, recipe)
            log.log(step, last_eval)
            t_since = time.perf_counter()  # evaluation time is not training throughput
        if step % recipe.train.checkpoint_every == 0 and step != recipe.train.steps:
            save_checkpoint(
                accelerator.unwrap_model(model),
                tokenizer,
                out / "checkpoints" / f"step-{step:06d}",
                {**meta, "step": step},
            )

    save_checkpoint(
        accelerator.unwrap_model(model),
        tokenizer,
        out / "model",
        {**meta, "step": recipe.train.steps},
    )
    summary = {
        "name": recipe.name,
        "steps": recipe.train.steps,
        "parameters": n_params,
        "train_time_s": round(time.perf_counter() - t_start, 2),
        "final_loss": last.get("loss"),
        **last_eval,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if recipe.tracking.trackers:
        accelerator.end_training()
    return summary
