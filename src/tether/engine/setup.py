"""Setting a run up: the accelerator (one process, DDP, FSDP, DeepSpeed; on CPUs too), seeds,
the policy (new, loaded, or with LoRA adapters; activation checkpointing), precision and
compilation, the optimizer, and the thread count."""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tether import distributed
from tether.config import Recipe, RecipeError
from tether.engine.precision import autocast_forward, cache_frozen_casts
from tether.models import onednn_linear
from tether.models.fused import use_fused_ops
from tether.models.loading import build_model, char_tokenizer, load_model_and_tokenizer
from tether.models.lora import is_lora, with_adapters
from tether.stages.base import Stage


def make_accelerator(recipe: Recipe, out: str) -> Accelerator:
    """The run's accelerator. Launched with ``accelerate launch`` or ``torchrun`` it joins the
    process group. The scheduler steps once per optimizer step, as in one process (every
    process sees a share of the same global batch, not a batch of its own).

    On CPUs accelerate sets up gloo DDP only when told ``cpu=True``, and then ignores an FSDP
    config (it sets FSDP up on accelerators only); FSDP2 itself runs on CPUs over gloo, so
    when the launcher asked for FSDP (``ACCELERATE_USE_FSDP``, set by ``accelerate launch``
    from an FSDP config) the state is made FSDP with the plugin read from the launcher's
    ``FSDP_*`` variables, as accelerate does on GPUs."""
    distributed.name_deepspeeds_accelerator()
    cpu = distributed.launched_on_cpu()
    accelerator = Accelerator(
        log_with=recipe.tracking.trackers or None,
        project_dir=out,
        step_scheduler_with_optimizer=False,
        cpu=cpu,
    )
    if cpu and distributed.fsdp_requested():
        _fsdp_on_cpu(accelerator)
    elif cpu and distributed.deepspeed_requested():
        _deepspeed_on_cpu(accelerator)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and not plugin.zero3_init_flag:
        # accelerate still tells transformers "ZeRO-3" (HfDeepSpeedConfig), which then loads
        # every checkpoint partitioned (an embedding of 0 rows): zero3_init_flag false means
        # load whole; DeepSpeed partitions the policy when it is prepared
        from transformers.integrations import unset_hf_deepspeed_config

        plugin.dschf = None
        unset_hf_deepspeed_config()
    return accelerator


def _fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Turn the CPU's gloo DDP state into FSDP2 (what accelerate's state does on GPUs)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
    if plugin.fsdp_version != 2:
        raise RecipeError(
            f"fsdp_version: {plugin.fsdp_version}; on CPUs tether runs FSDP2 only "
            "(fsdp_version: 2 in the accelerate config, or FSDP_VERSION=2)"
        )
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    for state in (AcceleratorState, PartialState):
        state._shared_state["distributed_type"] = DistributedType.FSDP


def _deepspeed_on_cpu(accelerator: Accelerator) -> None:
    """Turn the CPU's gloo DDP state into DeepSpeed (its CPU accelerator, over the same gloo
    group), as accelerate's state does on GPUs: the plugin read from the launcher's
    ``ACCELERATE_DEEPSPEED_*`` variables. tether gives DeepSpeed no data loader, so the
    micro-batch size DeepSpeed asks for (it only reports throughput with it) is set to 1."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    try:
        from deepspeed import comm
    except ImportError as err:
        raise RecipeError(
            f"DeepSpeed was asked for (ACCELERATE_USE_DEEPSPEED) but does not import ({err}); "
            "install tether's deepspeed extra (pip install -e '.[deepspeed]'), or use DDP or FSDP"
        ) from err
    if not comm.is_initialized():  # joins the process group accelerate set up
        # DeepSpeed's CPU back end would compile a shared-memory all-reduce here (C++,
        # deepspeed_shm_comm: 2 min on 2 cores, on every machine's first run) that only its
        # inference tensor parallelism calls; ZeRO's collectives are gloo's. DeepSpeed builds
        # no op it was told is incompatible (its ops.__compatible_ops__, a mutable table).
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    plugin = DeepSpeedPlugin()
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
    for state in (AcceleratorState, PartialState):
        state._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    AcceleratorState._shared_state["deepspeed_plugins"] = {"default": plugin}
    plugin.set_mixed_precision("no")
    plugin.select(_from_accelerator_state=True)
    accelerator.state.deepspeed_plugins = {"default": plugin}


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
    """``train.precision``, ``train.fused_ops``, ``train.onednn_linear`` and ``train.compile`` on
    the policy and the stage's frozen models, in place: with bf16 their forward passes run under
    autocast and everything after them in fp32 (:mod:`tether.engine.precision` says why not
    accelerate's), and on the CPU their frozen Linear weights keep their bf16 casts between passes;
    Llama layers take the fused RoPE and RMSNorm (:mod:`tether.models.fused`); in fp32 on the CPU
    linear layers multiply through oneDNN (:mod:`tether.models.onednn_linear`); then
    ``torch.compile``."""
    for scored in (model, *stage.frozen_models()):
        autocast_forward(scored, recipe.train.precision, device)
        cache_frozen_casts(scored, recipe.train.precision, device)
        if recipe.train.fused_ops and not recipe.train.compile:
            use_fused_ops(scored)
        if (
            onednn_linear.wanted(recipe.train.onednn_linear)
            and recipe.train.precision == "fp32"
            and device.type == "cpu"
            and not recipe.train.compile
        ):
            onednn_linear.use_onednn_linear(scored)
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


def usable_cores() -> int:
    """The CPU cores this process may use (its affinity on Linux), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def warn_oversubscribed(threads: int, processes: int = 1) -> None:
    """A line on stderr when ``train.threads`` × processes exceeds the CPU cores this process
    may use: OpenMP threads then wait on one another (measured: 1,024 threads on 2 cores made
    a 6-second run take about 7 minutes)."""
    cores = usable_cores()
    if threads * processes > cores:
        tqdm.write(
            f"warning: train.threads={threads} × {processes} process(es) exceeds the {cores} CPU "
            "core(s) available; each step will wait on oversubscribed threads",
            file=sys.stderr,
        )
