"""Many processes, one global batch: the few collectives the stages and the loop need.

Launched by ``accelerate launch`` or ``torchrun``, every process runs the same loop. The
stages draw the *global* batch's problems with the same seeded RNG on every process (so the
prompt stream does not depend on the number of processes) and keep a contiguous share of
them: sampling, reward scoring and reference passes run only on that share (rollouts are
sharded, not duplicated). DDP averages gradients over processes, so a loss that is a mean over
the global batch must be written as

    loss_r = Σ_{i ∈ share r} x_i / (N / W)        (N: global count, W: processes)

whose average over ``r`` is Σ_i x_i / N. :func:`mean_count` gives N / W. A loss that is a
mean over equal shares (sequences, pairs, prompt groups) needs nothing: the shares are equal
by construction (:func:`shard` refuses a batch that does not divide).

With one process (or no process group) every function here is the identity, with no cost.
Evaluation runs on every process alone: :func:`local` turns the collectives off inside it.

Under FSDP (FSDP2's ``fully_shard``) each process holds a shard of every weight, and a forward
pass all-gathers them: every process must run the same forward passes. Sampling, evaluation and
saving do not (each process samples its own share, stops at its own lengths), so they run
inside :func:`full_weights`, which gathers the whole weights once and keeps them until the end
of the block: the forward passes inside touch no collective. A checkpoint's weights are
gathered whole on the main process only (:func:`whole_state_dict`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

_local_depth = 0  # > 0 inside `local()`: collectives are off


def active() -> bool:
    """True when a process group with more than one process is live and not inside ``local``."""
    return (
        _local_depth == 0
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    )


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def fsdp_requested() -> bool:
    """``accelerate launch`` with an FSDP config (or ``ACCELERATE_USE_FSDP=true`` under
    ``torchrun``) asked for FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def deepspeed_requested() -> bool:
    """``accelerate launch`` with a DeepSpeed config asked for DeepSpeed."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def name_deepspeeds_accelerator() -> None:
    """On a machine with no accelerator torch can use (``torch.accelerator``), tell DeepSpeed
    its accelerator is the CPU (``DS_ACCELERATOR``, DeepSpeed's own override; one already set
    is kept). Where DeepSpeed is installed accelerate imports it in every training run,
    DeepSpeed or not (to unwrap a model), and DeepSpeed left to guess warns on every process
    that it found none ("Setting accelerator to CPU..."); told, it says nothing. Where there
    is a GPU, DeepSpeed's own detection stands. Called by every ``tether`` command and
    :func:`tether.engine.setup.make_accelerator`."""
    if "DS_ACCELERATOR" in os.environ:
        return
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, ROCm, MPS, XPU...
        found = torch.accelerator.is_available()
    else:
        found = torch.cuda.is_available() or torch.backends.mps.is_available()
    if not found:
        os.environ["DS_ACCELERATOR"] = "cpu"


def launched_on_cpu() -> bool:
    """Launched as several processes (``torchrun``, ``accelerate launch``) on a machine with
    no CUDA device: accelerate must be told to use the CPU to set up DDP over gloo."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Inside: every process computes on its own (no collectives), e.g. evaluation."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def shard(items: Sequence[T], what: str, unit: int = 1) -> list[T]:
    """This process's contiguous share of a global batch. ``unit`` rows stay together (the
    samples of one prompt, say); the number of units must divide by the number of processes,
    else a ValueError that names ``what`` (the config field that sets the batch)."""
    if not active():
        return list(items)
    world, r = dist.get_world_size(), dist.get_rank()
    units = len(items) // unit
    if len(items) % unit or units % world:
        raise ValueError(
            f"{what}: {units} per step does not divide among {world} processes; "
            f"use a multiple of {world}"
        )
    per = units // world * unit
    return list(items[r * per : (r + 1) * per])


def rank_seed(seed: int) -> int:
    """The sampling seed of this process: ``seed`` itself on rank 0 (a one-process run is
    unchanged), a distinct derived seed on the others (their samples must differ)."""
    r = rank() if active() else 0
    return seed if r == 0 else seed + 1_000_003 * r


