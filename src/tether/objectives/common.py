"""Token-level quantities shared by every objective (docs/methods.md §1). Always fp32."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

CertaintyForm = Literal["entropy", "max_prob"]
CERTAINTY_FORMS: tuple[CertaintyForm, ...] = ("entropy", "max_prob")
# What the reference's uncertainty u (its entropy, or min-entropy) is measured against in
# Ĵ = 1 − u/S (docs/rl.md, "The certainty's scale"): S = log V, the uncertainty of the uniform
# distribution over the model's own vocabulary (the paper), or S = κ·ū, κ times the reference's
# typical uncertainty ū (its mean over the batch's completion tokens), so that β_c weighs a
# token by how unsure the reference is there compared with how unsure it usually is.
CertaintyNormalization = Literal["vocabulary", "typical"]
CERTAINTY_NORMALIZATIONS: tuple[CertaintyNormalization, ...] = ("vocabulary", "typical")
# κ = log 99 / 0.0134: the shipped character model (99 tokens) has a mean entropy of 0.0134
# nats at the tokens of its own T = 1 samples on the critical-tokens task, so there the typical
# scale is the paper's log V and β_c keeps the paper's meaning
# (benchmarks/kl_weight_distribution.py measures it)
TYPICAL_MULTIPLE = 343.0
# The temperature each form is published with: the paper's negentropy uses the plain softmax,
# the released code's min-entropy uses softmax(logits / 4).
DEFAULT_CERTAINTY_TEMPERATURE: dict[str, float] = {"entropy": 1.0, "max_prob": 4.0}


def at_least_fp32(x: Tensor) -> Tensor:
    """fp32 for half-precision inputs; fp32 and fp64 pass through (fp64 for gradient checks)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def masked_mean(values: Tensor, mask: Tensor, token_count: Tensor | None = None) -> Tensor:
    """Σ_{b,t} m_bt·x_bt / N: the mean over the batch's real tokens (0 if there are none),
    with ``values`` at padding replaced by 0 first (whatever they held, NaN included).

    N = ``token_count``, by default Σ_{b,t} m_bt, this batch's. Across processes the stage
    passes N / W, the mean over processes of their counts (``tether.distributed.mean_count``):
    DDP's average of the processes' gradients is then the gradient of the global mean.
    """
    values = at_least_fp32(values)
    mask = mask.to(values.dtype)
    count = mask.sum() if token_count is None else token_count
    on_real = torch.where(mask > 0, values, torch.zeros_like(values))
    return (on_real * mask).sum() / count.clamp_min(1.0)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log π(a|s) = ℓ(s,a)/T − logsumexp ℓ(s,·)/T, in fp32 or better. logits [..., V], tokens [...]."""
    logits = at_least_fp32(logits)  # bf16/fp16 logits: log-softmax in fp32
    scaled = logits / temperature if temperature != 1.0 else logits
    picked = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


# Positions × vocabulary entries that :func:`chunked_token_logprobs` and
# :func:`chunked_entropy_and_exact_kl` take at once: 2^22 fp32 values are 16 MiB, under glibc's
# 32 MiB mmap threshold (tether.engine.allocator), so a chunk's temporaries reuse heap memory
# that the previous chunk freed. A [16, 24, 49152] tensor of SmolLM2 logits is 75 MB in fp32:
# served by mmap, each one is page-faulted and zeroed afresh.
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(rows: int, width: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log π(a|s) and, with ``entropy``, H(π) = −Σ π·log π per position, from logits [N, V] of
    any float dtype, π = softmax(ℓ/T): forward and backward by row chunks, in fp32, the
    gradient ∂/∂ℓ = [g_a·(onehot(a) − π) − g_H·π·(log π + H)]/T returned in the logits'
    dtype."""

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, tokens: Tensor, temperature: float, log_q: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        dtype = at_least_fp32(logits[:0]).dtype  # fp32, or fp64 for gradient checks
        logp = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        h = torch.empty_like(logp)
        kl = torch.empty(logits.shape[0] if log_q is not None else 0, dtype=dtype, device=h.device)
        for rows in _row_chunks(*logits.shape):
            # torch's log-softmax, row by row: the very numbers of the whole-tensor log-softmax
            # that rescoring and the other losses take, so ratios and KLs between them are exact
            log_p = torch.log_softmax(_scaled(logits[rows], temperature), dim=-1)
            logp[rows] = log_p.gather(1, tokens[rows, None]).squeeze(1)
            if log_q is None:
                h[rows] = -_dot_with_probs(log_p)
            else:  # the metrics from the same chunk: one log-softmax for the whole loss
                h[rows], kl[rows] = entropy_and_exact_kl(log_p, log_q[rows])
        ctx.save_for_backward(logits, tokens, h)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(kl)
        ctx.set_materialize_grads(False)  # an output the loss does not read: None, no work
        return logp, h, kl

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor | None, grad_entropy: Tensor | None, _: Any
    ) -> tuple[Tensor, None, None, None]:
        logits, tokens, h = ctx.saved_tensors
        t = ctx.temperature
        out = torch.empty_like(logits)
        for rows in _row_chunks(*logits.shape):
            log_p = torch.log_softmax(_scaled(logits[rows], t), dim=-1)
            p = log_p.exp()
            total = torch.zeros_like(p)
            if grad is not None:
                g = grad[rows, None].to(p.dtype)
                total.sub_(p * g).scatter_add_(1, tokens[rows, None], g)
            if grad_entropy is not None:
                g = grad_entropy[rows, None].to(p.dtype)
                finite = log_p.clamp_min(torch.finfo(p.dtype).min)  # π = 0: 0, not NaN
                total.sub_(p * (finite + h[rows, None]) * g)
            out[rows] = total / t if t != 1.0 else total
        return out, None, None, None


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    x = at_least_fp32(logits)
    return x / temperature if temperature != 1.0 else x


