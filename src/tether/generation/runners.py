"""Decode runners: a causal LM and its KV cache, stepped one token at a time by the decode loop of
:func:`tether.generation.sampler.sample`.

A runner does three things (:class:`DecodeRunner`): ``prefill`` the left-padded prompts in one
forward pass, ``step`` the batch one token further, and ``compact`` its cache when the loop
drops finished rows. :func:`make_runner` picks one.

Why fast runners
----------------
The models this project trains are tiny (a few layers, width ~128, a character vocabulary).
``transformers``' ``generate`` spends much of each step on Python and memory traffic that
such a model does not need: it rebuilds 4-D masks, grows its ``DynamicCache`` by
``torch.cat`` (copying the whole cache every step), runs logits processors and stopping
criteria, and keeps computing rows that have already finished. For
:class:`~transformers.GPT2LMHeadModel` and :class:`~transformers.LlamaForCausalLM` we
therefore run a compact decode step of our own (:class:`GPT2Runner`, :class:`LlamaRunner`)
directly on the HF model's parameter tensors:

* one preallocated KV cache ``[layers, 2, batch, kv_heads, max_len, head_dim]``; a step
  writes one slot per layer and attends to a slice of it with
  ``scaled_dot_product_attention`` (no concatenation, no reallocation);
* the padding mask is built once per call (an additive ``[batch, 1, 1, max_len]`` row) and
  sliced per step; with no padding at all there is no mask;
* positions count from each row's first real token (``cumsum(mask) - 1``), exactly as
  ``generate`` does for left-padded batches, for GPT-2's learned positions and Llama's RoPE;
* few, fused ops: ``addmm`` for bias and residual; one matmul for q/k/v; Llama's
  ``silu(gate) * up`` as post-ops of its two GEMMs where oneDNN packs them (:class:`GateUp`),
  else one matmul for both; k and v written to the cache in one copy; at decode, the query
  heads sharing a kv head attend as that head's rows (grouped-query attention without
  repeating the cache); Llama's RMSNorm weights folded
  into the matmul after them (the norm itself is then three ops); RoPE as one complex
  multiply (q/k weight rows are permuted into (x, y) pairs once per call, which leaves q.k
  unchanged); GPT-2's tanh-GELU through ``sigmoid`` (the same function, vectorised);
* a padded prefill (the Llama runner) multiplies only the real prompt positions: the GEMMs
  take the real tokens packed together and attention reads them spread back to the padded
  layout (pads at 0, hidden by the masks), so left-padding costs no matmul work (SmolLM2's
  word problems, 44-65 tokens padded to 65 at batch 64: 1.10-1.23 vs 1.46-1.60 s in bf16);
* at decode on the CPU, attention is two batched matmuls and a softmax
  (:func:`_decode_attention`), faster there than torch's flash kernel for one query row;
* rows that finish (EOS or a stop string) are dropped from the batch at once: surviving
  rows from the end of the batch move into their cache slots (swap-remove, in place), so
  finished rows cost nothing afterwards and retiring one costs about one row's cache copy.

Where the time goes: at batch 1 a step is pure op dispatch, and the fast runner issues a
fraction of ``generate``'s. At batch 64 with a few hundred tokens of context the step is
dominated by arithmetic both sides must do (fp32 attention reading the whole KV cache, and
the GEMMs), so the speed-up there comes mostly from not copying the cache, and from dropping
finished rows when completions have different lengths.

Any other architecture (or ``fast=False``) goes through :class:`GenericRunner`: the model's
own ``forward`` with ``past_key_values``, ``attention_mask`` and ``position_ids``, the cache
compacted with ``Cache.reorder_cache``.

bf16 (``dtype=torch.bfloat16`` on an fp32 model, ``train.precision: bf16``): the Llama runner
casts its (already copied and folded) weight matrices to bf16 once per call and runs every
matmul in bf16, with the residual stream, the RMSNorm statistics and RoPE in fp32, as the
model's forward does under bf16 autocast; the KV cache and the attention are fp32 on the CPU
(the k and v the bf16 projections give, rotated in fp32 and kept unrounded; torch's bf16
attention kernels are no faster there at these shapes, and its bf16 batched matmuls slower;
the cache takes twice the memory: SmolLM2 at batch 64 and 300 positions, 885 MB)
and bf16 elsewhere; the logits come out in bf16 and the sampler takes its softmax in fp32. The
other runners run the model's own forward under ``torch.autocast``.
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from tether.generation import weights
from tether.generation.weights import FOLD_CHUNK, GateUp, Linear, Preparation, kv_buffer


class DecodeRunner(Protocol):
    """What the decode loop needs of a model: last-position logits [n, V] after the prompts and
    after each fed token, and a cache that follows the batch when finished rows leave it."""

    def prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Run the left-padded prompts [B, P]; the logits of their last position."""
        ...

    def step(self, nxt: torch.Tensor) -> torch.Tensor:
        """Feed one token per active row [n]; the logits that follow it."""
        ...

    def compact(self, order: list[int], moves: list[tuple[int, int]]) -> None:
        """Keep the active rows ``order`` (old position of each new row); ``moves`` are the
        (old, new) positions of the rows that move (see ``sampler._retire``)."""
        ...


