"""Batched autoregressive sampling with a KV cache, for evaluation and every RL method.

``sample(model, tokenizer, prompts, max_new_tokens=..., temperature=...)`` left-pads the
prompts, prefills them in one forward pass, then decodes one token per step for the whole
batch, greedy (temperature 0) or by multinomial draws from ``softmax(logits / T)``.

Design
------
The models this project trains are tiny (a few layers, width ~128, a character vocabulary).
``transformers``' ``generate`` spends much of each step on Python and memory traffic that
such a model does not need: it rebuilds 4-D masks, grows its ``DynamicCache`` by
``torch.cat`` (copying the whole cache every step), runs logits processors and stopping
criteria, and keeps computing rows that have already finished. For
:class:`~transformers.GPT2LMHeadModel` and :class:`~transformers.LlamaForCausalLM` we
therefore run a compact decode loop of our own (a "fast runner") directly on the HF model's
parameter tensors:

* one preallocated KV cache ``[layers, 2, batch, kv_heads, max_len, head_dim]``; a step
  writes one slot per layer and attends to a slice of it with
  ``scaled_dot_product_attention`` (no concatenation, no reallocation);
* the padding mask is built once per call (an additive ``[batch, 1, 1, max_len]`` row) and
  sliced per step; with no padding at all there is no mask;
* positions count from each row's first real token (``cumsum(mask) - 1``), exactly as
  ``generate`` does for left-padded batches, for GPT-2's learned positions and Llama's RoPE;
* few, fused ops: ``addmm`` for bias and residual; one matmul for q/k/v and one for
  Llama's gate/up; k and v written to the cache in one copy; Llama's RMSNorm weights folded
  into the matmul after them (the norm itself is then three ops); RoPE as one complex
  multiply (q/k weight rows are permuted into (x, y) pairs once per call, which leaves q.k
  unchanged); GPT-2's tanh-GELU through ``sigmoid`` (the same function, vectorised);
* rows that finish (EOS or a stop string) are dropped from the batch at once: surviving
  rows from the end of the batch move into their cache slots (swap-remove, in place), so
  finished rows cost nothing afterwards and retiring one costs about one row's cache copy.

Where the time goes: at batch 1 a step is pure op dispatch, and the fast runner issues a
fraction of ``generate``'s. At batch 64 with a few hundred tokens of context the step is
dominated by arithmetic both sides must do (fp32 attention reading the whole KV cache, and
the GEMMs), so the speed-up there comes mostly from not copying the cache, and from dropping
finished rows when completions have different lengths.

Any other architecture (or ``fast=False``) goes through the generic path: the model's own
``forward`` with ``past_key_values``, ``attention_mask`` and ``position_ids``, the cache
compacted with ``Cache.reorder_cache``. Both paths share the decode loop, so the sampling,
stopping and bookkeeping logic is written once; tests check the two agree token for token
with each other and with ``model.generate``.

Logprobs are fp32 ``log_softmax(logits / T)`` (T = 1 for greedy) at the chosen token: the
log-probability under the distribution the token was drawn from.

Stop strings are checked cheaply: a per-token table says which tokens can complete a stop
string (their text contains a stop string's last character), and only rows that just
produced such a token decode their last few tokens to look for it.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from tether.models.lora import plain_model

__all__ = ["SampleOutput", "sample"]


@dataclass
class SampleOutput:
    """What :func:`sample` returns; all tensors on the model's device, rows in prompt order."""

    prompt_ids: torch.Tensor  # [B, P] LEFT-padded prompt token ids (pad = tokenizer.pad_token_id)
    prompt_mask: torch.Tensor  # [B, P] 1 for real prompt tokens
    # [B, T] RIGHT-padded generated ids; includes the EOS token if one was generated; stops
    # after a stop string's last token
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor  # [B, T] 1 for generated tokens (EOS included), 0 for padding
    # [B, T] fp32 log-prob of each generated token under the distribution it was sampled from
    # (logits / temperature; for greedy, temperature 1), 0 at padding
    logprobs: torch.Tensor
    # decoded completions, special tokens skipped, cut at (and including) the stop string
    texts: list[str]
    finished: list[bool]  # True if ended by EOS or a stop string; False if cut by max_new_tokens

    def token_rows(self) -> tuple[list[list[int]], list[list[int]]]:
        """The real prompt ids and the real completion ids of each row, padding removed (what
        :func:`tether.batches.collate_token_rows` takes to score the samples as training rows)."""
        prompts = [
            row[m.bool()].tolist() for row, m in zip(self.prompt_ids, self.prompt_mask, strict=True)
        ]
        completions = [
            row[m.bool()].tolist()
            for row, m in zip(self.completion_ids, self.completion_mask, strict=True)
        ]
        return prompts, completions


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    stop: list[str] | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    fast: bool = True,
    ignore_eos: bool = False,
    allowed_token_ids: Sequence[int] | None = None,
) -> SampleOutput:
    """Complete each prompt with up to ``max_new_tokens`` tokens.

    ``temperature`` 0 is greedy (argmax); above 0, tokens are drawn from
    ``softmax(logits / temperature)`` with ``generator`` (seed it for reproducible samples;
    it must live on the model's device). A row ends at ``tokenizer.eos_token_id`` (kept in
    the completion) or as soon as its text contains one of ``stop``. ``batch_size`` splits
    the prompts into chunks run one after the other (None: all at once).

    ``fast=False`` forces the generic path (the model's own ``forward``) even for GPT-2 and
    Llama; ``ignore_eos=True`` never stops at EOS (benchmarks: every row runs the full
    ``max_new_tokens``). The model must be in eval mode.

    ``allowed_token_ids`` restricts every draw to those tokens: the logits of all others are
    set to −inf before the softmax, so tokens come from the model's next-token distribution
    renormalised over the allowed set, and ``logprobs`` are under that distribution. It is the
    restricted policy π_V of :mod:`tether.distributions.exact` (the enumerable task samples from exactly the
    distribution it enumerates). None (the default) leaves the vocabulary whole.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    if model.training:
        raise ValueError("sample() needs the model in eval mode: call model.eval() first")
    stops = list(stop or [])
    if any(not s for s in stops):
        raise ValueError("stop strings must be non-empty")

    if fast:  # a LoRA policy or reference: the plain model the fast runners can read
        model = plain_model(model)
    device = next(model.parameters()).device
    allowed = _allowed_ids(model, allowed_token_ids, device)
    pad = pad_id(tokenizer)
    eos_id = None if ignore_eos else tokenizer.eos_token_id
    encoded = _encode(tokenizer, prompts)
    checker = _StopChecker(tokenizer, stops) if stops else None
    size = batch_size or max(len(encoded), 1)

    parts = []
    with torch.inference_mode():
        for start in range(0, len(encoded), size):
            parts.append(
                _sample_chunk(
                    model,
                    encoded[start : start + size],
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    generator=generator,
                    pad_id=pad,
                    eos_id=eos_id,
                    checker=checker,
                    fast=fast,
                    allowed=allowed,
                    device=device,
                )
            )

    # Outside inference mode, so the returned tensors are ordinary ones (inference tensors
    # cannot be saved for backward, and RL losses feed these ids back into the model).
    P = max((p.prompt_ids.shape[1] for p in parts), default=0)
    T = max((p.completion_ids.shape[1] for p in parts), default=0)

    def cat(name: str, width: int, left: bool, value: float, dtype: torch.dtype) -> torch.Tensor:
        if not parts:
            return torch.zeros(0, width, dtype=dtype, device=device)
        return torch.cat([_pad_to(getattr(p, name), width, left, value) for p in parts])

    completion_ids = cat("completion_ids", T, False, pad, torch.long)
    completion_mask = cat("completion_mask", T, False, 0, torch.long)
    lengths = completion_mask.sum(1).tolist()
    finished = [f for p in parts for f in p.finished]
    completions = [row[:n] for row, n in zip(completion_ids.tolist(), lengths, strict=True)]
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True) if completions else []
    if stops:
        texts = [_cut_at_stop(t, stops) if f else t for t, f in zip(texts, finished, strict=True)]
    return SampleOutput(
        prompt_ids=cat("prompt_ids", P, True, pad, torch.long),
        prompt_mask=cat("prompt_mask", P, True, 0, torch.long),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=cat("logprobs", T, False, 0.0, torch.float32),
        texts=texts,
        finished=finished,
    )


# ----------------------------------------------------------------------------- helpers


def pad_id(tokenizer: Any) -> int:
    """The id that pads rows: the tokenizer's pad token, else EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _encode(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    ids = tokenizer(list(prompts))["input_ids"] if prompts else []
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) encodes to no tokens")
    return [list(row) for row in ids]