def _dot_with_probs(log_p: Tensor) -> Tensor:
    """Σ π·log π over the last dimension, 0·log 0 = 0 (see :func:`entropy_and_exact_kl`)."""
    finite = log_p.clamp_min(torch.finfo(log_p.dtype).min)
    return torch.linalg.vecdot(log_p.exp(), finite)


def chunked_token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """:func:`token_logprobs` — log π(a|s) = ℓ(s,a)/T − logsumexp ℓ(s,·)/T, [..., V] → [...]
    in fp32 — computed a chunk of positions at a time (:data:`CHUNK_ELEMENTS`), with its own
    backward: no [..., V] fp32 copy, log-softmax or gradient of a gather is kept whole, and the
    gradient reaches bf16 logits as bf16. For large vocabularies (SmolLM2's 49k), where those
    tensors were most of the RL loss's time. Equal to :func:`token_logprobs` in value and
    gradient up to float rounding."""
    return chunked_logprobs_and_metrics(logits, tokens, temperature)[0]


def chunked_token_logprobs_and_entropy(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, entropy: bool = True
) -> tuple[Tensor, Tensor]:
    """:func:`chunked_token_logprobs` and, differentiable too, the entropy H(π) per position
    (:func:`entropy_from_log_softmax` of softmax(ℓ/T)), both [...] fp32, from the same chunks:
    an entropy bonus without the whole log π. ``entropy=False``: an empty second tensor."""
    logp, h, _ = chunked_logprobs_and_metrics(logits, tokens, temperature)
    return logp, (h if entropy else h.new_empty(0))


