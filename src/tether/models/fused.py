"""Fused elementwise ops for Llama models in training: the same maths in fewer passes.

At the demo model's width (96) a training step spends a quarter of its time outside the
matmuls and attention, much of it in two pieces of Hugging Face's Llama that run as chains of
small ops, each a pass over the activations and each with its own backward:

- **RoPE** (``apply_rotary_pos_emb``): q·cos + rotate_half(q)·sin, with rotate_half(x) =
  [−x₂, x₁] for the halves x = [x₁, x₂]; a neg, a cat and three arithmetic passes for q and
  again for k, and as many in the backward. :func:`rotate` computes the same rotation as one
  multiply and two in-place multiply-adds on the halves,

      out₁ = x₁·cos₁ − x₂·sin₁,      out₂ = x₂·cos₂ + x₁·sin₂,

  and its backward is the transposed rotation (no saved activations, only cos and sin):

      ∂x₁ = g₁·cos₁ + g₂·sin₂,       ∂x₂ = g₂·cos₂ − g₁·sin₁.

- **RMSNorm**: w · (x / √(mean(x²) + ε)), Hugging Face's in fp32 then cast back to the input's
  dtype before the weight; :func:`rms_norm` takes torch's fused ``F.rms_norm`` kernel for the
  normalisation (one pass instead of pow, mean, add, rsqrt and multiply) in the same order of
  dtypes.

:func:`use_fused_ops` switches a model's Llama layers to them, in place and per instance: its
RMSNorm modules get :func:`rms_norm` as their forward, and its attention modules run RoPE
through :func:`rotate`. Hugging Face's attention calls the module-level
``modeling_llama.apply_rotary_pos_emb``, so that name is replaced once by
:func:`apply_rotary_pos_emb`, which is Hugging Face's own function except inside the forward of
an attention module switched here: other models in the process (TRL's, in ``tether bench
trl``) run exactly as before. Measured on two CPU cores (docs/performance.md): the demo
model's MLE step 0.56 → 0.52 s, its DPO step 0.25 → 0.24 s. Other architectures are left as
they are. ``train.fused_ops: false`` turns it off; ``train.compile`` fuses these itself and
takes the model as Hugging Face wrote it.
"""

from __future__ import annotations

import contextvars
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama import modeling_llama

# True inside the forward of an attention module that use_fused_ops switched
_FUSED_ROPE = contextvars.ContextVar("tether_fused_rope", default=False)
_HF_ROPE = modeling_llama.apply_rotary_pos_emb


class _Rotation(torch.autograd.Function):
    """x·cos + rotate_half(x)·sin in three passes; the backward rotates the other way."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        grad_x = grad * cos
        grad_x[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        grad_x[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return grad_x.to(ctx.x_dtype), None, None


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE's x·cos + rotate_half(x)·sin (cos and sin broadcast against x; no gradient to
    them), the halves of x's last dimension rotated as Hugging Face's ``rotate_half`` does."""
    return _Rotation.apply(x, cos, sin)


def apply_rotary_pos_emb(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
) -> tuple[Tensor, Tensor]:
    """``modeling_llama.apply_rotary_pos_emb``, through :func:`rotate` inside a switched
    attention module's forward (and where cos and sin need no gradient), Hugging Face's
    function everywhere else."""
    if not _FUSED_ROPE.get() or cos.requires_grad or sin.requires_grad:
        return _HF_ROPE(q, k, cos, sin, unsqueeze_dim)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return rotate(q, cos, sin), rotate(k, cos, sin)


def rms_norm(self: Any, hidden_states: Tensor) -> Tensor:
    """``LlamaRMSNorm.forward`` with torch's fused normalisation: in fp32, cast back to the
    input's dtype, then times the weight (Hugging Face's order, so the same dtypes)."""
    normalised = F.rms_norm(
        hidden_states.float(), (hidden_states.shape[-1],), None, self.variance_epsilon
    )
    return self.weight * normalised.to(hidden_states.dtype)


def _attention_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The class's own forward, with RoPE through :func:`rotate` while it runs (under
    activation checkpointing the recomputation comes through here too, so both passes save
    the same tensors)."""
    token = _FUSED_ROPE.set(True)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _FUSED_ROPE.reset(token)


def use_fused_ops(model: nn.Module) -> int:
    """Switch ``model``'s Llama RMSNorm and attention modules to the fused ops (module
    docstring), in place; the number of modules switched (0: no Llama layers, nothing
    changed). Parameters, state dict and saved checkpoints are untouched."""
    switched = 0
    for module in model.modules():
        if isinstance(module, modeling_llama.LlamaRMSNorm):
            forward: Any = rms_norm
        elif isinstance(module, modeling_llama.LlamaAttention):
            forward = _attention_forward
        else:
            continue
        module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
        switched += 1
    if switched:
        modeling_llama.apply_rotary_pos_emb = apply_rotary_pos_emb  # type: ignore[assignment]
    return switched
