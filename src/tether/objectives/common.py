"""Token-level quantities shared by every objective (docs/methods.md §1). Always fp32."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

CertaintyForm = Literal["entropy", "max_prob"]
CERTAINTY_FORMS: tuple[CertaintyForm, ...] = ("entropy", "max_prob")
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


def shifted_token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-prob of token t given tokens < t, aligned with ``input_ids``: [B, L], column 0 = 0."""
    lp = token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)
    return torch.nn.functional.pad(lp, (1, 0))


def certainty(logits: Tensor, form: CertaintyForm, temperature: float | None = None) -> Tensor:
    """Certainty Ĵ ∈ [0, 1] of the distribution given by ``logits [..., V]``, per position.

    With p = softmax(ℓ / T) and V = ``logits.shape[-1]``:

    - ``"entropy"`` (the paper): Ĵ = (log V − H(p)) / log V, the normalised negentropy;
    - ``"max_prob"`` (the released code): Ĵ = 1 + log max_a p(a) / log V, the normalised
      negative min-entropy.

    Both are 1 for a one-hot p and 0 for the uniform one. ``temperature=None`` takes the form's
    published temperature (:data:`DEFAULT_CERTAINTY_TEMPERATURE`: 1 for ``"entropy"``, 4 for
    ``"max_prob"``). Computed in fp32 and differentiable: detach the logits where the result is
    a weight that must carry no gradient (the prioritised KL's w).
    """
    if form not in DEFAULT_CERTAINTY_TEMPERATURE:
        raise ValueError(f"unknown certainty form {form!r}: choose 'entropy' or 'max_prob'")
    t = DEFAULT_CERTAINTY_TEMPERATURE[form] if temperature is None else float(temperature)
    if not t > 0:
        raise ValueError(f"certainty temperature must be > 0, got {t}")
    vocab = logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"certainty needs a vocabulary of at least 2 tokens, got {vocab}")
    z = logits.float() / t
    log_v = math.log(vocab)
    lse = torch.logsumexp(z, dim=-1)
    if form == "entropy":
        # H(p) = −Σ p log p = logsumexp(z) − Σ p·z. Written this way a one-hot p gives H = 0 and
        # constant logits give H = log V exactly; where p = 0 (z = −inf) the term is 0, not NaN.
        p = torch.softmax(z, dim=-1)
        p_z = torch.where(p > 0, p * z, torch.zeros_like(z))
        entropy = lse - p_z.sum(dim=-1)
        j = 1.0 - entropy / log_v
    else:
        # log max_a p(a) = max_a z_a − logsumexp(z)
        j = 1.0 + (z.amax(dim=-1) - lse) / log_v
    return j.clamp(0.0, 1.0)