def make_runner(
    model: Any,
    fast: bool,
    prompt_mask: torch.Tensor,
    lens: list[int],
    max_new: int,
    dtype: torch.dtype | None = None,
) -> DecodeRunner:
    """The fast runner for a plain GPT-2 or Llama model it supports (unless ``fast`` is False),
    else the generic runner: prefilled and stepped by :func:`tether.generation.sampler.sample`.
    ``dtype``: the arithmetic's (None: the weights'; module docstring)."""
    weight_dtype = next(model.parameters()).dtype
    mixed = dtype is not None and dtype != weight_dtype
    if fast and not mixed and type(model) is GPT2LMHeadModel and GPT2Runner.supports(model):
        return GPT2Runner(model, prompt_mask, lens, max_new)
    if fast and type(model) is LlamaForCausalLM and LlamaRunner.supports(model):
        return LlamaRunner(model, prompt_mask, lens, max_new, dtype)
    return GenericRunner(model, prompt_mask, lens, max_new, dtype if mixed else None)


# ----------------------------------------------------------------------------- generic path


class GenericRunner:
    """Any HF causal LM through its own ``forward`` and cache; with ``autocast`` (a dtype)
    under ``torch.autocast``."""

    def __init__(
        self,
        model: Any,
        prompt_mask: torch.Tensor,
        lens: list[int],
        max_new: int,
        autocast: torch.dtype | None = None,
    ):
        self.model = model
        self.autocast = autocast
        B, P = prompt_mask.shape
        device = prompt_mask.device
        # the 2-D attention mask for the whole run; step t uses its first P + t + 1 columns
        self.mask = torch.ones(B, P + max_new, dtype=torch.long, device=device)
        self.mask[:, :P] = prompt_mask
        self.pos = torch.tensor(lens, device=device)  # position of the next token fed
        self.prompt_mask = prompt_mask
        self.cur = P
        self.past: Any = None

    def prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        positions = (self.prompt_mask.cumsum(-1) - 1).clamp_(min=0)
        # only the last position's logits are needed, where the model lets us say so
        extra = {"logits_to_keep": 1} if "logits_to_keep" in self._forward_params() else {}
        out = self._call(
            input_ids=prompt_ids,
            attention_mask=self.prompt_mask,
            position_ids=positions,
            use_cache=True,
            **extra,
        )
        self.past = out.past_key_values
        return out.logits[:, -1]

    def _call(self, **kwargs: Any) -> Any:
        if self.autocast is None:
            return self.model(**kwargs)
        with torch.autocast(self.prompt_mask.device.type, dtype=self.autocast):
            return self.model(**kwargs)

    def _forward_params(self) -> set[str]:
        try:
            return set(inspect.signature(self.model.forward).parameters)
        except (TypeError, ValueError):
            return set()

    def step(self, nxt: torch.Tensor) -> torch.Tensor:
        n = nxt.shape[0]
        out = self._call(
            input_ids=nxt[:, None],
            attention_mask=self.mask[:n, : self.cur + 1],
            position_ids=self.pos[:, None],
            past_key_values=self.past,
            use_cache=True,
        )
        self.past = out.past_key_values
        self.cur += 1
        self.pos += 1
        return out.logits[:, -1]

    def compact(self, order: list[int], moves: list[tuple[int, int]]) -> None:
        keep = torch.tensor(order, device=self.pos.device)
        if hasattr(self.past, "reorder_cache"):
            self.past.reorder_cache(keep)
        else:  # legacy tuple-of-tuples cache
            self.past = tuple(tuple(x.index_select(0, keep) for x in layer) for layer in self.past)
        self.mask[: len(order)] = self.mask.index_select(0, keep)
        self.pos = self.pos.index_select(0, keep)