def mean_count(count: torch.Tensor) -> torch.Tensor:
    """The mean over processes of a count (N / W), without gradient: the denominator that
    makes DDP's gradient average equal the gradient of the global mean."""
    if not active():
        return count
    total = _summed(count.detach().to(torch.float64))
    return (total / dist.get_world_size()).to(count.dtype)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over processes of a tensor, without gradient (a copy, on ``x``'s device)."""
    return _summed(x) if active() else x.detach().clone()


def collective_device(x: torch.Tensor) -> torch.device:
    """Where ``x`` must be for a collective of this process group: NCCL (accelerate's backend
    on GPUs) takes CUDA tensors only, so a CPU tensor goes to this process's GPU; gloo takes
    a tensor where it is."""
    if x.device.type == "cpu" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return x.device


def _summed(x: torch.Tensor) -> torch.Tensor:
    """The all-reduce sum of ``x`` (a copy, without gradient), taken on the device the
    backend needs (:func:`collective_device`) and returned on ``x``'s device."""
    total = x.detach().to(collective_device(x), copy=True)
    dist.all_reduce(total)
    return total.to(x.device)


def _count_true(flag: bool) -> int:
    """On how many processes ``flag`` is true."""
    return int(all_sum(torch.tensor(int(flag), dtype=torch.int64)))


def all_true(flag: bool) -> bool:
    """True on every process iff ``flag`` is true on every process."""
    return _count_true(flag) == (dist.get_world_size() if active() else 1)


def any_true(flag: bool) -> bool:
    """True on every process iff ``flag`` is true on some process."""
    return _count_true(flag) > 0


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (picklable objects; small ones only)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_stats(stats: dict[str, float]) -> dict[str, float]:
    """The per-key mean over processes of the step's figures (keys any process has)."""
    if not active():
        return stats
    every = gather_objects(stats)
    keys = dict.fromkeys(k for s in every for k in s)
    return {k: sum(s[k] for s in every if k in s) / sum(k in s for s in every) for k in keys}


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters that DDP does not hold (a stage's value head)."""
    if not active():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    """End this process's process group, if it has one: called once at the end of a run, on
    every process, after its last collective.

    A gloo worker thread drops its last reference to a collective's tensors after the caller
    has been told the collective is done, and dropping a tensor that Python made needs the
    GIL. A group destroyed while a worker waits for the GIL is destroyed by a thread that
    holds the GIL and waits for that worker: a deadlock, or at interpreter teardown, where the
    worker cannot take the GIL, an abort ("terminate called without an active exception").
    So every process first meets the others at a barrier, then sleeps for a moment with the
    GIL released, so the workers finish with the tensors, and only then destroys the group.
    Measured here on two-process launches that end with a collective while a DDP model is
    live: 2 of 15 aborted with no clean-up, 2 of 15 with ``destroy_process_group`` alone, none
    of 45 with this."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        dist.barrier()
        time.sleep(0.1)
    dist.destroy_process_group()


def numel(p: torch.Tensor) -> int:
    """The number of elements of the whole parameter ``p``: a parameter ZeRO-3 partitioned
    holds none outside a forward pass (``ds_numel`` is its whole size); FSDP2's (a DTensor)
    counts the whole."""
    return int(getattr(p, "ds_numel", p.numel()))


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that FSDP2's ``fully_shard`` sharded (none: not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_weights(model: torch.nn.Module) -> Iterator[None]:
    """Inside: every FSDP-sharded module of ``model`` holds its whole weights, gathered once
    (one all-gather per FSDP unit, the same on every process), and keeps them across forward
    passes, so a process may run any number of forward passes without the others (sampling
    its own share, evaluating alone). (``state_dict()`` stays sharded, as FSDP2 makes it:
    :func:`whole_state_dict` gathers one to save.) On leaving, the weights go back to their
    shards. Read-only: what is written into the gathered weights is lost. DeepSpeed ZeRO-3
    (its engine as ``model``): the same, by :func:`_zero3_full_weights`. Not sharded (DDP,
    ZeRO-2, one process): nothing happens."""
    offload = _zero3_offload(model)
    if offload is not None:
        with _zero3_full_weights(offload):
            yield
        return
    units = fsdp_modules(model)
    if not units:
        yield
        return
    # FSDP reshards after each forward unless told not to; remember each unit's setting
    groups = [g for m in units for g in _param_groups(m)]
    saved = [g.post_forward_mesh_info for g in groups]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]
    for m in units:
        m.unshard()  # type: ignore[operator]
    try:
        yield
    finally:
        for g, info in zip(groups, saved, strict=True):
            g.post_forward_mesh_info = info
        for m in units:
            m.reshard()  # type: ignore[operator]
        root = units[0]  # modules() lists the outermost first
        if root._get_fsdp_state()._is_root:  # type: ignore[operator]  # it ran a forward pass
            root.reset_iter_state()  # type: ignore[operator]  # forgets the passes' order


def _zero3_offload(model: torch.nn.Module) -> Any | None:
    """What holds ZeRO-3's partitioned weights and forward hooks when ``model`` is a DeepSpeed
    engine under ZeRO-3 (its optimizer's ``parameter_offload``); None otherwise."""
    optimizer = getattr(model, "optimizer", None)
    return getattr(optimizer, "parameter_offload", None)


@contextlib.contextmanager
def _zero3_full_weights(offload: Any) -> Iterator[None]:
    """ZeRO-3's :func:`full_weights`. Its hooks gather a module's weights before each forward
    pass and free them after it (a collective per module per pass), and tether's fast
    samplers read the weights without a forward pass at all; so the whole weights are
    gathered once (``deepspeed.zero.GatheredParameters``, read-only: partitioned again,
    unchanged, on leaving) and the hooks are off inside, as TRL does to generate under
    ZeRO-3 (``trl.models.utils.unwrap_model_for_generation``)."""
    import deepspeed

    module = offload.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        for p in params:
            p.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:  # the hooks back; the passes' order it recorded is forgotten
            offload._register_deepspeed_module(module)


def _param_groups(module: torch.nn.Module) -> list[Any]:
    state = module._get_fsdp_state()  # type: ignore[operator]
    return list(state._fsdp_param_groups)


def load_whole_weights(model: torch.nn.Module, whole: dict[str, Any]) -> None:
    """Load a whole state dict (every process has it) into an FSDP-sharded ``model``: each
    process keeps its own shard of each weight."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True))


def whole_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """The whole weights of an FSDP-sharded ``model``, on the CPU of the main process (every
    process must call this: it gathers; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def whole_weights(model: torch.nn.Module) -> dict[str, Any]:
    """``model.state_dict()``, whole on every process: gathered when FSDP shards ``model``
    (every process must call this then), the module's own otherwise."""
    if not fsdp_modules(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
