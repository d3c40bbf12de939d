"""``train.precision``: bf16 forward passes, fp32 everything else.

With ``bf16`` every forward pass of the policy and of the stage's frozen models (the reference,
DPG's adaptive proposal) runs under ``torch.autocast(device_type, dtype=torch.bfloat16)``: the
matmuls and attention in bf16, the logits come out in bf16. Everything after the forward is
outside autocast and in fp32: :func:`~tether.objectives.common.token_logprobs` (and every other
objective) upcasts the logits before the log-softmax, so log-probs, KL estimates, advantages
and losses are fp32. The weights are never cast: master weights, gradients and the AdamW state
stay fp32. It works on CPU as well (CPU autocast supports bf16), which is how the tests run it.

Why a manual autocast and not ``Accelerator(mixed_precision="bf16")``: accelerate's also keeps
log-probs in fp32 (it wraps the *prepared* model's forward in autocast and converts its outputs
to fp32), but it only reaches the model passed to ``accelerator.prepare``. The frozen reference
must not be prepared (under DDP a module without trainable parameters cannot be wrapped), so its
scoring would stay fp32 while the policy's ran in bf16, and at step 0, where the policy *is* the
reference, log π − log π_ref would be bf16 rounding noise instead of 0, a KL penalty on nothing.
Here policy and reference go through the same arithmetic. It also leaves the outputs alone
(accelerate copies every output, all hidden states included, to fp32), so only the slices the
losses use are upcast.

The rollouts are sampled in bf16 too (``sample(dtype=bfloat16)``: the fast Llama runner's
matmuls, attention and KV cache in bf16, its residual stream and norms in fp32, as under
autocast); its own op order differs from the forward's, so the rollout log-probs used as
``old_logp`` (PPO, GRPO) are recomputed by the policy's own (bf16) forward
(:mod:`tether.generation.rollouts`), and the first ratio is exactly 1.

Frozen weights on the CPU (:func:`cache_frozen_casts`): autocast casts every weight to bf16 at
every use and keeps no cast of a weight that takes no gradient, so a LoRA run's frozen base
model and a frozen reference were cast afresh in every forward pass (on SmolLM2, 14% of a LoRA
GRPO update's forward and backward went to these casts). Their Linear layers therefore keep
one bf16 copy of their weight and bias, made again when the weight changes (its version
counter or its storage: an in-place update, a checkpoint loaded, the model moved) and used
only under bf16 autocast while the weight takes no gradient: the same bf16 values autocast
would make, so the same outputs and gradients. A weight edited in place through ``.data``
(which bumps no version; PEFT's ``merge_adapter`` does this, and tether refuses merged
adapters) is not seen. Not on GPUs, where the casts are cheap beside the matmuls and the copies
would hold memory between steps that autocast frees after each layer.

Hardware: on CUDA bf16 needs a GPU that supports it (a RecipeError otherwise); on a CPU it runs
everywhere, but only a CPU with bf16 units (``avx512_bf16``, AMX: oneDNN's bf16 kernels) runs
it faster than fp32; elsewhere a bf16 matmul takes some 40× as long as fp32 and
:func:`check_precision` warns in one line. docs/performance.md measures what bf16 does to the
log-probs and the KL estimates.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tether.config import RecipeError

# set on a module whose forward runs under autocast; copied by deepcopy with the bound method
_MARK = "_tether_autocast"


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 natively (``avx512_bf16`` or AMX: oneDNN's kernels)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_precision(precision: str, device: torch.device) -> None:
    """RecipeError when ``device`` cannot run ``precision`` (bf16 on a GPU without it); a
    one-line warning for bf16 on a CPU without bf16 units (it runs, slowly)."""
    if precision != "bf16":
        return
    if device.type == "cpu":
        if not cpu_has_bf16_units():
            warnings.warn(
                "train.precision bf16: this CPU has no bf16 units (avx512_bf16, AMX), so bf16 "
                "matmuls run far slower than fp32 here; fp32 is faster on it",
                stacklevel=2,
            )
        return
    if device.type != "cuda":
        return
    if not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise RecipeError(f"train.precision bf16: {name} does not support bfloat16; use fp32")


# Up to this many tokens a row, a bf16 forward on the CPU takes SDPA's math backend: the flash
# kernel's bf16 backward costs some 18 ms a layer at SmolLM2's RL shapes (16 rows of 88 tokens,
# 9 heads over 3 KV heads), the math backend's forward and backward 5-9 ms; flash wins again
# from about 256 tokens (8 × 256: 19 against 33 ms). Passes without gradient (the reference's,
# a rescoring) take the same kernel, so that policy and reference, sampler log-probs and loss
# log-probs stay the same arithmetic. fp32 keeps flash (faster at every length measured).
# Measured on a 2-core Xeon with AMX (docs/performance.md).
CPU_BF16_MATH_ATTENTION_MAX_LEN = 192


def attention_kernels(
    device: torch.device, input_ids: Any
) -> contextlib.AbstractContextManager[Any]:
    """The SDPA backends of a bf16 forward (:data:`CPU_BF16_MATH_ATTENTION_MAX_LEN`): the math
    backend for a CPU pass over rows of at most that many tokens, else SDPA's own choice.
    Values agree with flash's to bf16 rounding; only the kernel differs."""
    short = (
        isinstance(input_ids, torch.Tensor)
        and input_ids.shape[-1] <= CPU_BF16_MATH_ATTENTION_MAX_LEN
    )
    if device.type == "cpu" and short:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def autocast_forward(model: nn.Module | None, precision: str, device: torch.device) -> None:
    """Make every call of ``model`` run its forward under bf16 autocast (``precision`` bf16;
    fp32 leaves it alone). In place and idempotent. The wrapper is a method bound to the model,
    so a ``copy.deepcopy`` of the model gets one bound to the copy."""
    if model is None or precision == "fp32" or getattr(model, _MARK, False):
        return
    if precision != "bf16":
        raise ValueError(f"unknown precision {precision!r}: choose fp32 or bf16")
    original = model.forward.__func__  # type: ignore[attr-defined]  # HF: a bound method
    device_type = device.type

    @functools.wraps(original)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        with torch.autocast(device_type, dtype=torch.bfloat16), attention_kernels(device, ids):
            return original(self, *args, **kwargs)

    model.forward = MethodType(forward, model)  # type: ignore[method-assign]
    setattr(model, _MARK, True)