# ----------------------------------------------------------------------------- fast path

_NEG_INF = float("-inf")


class FastRunner:
    """The cache, masks, positions and compaction shared by the GPT-2 and Llama runners.

    Subclasses set ``n_layers, n_heads, n_kv_heads, head_dim`` and call :meth:`_setup`, then
    implement ``_forward(ids [n, S], positions [n, S]) -> last-position logits [n, V]``,
    which calls :meth:`_attend` once per layer.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    def _setup(
        self, prompt_mask: torch.Tensor, lens: list[int], max_new: int, dtype: torch.dtype
    ) -> None:
        B, P = prompt_mask.shape
        device = prompt_mask.device
        self.prompt_mask = prompt_mask
        # the last generated token is never fed back, so P + max_new - 1 slots suffice
        L = P + max_new - 1
        self.cache = kv_buffer(
            (self.n_layers, 2, B, self.n_kv_heads, L, self.head_dim), dtype, device
        )
        self.padded = not bool(prompt_mask.bool().all())
        self.prefill_mask: torch.Tensor | None = None
        self.step_mask: torch.Tensor | None = None
        if self.padded:
            real = prompt_mask.bool()
            # Prefill: causal, pad keys hidden. A pad query sees only itself, which keeps its
            # softmax finite; nothing real ever attends to a pad, so its output is unused.
            causal = torch.ones(P, P, dtype=torch.bool, device=device).tril_()
            eye = torch.eye(P, dtype=torch.bool, device=device)
            self.prefill_mask = (causal & (real[:, None, :] | eye))[:, None]
            # Decode: an additive row per sequence, -inf at its prompt pads, built once and
            # sliced per step (compaction reorders its rows along with the cache).
            self.step_mask = torch.zeros(B, 1, 1, L, dtype=dtype, device=device)
            self.step_mask[:, 0, 0, :P].masked_fill_(~real, _NEG_INF)
        self.sdpa_kw = {"enable_gqa": True} if self.n_kv_heads != self.n_heads else {}
        self.pos = torch.tensor(lens, device=device)  # position of the next token fed
        self.cur = 0  # cache slots filled (the same for every row: prompts are left-padded)
        self.mask_now: torch.Tensor | None = None  # this forward's attention mask
        self._bind(B)

    def _bind(self, n: int) -> None:
        # per-layer views of the active rows, rebuilt only when the batch shrinks
        self.n = n
        self.kv = [self.cache[i, :, :n] for i in range(self.n_layers)]  # [2, n, kv_heads, L, D]
        self.k = [kv[0] for kv in self.kv]
        self.v = [kv[1] for kv in self.kv]
        self.m = self.step_mask[:n] if self.step_mask is not None else None

    def compact(self, order: list[int], moves: list[tuple[int, int]]) -> None:
        if moves:
            # In place, and only the filled slots of the rows that move (one per finished
            # row at most): far less than one decode step's reads of the cache.
            device = self.pos.device
            src = torch.tensor([m[0] for m in moves], device=device)
            dst = torch.tensor([m[1] for m in moves], device=device)
            cur = self.cur
            self.cache[:, :, dst, :, :cur] = self.cache[:, :, src, :, :cur]
            if self.step_mask is not None:
                self.step_mask[dst] = self.step_mask[src]
        self.pos = self.pos.index_select(0, torch.tensor(order, device=self.pos.device))
        self._bind(len(order))

    def prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        positions = (self.prompt_mask.cumsum(-1) - 1).clamp_(min=0)
        self.mask_now = self.prefill_mask
        logits = self._forward(prompt_ids, positions)
        self.cur = prompt_ids.shape[1]
        return logits

    def step(self, nxt: torch.Tensor) -> torch.Tensor:
        # one mask slice per step, shared by every layer
        self.mask_now = self.m[..., : self.cur + 1] if self.m is not None else None
        logits = self._forward(nxt[:, None], self.pos[:, None])
        self.cur += 1
        self.pos += 1
        return logits

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _attend(self, layer: int, q: torch.Tensor, kv: torch.Tensor, scale: float) -> torch.Tensor:
        """Store the new keys and values ``kv`` [n, S, 2, kv_heads, D] in the cache (one copy)
        and attend ``q`` [n, heads, S, D] to everything cached so far -> [n, heads, S, D]."""
        S = q.shape[2]
        start = self.cur
        end = start + S
        self.kv[layer][:, :, :, start:end] = kv.permute(2, 0, 3, 1, 4)
        mask = self.mask_now
        if S == 1:
            return _decode_attention(
                q, self.k[layer][:, :, :end], self.v[layer][:, :, :end], mask, scale
            )
        return F.scaled_dot_product_attention(
            q,
            self.k[layer][:, :, :end],
            self.v[layer][:, :, :end],
            attn_mask=mask,
            is_causal=S > 1 and mask is None,  # unpadded prefill
            scale=scale,
            **self.sdpa_kw,
        )


def _decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One new position's attention, ``softmax(q k^T * scale + mask) v`` for ``q``
    [n, heads, 1, D] against the cached ``k``, ``v`` [n, kv_heads, T, D] -> [n, heads, 1, D].

    The query heads that share a kv head (HF's heads h*g .. h*g + g - 1 read kv head h) are
    that head's g query rows: grouped-query attention without repeating the cache, n * kv_heads
    tasks of g rows instead of n * heads tasks of one (with SDPA in bf16 at SmolLM2's 9/3 heads
    and batch 64: 0.42 vs 0.86 ms a layer for 97 cached positions).

    On the CPU as two batched matmuls and a softmax, where torch's flash kernel is slower at
    these shapes (SmolLM2's heads in fp32 on the development machine, the cache read from
    memory as in a decode step: 196 vs 243 us a layer at 16 rows and 97 cached positions, 393
    vs 719 us at 64 rows and 60, 1.60 vs 1.93 ms at 64 and 300; the demo model at 32 rows and
    300 positions, hot in cache: 109 vs 155 us; docs/performance.md); elsewhere SDPA."""
    n, H, _, D = q.shape
    grouped = q.reshape(n, k.shape[1], H // k.shape[1], D)
    if q.device.type != "cpu":
        out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale)
        return out.view(n, H, 1, D)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).mul_(scale)
    if mask is not None:  # [n, 1, 1, T] additive
        scores.add_(mask)
    return torch.matmul(torch.softmax(scores, -1), v).view(n, H, 1, D)


