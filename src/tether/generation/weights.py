"""What the fast decode runners (:mod:`tether.generation.runners`) keep in memory: their
matmul weights in the CPU GEMM's packed layout (:class:`Linear`, :class:`GateUp`), and the
buffers and prepared weights they reuse from one ``sample`` call to the next.

Reuse between calls (CPU only)
------------------------------
On the CPU a fresh large tensor is a fresh mapping that the kernel page-faults in on first
write; on the development machine (a VM) that made the first touch of SmolLM2's 113 MB
of folded LM head cost from 0.15 s up to 2.5 s, call after call. So:

* the KV cache's storage is kept for the next runner (:func:`kv_buffer`);
* the weights a runner prepares (RMSNorm gains folded in, cast to the matmul dtype, packed)
  from frozen tensors (``requires_grad`` off) are kept after the call and reused by the next
  one when they come from the very same source tensors, unchanged since: each source is
  checked by identity (a weak reference), storage address and version counter, which every
  in-place update through autograd-visible ops bumps (``load_state_dict``, ``copy_`` under
  ``no_grad``). Weights that train are prepared afresh at every call: optimizers may update
  them through ``.data``, which bypasses the version counter (DeepSpeed's ZeRO does), and
  a weight that trains changes between calls anyway. So a frozen model sampled again and
  again (``tether bench sampler``, DPG's frozen proposal, a frozen reference) prepares its
  weights once; in RL with LoRA the merged matrices are new at every step, while the frozen
  ones the adapters leave alone (the LM head, and any module outside
  ``lora.target_modules``) are reused. A frozen weight edited through ``.data`` is not seen;
  tether makes no such edit.

Only the last call's prepared weights are kept (about the model's size in the matmul dtype:
270 MB for SmolLM2-135M in bf16), less those whose sources are gone when ``sample`` returns
(:func:`prune`: a LoRA policy's merged matrices); :func:`release` frees them and the KV
buffer. Off the CPU
nothing is kept (device allocators already reuse memory, and GPU memory is dearer).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from tether.models import onednn_linear

__all__ = ["GateUp", "Linear", "Preparation", "kv_buffer", "prune", "release"]

T = TypeVar("T")


# The last KV cache a fast runner took on the CPU: its storage, and a weak reference to the
# runner's view of it (alive while that runner is).
_KV_BUFFER: dict[str, Any] = {"storage": None, "view": None}


def kv_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` for a runner's KV cache. On the CPU the storage of
    the previous runner's cache is reused when that runner is gone and the storage is large
    enough: a cache above glibc's 32 MiB mmap threshold is otherwise mapped afresh by every
    call and page-faulted in by its prefill (SmolLM2 at batch 64 × 32 new tokens: 71 M values,
    142 MB in bf16; 0.22-0.26 s of a 2.9 s call on the development machine). The largest
    cache taken stays allocated between calls. Elsewhere (CUDA's caching allocator already
    reuses memory) a new tensor."""
    numel = math.prod(shape)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    storage, view = _KV_BUFFER["storage"], _KV_BUFFER["view"]
    busy = view is not None and view() is not None
    fits = (
        storage is not None
        and storage.dtype == dtype
        and storage.device == device
        and storage.numel() >= numel
        # made under inference mode (sample's): writable only there
        and (torch.is_inference_mode_enabled() or not storage.is_inference())
    )
    if busy or not fits:
        storage = torch.empty(numel, dtype=dtype, device=device)
        if not busy:
            _KV_BUFFER["storage"] = storage
    cache = storage[:numel].view(shape)
    if storage is _KV_BUFFER["storage"]:
        _KV_BUFFER["view"] = weakref.ref(cache)
    return cache


# whether the Llama runner multiplies by oneDNN-packed weights on the CPU (a test turns it off
# to compare); where torch lacks the ops it falls back to F.linear by itself
PACK_WEIGHTS = True
# Only weights this large are packed: a packed call costs some 10-13 us more to set up, which
# tiny weights do not earn back (one thread: [32 x 96] x [96 x 288] 16 us plain, 29 us packed;
# [32 x 576] x [576 x 3072] 1059 us plain, 837 us packed)
PACK_MIN_NUMEL = 1 << 18


# Entries of a weight folded at a time (LlamaRunner's RMSNorm gains): the fp32 products of a
# block stay under glibc's 32 MiB mmap threshold and reuse heap memory, where SmolLM2's LM head
# in one piece (113 MB of fp32) was mapped and page-faulted afresh by every call
FOLD_CHUNK = 1 << 22


# whether this torch build has oneDNN's packed linear (checked once)
_ONEDNN_LINEAR = onednn_linear.AVAILABLE and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _can_pack(w: torch.Tensor) -> bool:
    return (
        PACK_WEIGHTS
        and _ONEDNN_LINEAR
        and w.numel() >= PACK_MIN_NUMEL
        and w.device.type == "cpu"
        and w.dtype in (torch.float32, torch.bfloat16)
    )