def _allowed_ids(
    model: Any, allowed_token_ids: Sequence[int] | None, device: torch.device
) -> torch.Tensor | None:
    """The allowed token ids as a tensor on ``device`` (unique, order kept), checked against
    the model's vocabulary; None when there is no restriction."""
    if allowed_token_ids is None:
        return None
    ids = list(dict.fromkeys(int(t) for t in allowed_token_ids))
    vocab = int(model.config.vocab_size)
    if not ids or any(not 0 <= t < vocab for t in ids):
        raise ValueError(f"allowed_token_ids must be token ids in [0, {vocab}), got {ids}")
    return torch.tensor(ids, dtype=torch.long, device=device)


def vocab_bias(allowed: torch.Tensor, width: int) -> torch.Tensor:
    """[width] fp32: 0 at the ``allowed`` ids, −inf elsewhere; added to fp32 logits it sets
    every column outside ``allowed`` to −inf and leaves the others exactly as they were."""
    bias = torch.full((width,), -math.inf, dtype=torch.float32, device=allowed.device)
    bias[allowed] = 0.0
    return bias


def _pad_to(x: torch.Tensor, width: int, left: bool, value: float) -> torch.Tensor:
    extra = width - x.shape[1]
    if extra == 0:
        return x
    return F.pad(x, (extra, 0) if left else (0, extra), value=value)