_GELU_C = 2.0 * math.sqrt(2.0 / math.pi)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``gelu_new``, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3),
    written as x * sigmoid(2u): the same function, but sigmoid is vectorised on CPU where
    tanh is not, which makes this about twice as fast as ``F.gelu(approximate="tanh")``."""
    t = (x * x).mul_(_GELU_C * 0.044715).add_(_GELU_C).mul_(x)
    return t.sigmoid_().mul_(x)


_ACTIVATIONS = {
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class GPT2Runner(FastRunner):
    """GPT-2: learned positions, pre-LayerNorm blocks, Conv1D weights ([in, out], so x @ W)."""

    @staticmethod
    def supports(model: Any) -> bool:
        cfg = model.config
        return cfg.activation_function in _ACTIVATIONS and not getattr(
            cfg, "add_cross_attention", False
        )

    def __init__(self, model: Any, prompt_mask: torch.Tensor, lens: list[int], max_new: int):
        cfg = model.config
        tr = model.transformer
        if max(lens) + max_new - 1 > cfg.n_positions:
            raise ValueError(
                f"prompt of {max(lens)} tokens + {max_new} new tokens exceeds GPT-2's "
                f"{cfg.n_positions} positions"
            )
        self.n_layers, self.n_heads = cfg.n_layer, cfg.n_head
        self.n_kv_heads, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.width, self.eps = cfg.n_embd, cfg.layer_norm_epsilon
        self.act = _ACTIVATIONS[cfg.activation_function]
        self.wte, self.wpe = tr.wte.weight, tr.wpe.weight
        self.blocks = []
        for i, blk in enumerate(tr.h):
            scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
            if cfg.scale_attn_by_inverse_layer_idx:
                scale /= float(i + 1)
            self.blocks.append(
                (
                    blk.ln_1.weight, blk.ln_1.bias,
                    blk.attn.c_attn.weight, blk.attn.c_attn.bias,
                    blk.attn.c_proj.weight, blk.attn.c_proj.bias,
                    blk.ln_2.weight, blk.ln_2.bias,
                    blk.mlp.c_fc.weight, blk.mlp.c_fc.bias,
                    blk.mlp.c_proj.weight, blk.mlp.c_proj.bias,
                    scale,
                )
            )  # fmt: skip
        self.ln_f = (tr.ln_f.weight, tr.ln_f.bias)
        self.head = (model.lm_head.weight, model.lm_head.bias)
        self._setup(prompt_mask, lens, max_new, self.wte.dtype)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n, S = ids.shape
        C, H, D, eps = self.width, self.n_heads, self.head_dim, self.eps
        x = (F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)).view(n * S, C)
        for layer, (w1, b1, wqkv, bqkv, wo, bo, w2, b2, wfc, bfc, wpr, bpr, scale) in enumerate(
            self.blocks
        ):
            h = F.layer_norm(x, (C,), w1, b1, eps)
            qkv = torch.addmm(bqkv, h, wqkv).view(n, S, 3, H, D)
            a = self._attend(layer, qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1:], scale)
            a = a.transpose(1, 2).reshape(n * S, C)
            x = torch.addmm(bo, a, wo).add_(x)
            h = F.layer_norm(x, (C,), w2, b2, eps)
            x = torch.addmm(bpr, self.act(torch.addmm(bfc, h, wfc)), wpr).add_(x)  # type: ignore[operator]
        last = x.view(n, S, C)[:, -1]
        return F.linear(F.layer_norm(last, (C,), *self.ln_f, eps), *self.head)


def _interleave_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection (weight [heads*D, in] or bias [heads*D]) reordered within each
    head from HF's half-split layout ``[x_0..x_{D/2-1}, y_0..y_{D/2-1}]`` to pairs
    ``[x_0, y_0, x_1, y_1, ...]``, so RoPE becomes one complex multiply.

    HF's ``x * cos + rotate_half(x) * sin`` maps each pair ``(x_i, y_i)`` to
    ``(x_i cos - y_i sin, y_i cos + x_i sin)``: the complex product ``(x_i + i y_i) e^{i θ_i}``.
    q and k get the same permutation, so their dot products (all attention needs) are
    unchanged; v and the output projection are untouched.
    """
    w = w.reshape(heads, 2, -1, *w.shape[1:])  # [heads, half, D/2, ...]
    return w.transpose(1, 2).reshape(-1, *w.shape[3:])