class Linear:
    """x W^T (+ b) by a weight [out, in]. On a CPU with oneDNN a large weight (at least
    :data:`PACK_MIN_NUMEL` entries, every matrix of a 135M model) is reordered once
    into oneDNN's blocked layout for ``rows`` rows (what torch's inductor does for frozen CPU
    linears), so each call multiplies without repacking it: at decode shapes (16-64 rows
    against [49152 × 576] or [3072 × 576]) 1.5-2.3× faster in bf16 and up to 2.2× in fp32
    on an AVX-512 CPU, the same products. Elsewhere, or if the reorder fails, F.linear."""

    def __init__(self, weight: torch.Tensor, rows: int):
        self.weight: torch.Tensor | None = weight.contiguous()
        self.packed: torch.Tensor | None = None
        if _can_pack(weight):
            with contextlib.suppress(RuntimeError):  # a shape oneDNN does not take: F.linear
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)
                self.weight = None  # the packed copy is all a call reads

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is not None:
            return onednn_linear.product(x, self.packed, bias)
        assert self.weight is not None
        return F.linear(x, self.weight, bias)


class GateUp:
    """SwiGLU's first half, ``silu(x Wg^T + bg) * (x Wu^T + bu)``, from the gate and up weights
    stacked ``[gate; up]`` ([2 × inter, in]) and their bias (or None). Where both halves pack
    (:class:`Linear`), two oneDNN calls with the activation and the product as the GEMMs'
    post-ops: no [rows, 2 × inter] intermediate and no separate silu and multiply passes
    (SmolLM2's prompt fill in bf16, 4,160 rows: 10.2 vs 13.3 ms a layer on the development
    machine); silu is taken on the fp32 accumulator before the one rounding to the output
    dtype. Elsewhere one F.linear and ``silu(gate) * up``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
        self.inter = weight.shape[0] // 2
        self.weight: torch.Tensor | None = weight
        self.bias = bias
        gate, up = Linear(weight[: self.inter], rows), Linear(weight[self.inter :], rows)
        self.packed = None
        if gate.packed is not None and up.packed is not None:
            biases = (None, None) if bias is None else (bias[: self.inter], bias[self.inter :])
            self.packed = (gate.packed, up.packed, *biases)
            self.weight = None  # the packed copies are all a call reads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            gate, up, b_gate, b_up = self.packed
            linear = torch.ops.mkldnn._linear_pointwise
            g = linear(x, gate, b_gate, "swish", [], "")
            return linear.binary(x, g, up, b_up, "mul")
        assert self.weight is not None
        gu = F.linear(x, self.weight, self.bias)
        return F.silu(gu[:, : self.inter]).mul_(gu[:, self.inter :])


# The weights the last runner prepared, by tag: (weak references to their sources, the
# sources' storage addresses and versions, the prepared value).
_PREPARED: dict[tuple[Any, ...], tuple[tuple[Any, ...], tuple[tuple[int, int], ...], Any]] = {}


def _stamp(t: torch.Tensor) -> tuple[int, int] | None:
    """A source's storage address and version counter; None where it has no version counter
    (inference tensors)."""
    try:
        return t.data_ptr(), t._version
    except RuntimeError:
        return None


class Preparation:
    """The weights one runner prepares, reused from the previous runner's where they came from
    the same unchanged frozen sources (module docstring). Call it once per prepared value, then
    :meth:`keep` when the runner is built."""

    def __init__(self, device: torch.device):
        self.keeps = device.type == "cpu"
        # the previous call's entries, taken out so that stale ones are freed as soon as
        # they are found stale (before their replacement is built)
        self.previous = _PREPARED.copy() if self.keeps else {}
        _PREPARED.clear()
        self.now: dict[tuple[Any, ...], Any] = {}

    def __call__(
        self, tag: tuple[Any, ...], sources: Sequence[torch.Tensor | None], build: Callable[[], T]
    ) -> T:
        """The value ``build()`` makes from ``sources`` (None entries ignored); ``tag`` names
        it among the runner's values and holds every setting it depends on besides them."""
        real = [s for s in sources if s is not None]
        frozen = not any(s.requires_grad for s in real)
        stamps = [_stamp(s) for s in real]
        entry = self.previous.pop(tag, None)
        if (
            entry is not None
            and frozen
            and len(entry[0]) == len(real)
            and all(ref() is s for ref, s in zip(entry[0], real, strict=True))
            and tuple(stamps) == entry[1]
        ):
            value: T = entry[2]
        else:
            del entry
            value = build()
        if self.keeps and frozen and None not in stamps:
            refs = tuple(weakref.ref(s) for s in real)
            self.now[tag] = (refs, tuple(stamps), value)
        return value

    def keep(self) -> None:
        """Keep this runner's values for the next call; drop the previous call's rest."""
        self.previous.clear()
        _PREPARED.clear()
        _PREPARED.update(self.now)


def prune() -> None:
    """Drop the kept values whose source tensors are gone: those of a LoRA policy's merged
    weights, made for one call and freed with it, which no later call can reuse."""
    dead = [tag for tag, (refs, _, _) in _PREPARED.items() if any(r() is None for r in refs)]
    for tag in dead:
        del _PREPARED[tag]


def release() -> None:
    """Free what the fast runners keep between calls: the prepared weights and the KV buffer."""
    _PREPARED.clear()
    _KV_BUFFER.update(storage=None, view=None)
