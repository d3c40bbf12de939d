"""Batched autoregressive sampling with a KV cache, for evaluation and every RL method.

``sample(model, tokenizer, prompts, max_new_tokens=..., temperature=...)`` left-pads the
prompts, prefills them in one forward pass, then decodes one token per step for the whole
batch, greedy (temperature 0) or by draws from ``softmax(logits / T)`` (:func:`inverse_cdf`).

The decode loop (:func:`_decode`) is written once for every model: pick the next tokens,
record them, retire the rows that finished, step. The forward passes and the KV cache belong
to a runner (:mod:`tether.generation.runners`): a fast runner of our own for GPT-2 and Llama,
the model's own ``forward`` for any other architecture (or ``fast=False``). Tests check the
two agree token for token with each other and with ``model.generate``.

Logprobs are fp32 ``log_softmax(logits / T)`` (T = 1 for greedy) at the chosen token: the
log-probability under the distribution the token was drawn from.

``dtype=torch.bfloat16`` samples an fp32 model with bf16 arithmetic (the matmuls; the residual
stream, norms and softmax in fp32, and on the CPU the KV cache and attention too): what
``train.precision: bf16`` does to the rollouts. docs/performance.md measures what it does to
the log-probs and the KL estimates.

Stop strings are checked cheaply: a per-token table says which tokens can complete a stop
string (their text contains a stop string's last character), and only rows that just
produced such a token decode their last few tokens to look for it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tether.generation.runners import DecodeRunner, make_runner
from tether.generation.weights import prune as prune_prepared
from tether.models.loading import model_device
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
    dtype: torch.dtype | None = None,
) -> SampleOutput:
    """Complete each prompt with up to ``max_new_tokens`` tokens.

    ``temperature`` 0 is greedy (argmax); above 0, tokens are drawn from
    ``softmax(logits / temperature)`` with ``generator`` (seed it for reproducible samples;
    it must live on the model's device). A row ends at an end-of-sequence token (kept in the
    completion: the tokenizer's EOS or any EOS id of the model's ``generation_config``,
    :func:`stop_token_ids`) or as soon as its text contains one of ``stop``. ``batch_size`` splits
    the prompts into chunks run one after the other (None: all at once).

    ``fast=False`` forces the generic path (the model's own ``forward``) even for GPT-2 and
    Llama; ``ignore_eos=True`` never stops at EOS (benchmarks: every row runs the full
    ``max_new_tokens``). The model must be in eval mode.

    ``allowed_token_ids`` restricts every draw to those tokens: the logits of all others are
    set to −inf before the softmax, so tokens come from the model's next-token distribution
    renormalised over the allowed set, and ``logprobs`` are under that distribution. It is the
    restricted policy π_V of :mod:`tether.distributions.exact` (the enumerable task samples from exactly the
    distribution it enumerates). None (the default) leaves the vocabulary whole.

    ``dtype``: the arithmetic's (None: the weights'); ``torch.bfloat16`` on an fp32 model
    runs bf16 matmuls with an fp32 residual stream (:mod:`tether.generation.runners`).
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
    device = model_device(model)
    allowed = _allowed_ids(model, allowed_token_ids, device)
    pad = pad_id(tokenizer)
    eos_ids = None if ignore_eos else stop_token_ids(tokenizer, model, device)
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
                    eos_ids=eos_ids,
                    checker=checker,
                    fast=fast,
                    allowed=allowed,
                    device=device,
                    dtype=dtype,
                )
            )

    # the plain view of a LoRA model holds merged weights made for this call: once it is
    # gone, what was prepared from them cannot be reused and need not stay resident
    model = None
    prune_prepared()

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


def stop_token_ids(tokenizer: Any, model: Any, device: Any = "cpu") -> torch.Tensor | None:
    """The ids that end a completion: the tokenizer's EOS and every EOS id of the model's
    ``generation_config`` (chat models often end a turn on a token of their own, and Llama 3
    lists several). None when there is none."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for source in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        for tid in source if isinstance(source, (list, tuple)) else [source]:
            if tid is not None and int(tid) not in ids:
                ids.append(int(tid))
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


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
    if temperature == 0:  # argmax, and its log-softmax: torch's fused log_softmax is faster on
        # the CPU than a max with indices and a shift, exp, sum and log of its own (SmolLM2's
        # 16 × 49,152 logits: 0.40 vs 0.68 ms)
        nxt = logits.argmax(-1)
        return nxt, torch.log_softmax(logits, -1).gather(1, nxt[:, None]).squeeze(1)
    logp = torch.log_softmax(logits / temperature, -1)
    probs = logp.exp()
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    nxt = inverse_cdf(probs, u)
    return nxt, logp.gather(1, nxt.unsqueeze(1)).squeeze(1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row of the categorical ``probs`` [n, V] (not necessarily normalised) for
    uniforms ``u`` [n, 1] on [0, 1): the first token whose running sum (fp64) exceeds u × the
    row's total, so token i is drawn with probability p_i / Σp up to fp64 rounding, and a
    token of probability 0 never. One uniform a row: ``torch.multinomial`` draws V exponentials
    a row (the exponential race), 14.8 ms against 0.47 ms here at 16 × 49,152 on two CPU cores,
    13 ms of each 27 ms decode step of an RL rollout on SmolLM2. A ValueError for rows whose
    probabilities are not finite or sum to 0, as ``torch.multinomial`` raises."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    total = cdf[:, -1:]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):
        raise ValueError(
            "sampling: the next-token probabilities are not finite and positive "
            "(NaN or infinite logits, or every token excluded)"
        )
    picked = torch.searchsorted(cdf, u * total, right=True)
    return picked.clamp_(max=probs.shape[1] - 1).squeeze(1)


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
    eos_ids: torch.Tensor | None,
    checker: _StopChecker | None,
    fast: bool,
    device: torch.device,
    allowed: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
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
        runner = make_runner(model, fast, prompt_mask, lens, max_new_tokens, dtype)
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
            eos_ids,
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
    runner: DecodeRunner,
    logits: torch.Tensor,
    tokens: torch.Tensor,
    logps: torch.Tensor,
    lengths: list[int],
    finished: list[bool],
    temperature: float,
    generator: torch.Generator | None,
    eos_ids: torch.Tensor | None,
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
        if eos_ids is not None:
            hits = torch.isin(nxt, eos_ids)
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