def chunked_logprobs_and_metrics(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, log_q: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """log π(a|s) of ``tokens`` and H(π), differentiable, and with ``log_q`` (log π_ref
    [..., V]) KL(π‖π_ref) without gradient (else empty), all [...] fp32, from one chunked
    log-softmax of ``logits`` [..., V] / T (:class:`_ChunkedTokenLogprobs`)."""
    vocab = logits.shape[-1]
    flat_q = None if log_q is None else log_q.reshape(-1, vocab)
    logp, h, kl = _ChunkedTokenLogprobs.apply(
        logits.reshape(-1, vocab), tokens.reshape(-1), float(temperature), flat_q
    )
    shape = tokens.shape
    return logp.view(shape), h.view(shape), (kl if log_q is None else kl.view(shape))


@torch.no_grad()
def chunked_entropy_and_exact_kl(
    logits: Tensor, log_q: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The metrics H(π) and KL(π‖π_ref) per position, π = softmax(ℓ/T) from ``logits``
    [..., V] and log π_ref = ``log_q``: :func:`entropy_and_exact_kl` a chunk of positions at a
    time, without gradient."""
    tokens = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, h, kl = chunked_logprobs_and_metrics(logits, tokens, temperature, log_q)
    return h, kl


def log_softmax_and_token_logprobs(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The full fp32 log π(·|s) = log_softmax(ℓ/T) [..., V] and log π(a|s) of ``tokens`` [...]
    from one normalisation over the vocabulary. Where a step needs more than the sampled
    tokens' log-probs (entropy, exact KL), they all read this one tensor
    (:func:`entropy_from_log_softmax`, :func:`tether.objectives.kl.exact_kl_from_log_softmax`)
    instead of each normalising the logits again. Equal to :func:`token_logprobs` up to float
    rounding, in value and gradient."""
    x = at_least_fp32(logits)
    log_p = torch.log_softmax(x / temperature if temperature != 1.0 else x, dim=-1)
    return log_p, log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_log_softmax(log_p: Tensor) -> Tensor:
    """H = −Σ_a π(a)·log π(a) per position from log π [..., V], with 0·log 0 = 0 for tokens
    of probability 0 (logit −inf), in the value and in the gradient."""
    p = log_p.exp()
    return -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(dim=-1)


@torch.no_grad()
def entropy_and_exact_kl(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """The metrics H(π) = −Σ π·log π and KL(π‖π_ref) = Σ π·(log π − log π_ref) per position from
    log π and log π_ref [..., V], without gradient: the values of
    :func:`entropy_from_log_softmax` and
    :func:`tether.objectives.kl.exact_kl_from_log_softmax` from one exp and dot products over the vocabulary, not
    two exps and a dozen element-wise passes (at a 49k vocabulary they were a third of the RL
    loss's forward). 0·log 0 = 0: a −inf log-prob is clamped to the least finite float, whose
    product with π = 0 is 0 (a π > 0 has log π > −104 in fp32, so no other term moves)."""
    least = torch.finfo(log_p.dtype).min
    p = log_p.exp()
    own = torch.linalg.vecdot(p, log_p.clamp_min(least))  # Σ π·log π = −H
    cross = torch.linalg.vecdot(p, log_q.to(log_p.dtype).clamp_min(least))  # Σ π·log π_ref
    return -own, own - cross


def shifted_token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-prob of token t given tokens < t, aligned with ``input_ids``: [B, L], column 0 = 0."""
    lp = token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)
    return torch.nn.functional.pad(lp, (1, 0))


def uncertainty(logits: Tensor, form: CertaintyForm, temperature: float | None = None) -> Tensor:
    """The uncertainty u ≥ 0 of p = softmax(ℓ / T) per position, from ``logits [..., V]``:
    the entropy H(p) = −Σ p log p (``"entropy"``) or the min-entropy −log max_a p(a)
    (``"max_prob"``); 0 for a one-hot p, log V for the uniform one. ``temperature=None`` takes
    the form's published temperature (:data:`DEFAULT_CERTAINTY_TEMPERATURE`). fp32,
    differentiable."""
    if form not in DEFAULT_CERTAINTY_TEMPERATURE:
        raise ValueError(f"unknown certainty form {form!r}: choose 'entropy' or 'max_prob'")
    t = DEFAULT_CERTAINTY_TEMPERATURE[form] if temperature is None else float(temperature)
    if not t > 0:
        raise ValueError(f"certainty temperature must be > 0, got {t}")
    vocab = logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"certainty needs a vocabulary of at least 2 tokens, got {vocab}")
    z = logits.float() / t
    lse = torch.logsumexp(z, dim=-1)
    if form == "entropy":
        # H(p) = −Σ p log p = logsumexp(z) − Σ p·z. Written this way a one-hot p gives H = 0 and
        # constant logits give H = log V exactly; where p = 0 (z = −inf) the term is 0, not NaN.
        p = torch.softmax(z, dim=-1)
        p_z = torch.where(p > 0, p * z, torch.zeros_like(z))
        return lse - p_z.sum(dim=-1)
    # −log max_a p(a) = logsumexp(z) − max_a z_a
    return lse - z.amax(dim=-1)


def certainty(
    logits: Tensor,
    form: CertaintyForm,
    temperature: float | None = None,
    normalization: CertaintyNormalization = "vocabulary",
    typical: Tensor | float | None = None,
) -> Tensor:
    """Certainty Ĵ = 1 − u/S ∈ [0, 1] of the distribution given by ``logits [..., V]``, per
    position, u = :func:`uncertainty` (p = softmax(ℓ / T)):

    - ``form="entropy"`` (the paper): u = H(p), the normalised negentropy;
    - ``form="max_prob"`` (the released code): u = −log max_a p(a), the normalised negative
      min-entropy;

    - ``normalization="vocabulary"`` (the paper): S = log V, V = ``logits.shape[-1]`` (the
      number of finite logits where some are −inf: a restricted support), so Ĵ is
      1 for a one-hot p and 0 for the uniform one: Ĵ = (log V − H(p)) / log V, or
      1 + log max_a p(a) / log V;
    - ``normalization="typical"``: S = κ·ū, κ = :data:`TYPICAL_MULTIPLE` and ū = ``typical``,
      the reference's typical uncertainty (the stage passes its mean over the batch's real
      completion tokens; None: the mean of u over every position given). Ĵ is 1 where u = 0
      and 0 from u = κ·ū up.

    ``temperature=None`` takes the form's published temperature
    (:data:`DEFAULT_CERTAINTY_TEMPERATURE`: 1 for ``"entropy"``, 4 for ``"max_prob"``).
    Computed in fp32 and differentiable: detach the logits where the result is a weight that
    must carry no gradient (the prioritised KL's w).
    """
    if normalization not in CERTAINTY_NORMALIZATIONS:
        raise ValueError(
            f"unknown certainty normalization {normalization!r}: choose 'vocabulary' or 'typical'"
        )
    u = uncertainty(logits, form, temperature)
    if normalization == "vocabulary":
        finite = torch.isfinite(logits)
        if bool(finite.all()):
            return (1.0 - u / math.log(logits.shape[-1])).clamp(0.0, 1.0)
        # log V over the support: tokens whose logit is −inf (outside an allowed set) do not
        # count, so a distribution restricted to A tokens is normalised by log |A|
        support = finite.sum(dim=-1).clamp_min(2).to(u.dtype)
        return (1.0 - u / support.log()).clamp(0.0, 1.0)
    u_bar = (
        u.detach().mean()
        if typical is None
        else torch.as_tensor(typical, dtype=u.dtype, device=u.device)
    )
    if not bool(torch.isfinite(u_bar)) or u_bar < 0:
        raise ValueError(f"the typical uncertainty must be finite and >= 0, got {float(u_bar)}")
    # ū = 0 only when every token is certain (u = 0): Ĵ = 1 there, not 0/0
    scale = (TYPICAL_MULTIPLE * u_bar).clamp_min(torch.finfo(u.dtype).tiny)
    return (1.0 - u / scale).clamp(0.0, 1.0)