# set on a Linear module switched by cache_frozen_casts; `_CACHE` holds (key, weight, bias)
_CACHED = "_tether_cached_cast"
_CACHE = "_tether_bf16_cast"


def _cached_cast_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward, with the bf16 weight (and bias) from the module's cache when the
    weight is frozen and the call runs under CPU bf16 autocast (module docstring)."""
    weight = self.weight
    if (
        weight.requires_grad
        or not torch.is_autocast_enabled("cpu")
        or torch.get_autocast_dtype("cpu") != torch.bfloat16
    ):
        return F.linear(x, weight, self.bias)
    key = (weight.data_ptr(), weight._version, weight.device)
    cached = getattr(self, _CACHE, None)
    if cached is None or cached[0] != key:
        bias = None if self.bias is None else self.bias.detach().to(torch.bfloat16)
        cached = (key, weight.detach().to(torch.bfloat16), bias)
        setattr(self, _CACHE, cached)
    return F.linear(x.to(torch.bfloat16), cached[1], cached[2])


def cache_frozen_casts(model: nn.Module | None, precision: str, device: torch.device) -> None:
    """On the CPU under ``precision`` bf16: every ``nn.Linear`` of ``model`` keeps the bf16 cast
    of its weight while the weight is frozen (module docstring). In place and idempotent; other
    precisions and devices are left alone."""
    if model is None or precision != "bf16" or device.type != "cpu":
        return
    for module in model.modules():
        if type(module) is nn.Linear and not getattr(module, _CACHED, False):
            module.forward = MethodType(_cached_cast_forward, module)  # type: ignore[method-assign]
            setattr(module, _CACHED, True)
