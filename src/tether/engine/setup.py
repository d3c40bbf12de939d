"""Setting a run up: seeds, the policy (new, loaded, or with LoRA adapters; activation
checkpointing), precision and compilation, the optimizer, and the thread count."""

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

from tether.config import Recipe, RecipeError
from tether.engine.precision import autocast_forward
from tether.models.loading import build_model, char_tokenizer, load_model_and_tokenizer
from tether.models.lora import is_lora, with_adapters
from tether.stages.base import Stage


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_policy(recipe: Recipe) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The policy to train (``model.init`` loaded, with LoRA adapters when asked, or a new
    model) and its tokenizer; with ``train.activation_checkpointing`` its activations are
    recomputed in the backward pass (:func:`enable_activation_checkpointing`)."""
    if recipe.model.init is not None:
        model, tokenizer = load_model_and_tokenizer(recipe.model.init)
        if recipe.model.lora is not None:  # frozen weights, trainable low-rank adapters
            model = with_adapters(model, recipe.model.lora)
        model.train()
    else:
        tokenizer = char_tokenizer(model_max_length=recipe.model.max_positions)
        m = recipe.model
        model = build_model(
            tokenizer, m.arch, m.n_layer, m.n_head, m.n_embd, m.max_positions, m.dropout
        )
    if recipe.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model, tokenizer


def enable_activation_checkpointing(model: Any) -> None:
    """``train.activation_checkpointing``: each decoder layer's activations are recomputed in
    the backward pass instead of kept (Hugging Face's ``gradient_checkpointing_enable``, the
    non-reentrant ``torch.utils.checkpoint``, so gradients equal those without). Only in
    training mode: sampling (eval mode) keeps its KV cache. With LoRA the embeddings' output
    is made to require grad, so the checkpointed layers see an input with a gradient and the
    adapters inside them get theirs. A model without the support is a RecipeError."""
    base = model.get_base_model() if is_lora(model) else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        name = type(base).__name__
        raise RecipeError(
            f"train.activation_checkpointing: the model ({name}) does not support gradient "
            "checkpointing; set it to false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers ≥ 5.2x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if is_lora(model) and not hasattr(base, "_require_grads_hook"):  # newer: enabled above
        base.enable_input_require_grads()


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
