"""Maximum likelihood on completion tokens (teacher forcing), plain or label-smoothed."""

from __future__ import annotations

import torch
from torch import Tensor

from tether.objectives.common import at_least_fp32, shifted_token_logprobs


def mle_loss(
    logprobs: torch.Tensor, loss_mask: torch.Tensor, token_count: Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """L = −Σ_t m_t log π(y_t|s_t) / N: the token-mean negative log-likelihood.

    ``logprobs`` and ``loss_mask`` are aligned [B, L] (see ``shifted_token_logprobs``). N =
    ``token_count``, by default Σ_t m_t; across processes the stage passes N / W
    (``tether.distributed.mean_count``), so DDP's gradient average is the global mean's.
    """
    n = (loss_mask.sum() if token_count is None else token_count).clamp_min(1.0)
    loss = -(logprobs * loss_mask).sum() / n
    return loss, {"loss": loss.item(), "tokens": float(n.item())}


def smoothed_token_loss(logits: Tensor, targets: Tensor, epsilon: float) -> Tensor:
    """Per-position label-smoothed cross-entropy, [..., V] logits and [...] targets → [...]:

        ℓ = (1−ε)·(−log π(y|s)) + ε·(1/V)·Σ_a −log π(a|s),

    the cross-entropy against the mixture (1−ε)·onehot(y) + ε·uniform(V). Why it preserves
    support (docs/methods.md §6, Tiapkin et al. 2023's smoothed behaviour cloning): the term
    −(ε/V)·log π(a|s) grows without bound as π(a|s) → 0, so no token can be driven to zero; the
    minimiser over π(·|s) is the mixture itself, π(y|s) = 1−ε+ε/V and π(a|s) = ε/V for every
    other a, whatever the logits can reach. KL(π‖π_BC) stays finite for every π, which KL-RL
    toward the clone needs. ``logits`` may equally be log-softmax values (log-softmax of a
    log-softmax is itself): the result is the same. fp32 or better.
    """
    x = at_least_fp32(logits)
    log_p = x - torch.logsumexp(x, dim=-1, keepdim=True)
    nll = -log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    uniform = -log_p.mean(dim=-1)
    return (1.0 - epsilon) * nll + epsilon * uniform


def label_smoothed_mle_loss(
    logits: Tensor,
    input_ids: Tensor,
    loss_mask: Tensor,
    epsilon: float,
    token_count: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The token-mean of :func:`smoothed_token_loss` over completion tokens (``train.stage:
    mle`` with ``imitation.label_smoothing`` = ε): L = (1−ε)·NLL + ε·U, U the token-mean of
    mean_a −log π(a|s_t). ``logits`` [B, L, V] as the model returns them, ``input_ids`` and
    ``loss_mask`` [B, L] as for :func:`mle_loss` (position t's loss uses position t−1's
    logits). At ε = 0 the loss is bit for bit ``mle_loss(shifted_token_logprobs(logits,
    input_ids), loss_mask)`` (the same operations). ``token_count``: the denominator, as for
    :func:`mle_loss`. Stats: ``loss``, ``nll``, ``uniform_ce`` (U), ``tokens``.
    """
    nll, stats = mle_loss(shifted_token_logprobs(logits, input_ids), loss_mask, token_count)
    if epsilon == 0:
        return nll, stats
    x = at_least_fp32(logits[:, :-1])
    log_p = x - torch.logsumexp(x, dim=-1, keepdim=True)
    uniform = torch.nn.functional.pad(-log_p.mean(dim=-1), (1, 0))  # aligned with input_ids
    mask = loss_mask.to(uniform.dtype)
    n = (mask.sum() if token_count is None else token_count).clamp_min(1.0)
    uniform_ce = (uniform * mask).sum() / n
    loss = (1.0 - epsilon) * nll + epsilon * uniform_ce
    return loss, {
        "loss": loss.item(),
        "nll": stats["loss"],
        "uniform_ce": uniform_ce.item(),
        "tokens": stats["tokens"],
    }