class LlamaRunner(FastRunner):
    """Llama: RoPE, RMSNorm, SwiGLU MLP, optional GQA and biases."""

    @staticmethod
    def supports(model: Any) -> bool:
        cfg = model.config
        # rope types that only change inv_freq (and attention_scaling) statically; the
        # dynamic ones rescale with the sequence length, so they take the generic path
        rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
        gqa_ok = cfg.num_key_value_heads == cfg.num_attention_heads or _SDPA_HAS_GQA
        return (
            cfg.hidden_act in ("silu", "swish")
            and rope in _STATIC_ROPE
            and gqa_ok
            and hasattr(model.model.rotary_emb, "inv_freq")
        )

    def __init__(
        self,
        model: Any,
        prompt_mask: torch.Tensor,
        lens: list[int],
        max_new: int,
        dtype: torch.dtype | None = None,
    ):
        cfg = model.config
        base = model.model
        self.n_layers, self.n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.width, self.inter = cfg.hidden_size, cfg.intermediate_size
        self.scale = self.head_dim**-0.5
        self.embed = base.embed_tokens.weight
        device, weight_dtype = self.embed.device, self.embed.dtype
        # the matmuls' dtype; the residual stream stays in the weights' (fp32 master weights
        # with bf16 arithmetic: fp32, as under autocast)
        dtype = dtype or weight_dtype
        H, Hkv, D, C = self.n_heads, self.n_kv_heads, self.head_dim, self.width

        # RMSNorm(x) * g feeds a matmul W, and
        #   W (g * x / sqrt(mean(x^2) + eps)) == (W * g * sqrt(C)) x / hypot(|x|, sqrt(C eps)),
        # so g * sqrt(C) is folded into W's input columns and a norm is three ops:
        # vector_norm, hypot, div (instead of HF's pow, mean, add, rsqrt, mul, mul).
        self.norm_eps = torch.tensor((C * cfg.rms_norm_eps) ** 0.5, device=device)
        root_c = C**0.5

        def cast(b: torch.Tensor | None) -> torch.Tensor | None:
            return None if b is None else b.to(dtype)

        rows = prompt_mask.shape[0]

        def fold(parts: list[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
            # The weights ``parts`` ([out_i, in] each) stacked and times g, kept [out, in] for
            # F.linear (x W^T): at decode shapes (a few rows against a wide weight) the CPU
            # GEMM runs it faster than x @ W on an [in, out] copy. Each block of rows is
            # multiplied in fp32 straight into its rows of the result (no stacked copy).
            scale = g.float() * root_c
            size = sum(w.shape[0] for w in parts)
            out = torch.empty(size, parts[0].shape[1], dtype=dtype, device=scale.device)
            step = max(1, FOLD_CHUNK // out.shape[1])
            row = 0
            for w in parts:
                for i in range(0, w.shape[0], step):
                    block = w[i : i + step]
                    torch.mul(block, scale, out=out[row : row + block.shape[0]])
                    row += block.shape[0]
            return out

        def linear(w: torch.Tensor) -> Linear:
            out = Linear(w.to(dtype), rows)
            if out.weight is w:  # neither cast nor packed: a kept value must not hold its
                out.weight = w.clone()  # source alive (weights.prune); small weights only
            return out

        # Prepared once per source tensors: a call on the same unchanged weights reuses the
        # previous call's (tether.generation.weights)
        prep = Preparation(device)
        setting = (dtype, rows, weights.PACK_WEIGHTS, weights.PACK_MIN_NUMEL)
        self.blocks = []
        for i, layer in enumerate(base.layers[: cfg.num_hidden_layers]):
            at, mlp = layer.self_attn, layer.mlp

            def qkv(at: Any = at, layer: Any = layer) -> tuple[Linear, torch.Tensor | None]:
                # one projection [q | k | v], q and k rows in RoPE pair order
                wq = _interleave_rows(at.q_proj.weight, H)
                wk = _interleave_rows(at.k_proj.weight, Hkv)
                w = Linear(fold([wq, wk, at.v_proj.weight], layer.input_layernorm.weight), rows)
                if at.q_proj.bias is None:
                    return w, None
                bq = _interleave_rows(at.q_proj.bias, H)
                bk = _interleave_rows(at.k_proj.bias, Hkv)
                return w, cast(torch.cat([bq, bk, at.v_proj.bias]))

            def gate_up(mlp: Any = mlp, layer: Any = layer) -> GateUp:
                bgu = None
                if mlp.gate_proj.bias is not None:
                    bgu = cast(torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]))
                w = fold(
                    [mlp.gate_proj.weight, mlp.up_proj.weight],
                    layer.post_attention_layernorm.weight,
                )
                return GateUp(w, bgu, rows)

            wqkv, bqkv = prep(
                ("qkv", i, *setting),
                [at.q_proj.weight, at.k_proj.weight, at.v_proj.weight, layer.input_layernorm.weight,
                 at.q_proj.bias, at.k_proj.bias, at.v_proj.bias],
                qkv,
            )  # fmt: skip
            wgu = prep(
                ("gate_up", i, *setting),
                [mlp.gate_proj.weight, mlp.up_proj.weight, layer.post_attention_layernorm.weight,
                 mlp.gate_proj.bias, mlp.up_proj.bias],
                gate_up,
            )  # fmt: skip
            wo = prep(("o", i, *setting), [at.o_proj.weight], partial(linear, at.o_proj.weight))
            wdown = prep(
                ("down", i, *setting), [mlp.down_proj.weight], partial(linear, mlp.down_proj.weight)
            )
            self.blocks.append(
                (wqkv, bqkv, wo, cast(at.o_proj.bias), wgu, wdown, cast(mlp.down_proj.bias))
            )
        head = prep(
            ("head", *setting),
            [model.lm_head.weight, base.norm.weight],
            lambda: Linear(fold([model.lm_head.weight], base.norm.weight), rows),
        )
        self.head = (head, cast(model.lm_head.bias))
        prep.keep()

        # RoPE as complex factors e^{i * position * inv_freq}, computed as HF computes cos/sin
        # (fp32 angles, times attention_scaling, 1 for the default RoPE), for every position
        # this call can reach. The v heads get the factor 1, so q, k and v go through one
        # multiply and come out side by side ([q | k | v]), k and v ready for one cache write.
        rotary = base.rotary_emb
        n_pos = max(lens) + max_new
        inv_freq = rotary.inv_freq.to(device=device, dtype=torch.float32)
        angles = torch.arange(n_pos, device=device, dtype=torch.float32)[:, None] * inv_freq
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        turn = torch.complex(angles.cos() * scaling, angles.sin() * scaling)  # [n_pos, D/2]
        self.rope = torch.ones(n_pos, H + 2 * Hkv, D // 2, dtype=turn.dtype, device=device)
        self.rope[:, : H + Hkv] = turn[:, None]
        self.fp32 = dtype == torch.float32
        self.dtype = dtype
        # the KV cache and the attention: fp32 on the CPU, where fp32 attention is faster
        # than bf16's at these shapes (docs/performance.md); else the matmuls' dtype
        self.attention_dtype = torch.float32 if device.type == "cpu" else dtype
        self._setup(prompt_mask, lens, max_new, self.attention_dtype)
        # the real prompt positions among the B * P of the prefill (None: no padding), and
        # each row's last among those (module docstring)
        self.real_positions: torch.Tensor | None = None
        self.last_positions: torch.Tensor | None = None
        if self.padded:
            self.real_positions = prompt_mask.reshape(-1).nonzero().squeeze(1)
            self.last_positions = prompt_mask.sum(1).cumsum(0) - 1

    def _rms(self, x: torch.Tensor) -> torch.Tensor:
        """x / hypot(|x|, sqrt(C eps)): RMSNorm up to the factor folded into the next matmul,
        in the matmuls' dtype. Statistics in fp32, as HF computes them."""
        if self.fp32:
            return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), self.norm_eps)
        x32 = x.float()
        norm = torch.hypot(torch.linalg.vector_norm(x32, dim=-1, keepdim=True), self.norm_eps)
        return (x32 / norm).to(self.dtype)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n, S = ids.shape
        C, H, Hkv, D = self.width, self.n_heads, self.n_kv_heads, self.head_dim
        heads = H + 2 * Hkv
        rms, fp32, scale = self._rms, self.fp32, self.scale
        # A padded prefill multiplies only the real positions (``real``: their indices among
        # the n * S): the pads' rows of q, k and v stay 0 in ``spread`` (the layout attention
        # reads), where the masks hide them, and no GEMM spends time on them.
        real = self.real_positions if S > 1 else None
        ids, positions = ids.reshape(n * S), positions.reshape(n * S)
        if real is not None:
            ids, positions = ids[real], positions[real]
            spread = torch.zeros(n * S, heads, D, dtype=self.attention_dtype, device=ids.device)
        rows = ids.shape[0]
        x = F.embedding(ids, self.embed)  # [rows, C], the residual stream's dtype
        rope = self.rope[positions]  # [rows, heads, D/2]
        for layer, (wqkv, bqkv, wo, bo, gate_up, wdown, bdown) in enumerate(self.blocks):
            proj = wqkv(rms(x), bqkv)
            if not fp32:  # complex32 is barely supported: rotate in fp32
                proj = proj.float()
            # RoPE: (x_i + i y_i) * e^{i theta_i} on q and k pairs, times 1 on v
            qkv = torch.view_as_complex(proj.view(rows, heads, D // 2, 2)) * rope
            qkv = torch.view_as_real(qkv).view(rows, heads, D).to(self.attention_dtype)
            if real is not None:
                qkv = spread.index_copy_(0, real, qkv)
            qkv = qkv.view(n, S, heads, D)
            kv = qkv[:, :, H:].view(n, S, 2, Hkv, D)
            a = self._attend(layer, qkv[:, :, :H].transpose(1, 2), kv, scale)
            a = a.transpose(1, 2).reshape(n * S, H * D)
            if real is not None:
                a = a.index_select(0, real)
            x = x.add_(wo(a.to(self.dtype), bo))  # the residual stream keeps its dtype
            x = x.add_(wdown(gate_up(rms(x)), bdown))
        # each row's last position (real in left-padded rows)
        last = x.view(n, S, C)[:, -1] if real is None else x[self.last_positions]
        head, bias = self.head
        return head(rms(last), bias)


_STATIC_ROPE = ("default", "linear", "llama3")
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
