"""Maximum likelihood on completion tokens (teacher forcing)."""

from __future__ import annotations

import torch


def mle_loss(
    logprobs: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """L = −Σ_t m_t log π(y_t|s_t) / Σ_t m_t: the token-mean negative log-likelihood.

    ``logprobs`` and ``loss_mask`` are aligned [B, L] (see ``shifted_token_logprobs``).
    """
    n = loss_mask.sum().clamp_min(1.0)
    loss = -(logprobs * loss_mask).sum() / n
    return loss, {"loss": loss.item(), "tokens": float(n.item())}
