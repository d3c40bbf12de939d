"""fp32 linear layers through oneDNN on the CPU, in training and scoring.

torch multiplies fp32 matrices on the CPU through MKL, and MKL runs its AVX2 code on CPUs that
are not Intel's: on the 2-core AMD EPYC of docs/performance.md (AVX-512, avx512_bf16)
``F.linear`` reached 176-241 GFLOP/s in fp32 at training shapes, oneDNN's product (the kernel
torch's inductor calls for CPU linears, ``torch.ops.mkldnn._linear_pointwise``) 342-548: both
fp32 products with fp32 accumulation, apart by rounding only (relative 1e-6). bf16 matmuls
already go through oneDNN; this is fp32's.

:func:`use_onednn_linear` switches a model's ``nn.Linear`` modules, in place and per instance
(LoRA adapters and the layers they wrap included), to :func:`linear`, which runs
:class:`OneDNNLinear` when the product is an fp32 one on the CPU that oneDNN can take, and
``F.linear`` otherwise (other dtypes, bf16 autocast, GPUs, ``torch.compile`` tracing, tensor
subclasses such as FSDP's DTensors). :class:`OneDNNLinear` is y = x Wᵀ + b with the backward
written out, every product through the same kernel:

    ∂x = g W,      ∂W = gᵀ x,      ∂b = Σ_rows g

(transposes as strided views, no copies).

Where it pays (``train.onednn_linear: auto``, :func:`faster_here`): on CPUs with AVX-512 not
made by Intel. There MKL runs AVX2 code and oneDNN AVX-512 (the AMD EPYC above). On the AVX2-only
AMD EPYC of the earlier measurements both ran AVX2 and oneDNN's product was 10-35% slower than
MKL's; on Intel CPUs MKL has its own AVX-512 code, and no comparison of the two was made. ``true``
switches on every CPU, ``false`` (the default) keeps torch's own.

Why off by default: oneDNN builds a kernel for each new shape of a product (about 0.6 ms each on
that machine) and keeps it, and its allocations fragment the heap. A training step whose batch has a
row count not seen before pays that for each distinct product, some 15 for a Llama (forward, input
and weight gradients of five shapes), and the process keeps memory for it: 150 steps of the demo
model at random lengths (16 rows of 20-300 tokens, in a plain Python process with glibc's default
thresholds) grew the resident memory by 1.33 GB (515 MB after ``malloc_trim``) against 0.26 GB with
MKL. Runs with few distinct batch shapes (fixed lengths, packed rows) gain the speed at little
memory cost; others should measure first. torch's own bf16 products (oneDNN's too) keep some 0.65 MB
per new shape as well.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "AVAILABLE",
    "SETTINGS",
    "OneDNNLinear",
    "cpu_vendor",
    "cpuinfo_field",
    "faster_here",
    "linear",
    "product",
    "takes",
    "use_onednn_linear",
    "wanted",
]

# whether this torch build has oneDNN's linear (checked once)
AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

_PLAIN = (Tensor, nn.Parameter)

# the values of ``train.onednn_linear`` as a command line spells them
SETTINGS = ("auto", "true", "false")


@functools.cache
def cpuinfo_field(key: str) -> str | None:
    """The value of ``key`` (``vendor_id``, ``model name``) in the first processor's entry of
    /proc/cpuinfo, read once per key; None where there is none (not Linux, no such key)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_vendor() -> str | None:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``); None where there is none
    (not Linux, or not x86)."""
    return cpuinfo_field("vendor_id")


def faster_here(vendor: str | None = None, capability: str | None = None) -> bool:
    """Whether oneDNN's fp32 product was measured faster than MKL's on a CPU like this one
    (module docstring): AVX-512 (torch's CPU capability) and an x86 vendor other than Intel.
    ``vendor`` and ``capability`` default to this machine's."""
    vendor = cpu_vendor() if vendor is None else vendor
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    return AVAILABLE and capability == "AVX512" and vendor not in (None, "", "GenuineIntel")


def wanted(setting: bool | str) -> bool:
    """``train.onednn_linear`` resolved: True, False, or "auto" (:func:`faster_here`); the
    strings "true" and "false" (a command line's) as the booleans."""
    if isinstance(setting, str):
        if setting not in SETTINGS:
            raise ValueError(f"onednn_linear {setting!r}: choose from {', '.join(SETTINGS)}")
        return faster_here() if setting == "auto" else setting == "true"
    return bool(setting)


def product(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x Wᵀ (+ b) through oneDNN for a 2-D x [rows, in] and W [out, in] (either may be a
    strided view), or W in oneDNN's packed layout (:class:`tether.generation.weights.Linear`)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _product_by_rows(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """:func:`product` for an x of any leading shape [..., in] -> [..., out]."""
    return product(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


class OneDNNLinear(torch.autograd.Function):
    """y = x Wᵀ + b through oneDNN, forward and backward (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x.reshape(-1, x.shape[-1]), weight)
        ctx.shape = x.shape
        ctx.has_bias = bias is not None
        return _product_by_rows(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        rows, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = product(g, weight.t()).view(ctx.shape)  # g W
        if ctx.needs_input_grad[1]:
            grad_w = product(g.t(), rows.t())  # gᵀ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def takes(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`linear` multiplies ``x``, ``weight`` and ``bias`` through oneDNN."""
    return (
        AVAILABLE
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and type(x) in _PLAIN
        and type(weight) in _PLAIN
        and (bias is None or (bias.dtype == torch.float32 and type(bias) in _PLAIN))
        and x.numel() > 0
        and x.dim() >= 2
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where :func:`takes` allows."""
    if not takes(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (
        bias is not None and bias.requires_grad
    )):  # fmt: skip
        out: Tensor = OneDNNLinear.apply(x, weight, bias)
        return out
    return _product_by_rows(x, weight, bias)


def _forward(self: nn.Linear, x: Tensor) -> Tensor:
    return linear(x, self.weight, self.bias)


def use_onednn_linear(model: nn.Module) -> int:
    """Switch ``model``'s ``nn.Linear`` modules to :func:`linear`, in place; the number
    switched (0 where this torch has no oneDNN: nothing changes). Parameters, state dict and
    checkpoints are untouched."""
    if not AVAILABLE:
        return 0
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = types.MethodType(_forward, module)  # type: ignore[method-assign]
            switched += 1
    return switched
