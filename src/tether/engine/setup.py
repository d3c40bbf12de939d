"""Setting a run up: seeds, the policy (new, loaded, or with LoRA adapters), precision and
compilation, the optimizer, and the thread count."""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tether.config import Recipe
from tether.engine.precision import autocast_forward
from tether.models.loading import build_model, char_tokenizer, load_model_and_tokenizer
from tether.models.lora import with_adapters
from tether.stages.base import Stage


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_policy(recipe: Recipe) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if recipe.model.init is not None:
        model, tokenizer = load_model_and_tokenizer(recipe.model.init)
        if recipe.model.lora is not None:  # frozen weights, trainable low-rank adapters
            model = with_adapters(model, recipe.model.lora)
        model.train()
        return model, tokenizer
    tokenizer = char_tokenizer(model_max_length=recipe.model.max_positions)
    m = recipe.model
    model = build_model(
        tokenizer, m.arch, m.n_layer, m.n_head, m.n_embd, m.max_positions, m.dropout
    )
    return model, tokenizer


def compile_models(model: torch.nn.Module, stage: Stage[Any], backend: str = "inductor") -> None:
    """``train.compile``: compile the policy and the stage's frozen reference, if it has one,
    in place (``nn.Module.compile``: the modules, their names and state dicts stay as they
    are), with dynamic shapes, as batches change length from step to step: the two models
    every step runs forward (DPG's proposal only draws samples, and is left as it is)."""
    model.compile(dynamic=True, backend=backend)
    if stage.reference is not None:
        stage.reference.compile(dynamic=True, backend=backend)


def prepare_models(
    model: torch.nn.Module, stage: Stage[Any], recipe: Recipe, device: torch.device
) -> None:
    """``train.precision`` and ``train.compile`` on the policy and the stage's frozen models,
    in place: with bf16 their forward passes run under autocast and everything after them in
    fp32 (:mod:`tether.engine.precision` says why not accelerate's); then ``torch.compile``."""
    for scored in (model, *stage.frozen_models()):
        autocast_forward(scored, recipe.train.precision, device)
    if recipe.train.compile:
        compile_models(model, stage)


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


def warn_oversubscribed(threads: int, processes: int = 1) -> None:
    """A line on stderr when ``train.threads`` × processes exceeds the CPU cores this process
    may use: OpenMP threads then wait on one another (measured: 1,024 threads on 2 cores made
    a 6-second run take about 7 minutes)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if threads * processes > cores:
        tqdm.write(
            f"warning: train.threads={threads} × {processes} process(es) exceeds the {cores} CPU "
            "core(s) available; each step will wait on oversubscribed threads",
            file=sys.stderr,
        )