def _cut_at_stop(text: str, stops: list[str]) -> str:
    ends = [i + len(s) for s in stops if (i := text.find(s)) >= 0]
    return text[: min(ends)] if ends else text


def _pick(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [n] and their fp32 logprobs [n] from the last-position logits [n, V]."""
    logits = logits.float()
    if temperature == 0:
        nxt = logits.argmax(-1)
        logp = torch.log_softmax(logits, -1)
    else:
        logp = torch.log_softmax(logits / temperature, -1)
        nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
    return nxt, logp.gather(1, nxt.unsqueeze(1)).squeeze(1)


class _StopChecker:
    """Detects stop strings in each row's newest text without decoding whole completions."""

    # token -> decoded text, per tokenizer (building it decodes the whole vocabulary once)
    _pieces: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        # A stop string spans at most len(stop) tokens that each decode to >= 1 character;
        # the margin covers tokens that decode to nothing (byte fragments, special tokens).
        self.window = max(len(s) for s in stops) + 4
        lasts = {s[-1] for s in stops}
        self.may_end: list[bool] | None = None
        if not any(c.isspace() for c in lasts):
            # Only a token whose text holds a stop string's last character can complete it.
            # Whitespace is excluded from this filter because tokenizers that mark spaces
            # (sentencepiece's "▁") drop them when a token is decoded alone.
            pieces = self._vocab_pieces(tokenizer)
            self.may_end = [p == "" or "\ufffd" in p or any(c in p for c in lasts) for p in pieces]

    @classmethod
    def _vocab_pieces(cls, tokenizer: Any) -> list[str]:
        try:
            pieces = cls._pieces[tokenizer]
            if len(pieces) == len(tokenizer):  # else tokens were added since: rebuild
                return pieces
        except (KeyError, TypeError):
            pass
        pieces = tokenizer.batch_decode(
            [[i] for i in range(len(tokenizer))], skip_special_tokens=True
        )
        try:
            cls._pieces[tokenizer] = pieces
        except TypeError:  # not weak-referenceable: just don't cache
            pass
        return pieces

    def hit(self, ids: list[int]) -> bool:
        """Whether the text of ``ids`` (a row's completion so far) now contains a stop string."""
        last = ids[-1]
        if self.may_end is not None and last < len(self.may_end) and not self.may_end[last]:
            return False
        tail = self.tokenizer.decode(ids[-self.window :], skip_special_tokens=True)
        return any(s in tail for s in self.stops)


# ----------------------------------------------------------------------------- decode loop


@dataclass
class _Chunk:
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    finished: list[bool]


def _sample_chunk(
    model: Any,
    encoded: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None,
    pad_id: int,
    eos_id: int | None,
    checker: _StopChecker | None,
    fast: bool,
    device: torch.device,
    allowed: torch.Tensor | None = None,
) -> _Chunk:
    B = len(encoded)
    lens = [len(row) for row in encoded]
    P = max(lens)
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    for i, row in enumerate(encoded):
        prompt_ids[i, P - len(row) :] = torch.tensor(row)
        prompt_mask[i, P - len(row) :] = 1
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)

    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
    lengths = [max_new_tokens] * B
    finished = [False] * B
    if max_new_tokens > 0:
        runner = _make_runner(model, fast, prompt_mask, lens, max_new_tokens)
        logits = runner.prefill(prompt_ids)
        _decode(
            runner,
            logits,
            tokens,
            logps,
            lengths,
            finished,
            temperature,
            generator,
            eos_id,
            checker,
            allowed,
        )

    T = max(lengths, default=0)
    completion_mask = (
        torch.arange(T, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    ).long()
    return _Chunk(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=tokens[:, :T].masked_fill(completion_mask == 0, pad_id),
        completion_mask=completion_mask,
        logprobs=logps[:, :T] * completion_mask,
        finished=finished,
    )


def _decode(
    runner: Any,
    logits: torch.Tensor,
    tokens: torch.Tensor,
    logps: torch.Tensor,
    lengths: list[int],
    finished: list[bool],
    temperature: float,
    generator: torch.Generator | None,
    eos_id: int | None,
    checker: _StopChecker | None,
    allowed: torch.Tensor | None = None,
) -> None:
    """The shared loop: pick, record, retire finished rows, step. Fills the buffers in place."""
    B, max_new = tokens.shape
    rows = list(range(B))  # original row of each active row
    rows_t: torch.Tensor | None = None  # the same as a tensor; None while rows == all rows
    gen: list[list[int]] = [[] for _ in range(B)] if checker else []
    bias = vocab_bias(allowed, logits.shape[-1]) if allowed is not None else None
    for t in range(max_new):
        if bias is not None:
            logits = logits.float() + bias
        nxt, lp = _pick(logits, temperature, generator)
        if rows_t is None:
            tokens[:, t] = nxt
            logps[:, t] = lp
        else:
            tokens[rows_t, t] = nxt
            logps[rows_t, t] = lp

        done: set[int] = set()  # positions in the active batch that end here
        if eos_id is not None:
            hits = nxt == eos_id
            if bool(hits.any()):
                done.update(hits.nonzero().flatten().tolist())
        if checker is not None:
            for i, tok in enumerate(nxt.tolist()):
                ids = gen[rows[i]]
                ids.append(tok)
                if i not in done and checker.hit(ids):
                    done.add(i)
        for i in done:
            lengths[rows[i]] = t + 1
            finished[rows[i]] = True

        if t == max_new - 1:
            break
        if done:
            order, moves = _retire(len(rows), done)
            if not order:
                break
            rows = [rows[i] for i in order]
            rows_t = torch.tensor(rows, device=nxt.device)
            nxt = nxt.index_select(0, torch.tensor(order, device=nxt.device))
            runner.compact(order, moves)
        logits = runner.step(nxt)


def _retire(n: int, done: set[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """The new batch after dropping positions ``done`` from a batch of ``n``: ``order`` (old
    position of each new row) and ``moves`` (old -> new position of the rows that move).

    Swap-remove: the surviving rows at the end fill the holes the finished rows leave at
    the front, so only as many rows move as finished, not every row after the first hole.
    """
    size = n - len(done)
    holes = [i for i in sorted(done) if i < size]
    movers = [i for i in range(size, n) if i not in done]
    order = list(range(size))
    for hole, mover in zip(holes, movers, strict=True):
        order[hole] = mover
    return order, list(zip(movers, holes, strict=True))


def _make_runner(
    model: Any, fast: bool, prompt_mask: torch.Tensor, lens: list[int], max_new: int
) -> Any:
    if fast and type(model) is GPT2LMHeadModel and _GPT2Runner.supports(model):
        return _GPT2Runner(model, prompt_mask, lens, max_new)
    if fast and type(model) is LlamaForCausalLM and _LlamaRunner.supports(model):
        return _LlamaRunner(model, prompt_mask, lens, max_new)
    return _HFRunner(model, prompt_mask, lens, max_new)


# ----------------------------------------------------------------------------- generic path


class _HFRunner:
    """Any HF causal LM through its own ``forward`` and cache."""

    def __init__(self, model: Any, prompt_mask: torch.Tensor, lens: list[int], max_new: int):
        self.model = model
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
        out = self.model(
            input_ids=prompt_ids,
            attention_mask=self.prompt_mask,
            position_ids=positions,
            use_cache=True,
            **extra,
        )
        self.past = out.past_key_values
        return out.logits[:, -1]

    def _forward_params(self) -> set[str]:
        try:
            return set(inspect.signature(self.model.forward).parameters)
        except (TypeError, ValueError):
            return set()

    def step(self, nxt: torch.Tensor) -> torch.Tensor:
        n = nxt.shape[0]
        out = self.model(
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


class _FastRunner:
    """The cache, masks, positions and compaction shared by the GPT-2 and Llama runners.

    Subclasses set ``n_layers, n_heads, n_kv_heads, head_dim`` and call :meth:`_setup`, then
    implement ``_forward(ids [n, S], positions [n, S]) -> last-position logits [n, V]``,
    which calls :meth:`_attend` once per layer.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    def _setup(self, prompt_mask: torch.Tensor, lens: list[int], max_new: int, dtype: torch.dtype):
        B, P = prompt_mask.shape
        device = prompt_mask.device
        self.prompt_mask = prompt_mask
        # the last generated token is never fed back, so P + max_new - 1 slots suffice
        L = P + max_new - 1
        self.cache = torch.empty(
            self.n_layers, 2, B, self.n_kv_heads, L, self.head_dim, dtype=dtype, device=device
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
        return F.scaled_dot_product_attention(
            q,
            self.k[layer][:, :, :end],
            self.v[layer][:, :, :end],
            attn_mask=mask,
            is_causal=S > 1 and mask is None,  # unpadded prefill
            scale=scale,
            **self.sdpa_kw,
        )


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


class _GPT2Runner(_FastRunner):
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


class _LlamaRunner(_FastRunner):
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

    def __init__(self, model: Any, prompt_mask: torch.Tensor, lens: list[int], max_new: int):
        cfg = model.config
        base = model.model
        self.n_layers, self.n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.width, self.inter = cfg.hidden_size, cfg.intermediate_size
        self.scale = self.head_dim**-0.5
        self.embed = base.embed_tokens.weight
        dtype, device = self.embed.dtype, self.embed.device
        H, Hkv, D, C = self.n_heads, self.n_kv_heads, self.head_dim, self.width

        # RMSNorm(x) * g feeds a matmul W, and
        #   W (g * x / sqrt(mean(x^2) + eps)) == (W * g * sqrt(C)) x / hypot(|x|, sqrt(C eps)),
        # so g * sqrt(C) is folded into W's input columns and a norm is three ops:
        # vector_norm, hypot, div (instead of HF's pow, mean, add, rsqrt, mul, mul).
        self.norm_eps = torch.tensor((C * cfg.rms_norm_eps) ** 0.5, device=device)
        root_c = C**0.5

        def fold(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            # [out, in] * g -> [in, out], contiguous for x @ W
            return (w.float() * (g.float() * root_c)).to(dtype).t().contiguous()

        self.blocks = []
        for layer in base.layers[: cfg.num_hidden_layers]:
            at, mlp = layer.self_attn, layer.mlp
            # one projection [q | k | v], q and k rows in RoPE pair order
            wq = _interleave_rows(at.q_proj.weight, H)
            wk = _interleave_rows(at.k_proj.weight, Hkv)
            wqkv = fold(torch.cat([wq, wk, at.v_proj.weight]), layer.input_layernorm.weight)
            bqkv = None
            if at.q_proj.bias is not None:
                bq = _interleave_rows(at.q_proj.bias, H)
                bk = _interleave_rows(at.k_proj.bias, Hkv)
                bqkv = torch.cat([bq, bk, at.v_proj.bias])
            wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            wgu = fold(wgu, layer.post_attention_layernorm.weight)
            bgu = None
            if mlp.gate_proj.bias is not None:
                bgu = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
            # o and down as [in, out] views, for addmm's fused residual add
            wo, wdown = at.o_proj.weight.t(), mlp.down_proj.weight.t()
            self.blocks.append(
                (wqkv, bqkv, wo, at.o_proj.bias, wgu, bgu, wdown, mlp.down_proj.bias)
            )
        self.head = (fold(model.lm_head.weight, base.norm.weight).t(), model.lm_head.bias)

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
        self._setup(prompt_mask, lens, max_new, dtype)

    def _rms(self, x: torch.Tensor) -> torch.Tensor:
        """x / hypot(|x|, sqrt(C eps)): RMSNorm up to the factor folded into the next matmul.
        Statistics in fp32, as HF computes them."""
        if self.fp32:
            return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), self.norm_eps)
        x32 = x.float()
        norm = torch.hypot(torch.linalg.vector_norm(x32, dim=-1, keepdim=True), self.norm_eps)
        return (x32 / norm).to(x.dtype)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n, S = ids.shape
        C, H, Hkv, D, inter = self.width, self.n_heads, self.n_kv_heads, self.head_dim, self.inter
        heads = H + 2 * Hkv
        rms, fp32, scale = self._rms, self.fp32, self.scale
        x = F.embedding(ids, self.embed).view(n * S, C)
        rope = self.rope[positions]  # [n, S, heads, D/2]
        for layer, (wqkv, bqkv, wo, bo, wgu, bgu, wdown, bdown) in enumerate(self.blocks):
            h = rms(x)
            proj = torch.mm(h, wqkv) if bqkv is None else torch.addmm(bqkv, h, wqkv)
            if not fp32:  # complex32 is barely supported: rotate in fp32
                proj = proj.float()
            # RoPE: (x_i + i y_i) * e^{i theta_i} on q and k pairs, times 1 on v
            qkv = torch.view_as_complex(proj.view(n, S, heads, D // 2, 2)) * rope
            qkv = torch.view_as_real(qkv).view(n, S, heads, D)
            if not fp32:
                qkv = qkv.to(x.dtype)
            kv = qkv[:, :, H:].view(n, S, 2, Hkv, D)
            a = self._attend(layer, qkv[:, :, :H].transpose(1, 2), kv, scale)
            a = a.transpose(1, 2).reshape(n * S, H * D)
            x = torch.addmm(x, a, wo) if bo is None else torch.addmm(bo, a, wo).add_(x)
            h = rms(x)
            gu = torch.mm(h, wgu) if bgu is None else torch.addmm(bgu, h, wgu)
            g = F.silu(gu[:, :inter]).mul_(gu[:, inter:])
            x = torch.addmm(x, g, wdown) if bdown is None else torch.addmm(bdown, g, wdown).add_(x)
        last = x.view(n, S, C)[:, -1]
        return F.linear(rms(last), *self.head)


_STATIC_ROPE = ("default", "linear", "llama3")
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
