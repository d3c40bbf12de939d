"""Reward extraction from a trained language model (docs/methods.md §4, IQLearn).

A model's logits are soft Q-values, so every model — trained by IQLearn or by plain MLE —
carries an implicit per-token reward r̂_t = Q(s_t, a_t) − γ·V(s_{t+1}) (alignment and the
truncation rule: :mod:`tether.objectives.iqlearn`). Its sequence return is

    R = Σ_{t=1..T} γ^(t−1) · r̂_t,    t counting the row's T completion tokens from the first

(so the first completion token is undiscounted; "t counted from the first completion token").

Telescoping identity (checked in ``tests/test_implicit_rewards.py``). With log π_t = Q_t − V(s_t), where
V(s_{t+1}) is the V of the next completion token's state (or of the state after the last one):

    R = Σ_t γ^(t−1) (log π_t + V(s_t) − γ·V(s_{t+1}))
      = V(s_1) + Σ_t γ^(t−1) log π_t − γ^T · V(s_{T+1}),

because Σ_t (γ^(t−1) V(s_t) − γ^t V(s_{t+1})) collapses to its first and last terms. For a
terminated row V(s_{T+1}) = 0 after the EOS, so R = V(s_1) + Σ_t γ^(t−1) log π_t exactly, the
"γ-consistent sum" of docs/methods.md §4. For a truncated row the boundary term −γ^T·V(s_{T+1})
stays. The identity needs the return's discount to be the same γ as the one inside r̂.

Use :func:`spearman` to correlate returns with a task metric (the paper's claim: IQLearn's
extracted reward correlates with the task score, MLE's barely).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy import stats as scipy_stats
from torch import Tensor

from tether.batches import TokenBatch
from tether.objectives.iqlearn import soft_values, terminated_from_eos


def _eos_id(model: torch.nn.Module) -> int:
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if isinstance(eos, list | tuple):
        eos = eos[0] if eos else None
    if eos is None:
        raise ValueError("terminated=None needs model.config.eos_token_id; pass terminated")
    return int(eos)


@torch.no_grad()
def token_rewards(
    model: torch.nn.Module,
    batch: TokenBatch,
    terminated: Tensor | bool | None = None,
    gamma: float = 1.0,
) -> Tensor:
    """Per-token implicit rewards r̂ [B, L] (fp32), aligned with ``batch.input_ids``; 0 off the
    completion (prompt, padding).

    ``terminated`` [B] bool: True where the row ends with EOS (V = 0 after it), False where it
    was truncated. ``None`` infers it: a row is terminated iff its last completion token is
    ``model.config.eos_token_id``. The model runs in eval mode (dropout off) and its previous
    mode is restored.
    """
    if terminated is None:
        terminated = terminated_from_eos(batch.input_ids, batch.loss_mask, _eos_id(model))
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        model.train(was_training)
    sv = soft_values(logits, batch.input_ids, batch.loss_mask, terminated, gamma)
    return torch.where(sv.mask > 0, sv.reward, torch.zeros_like(sv.reward))


def sequence_returns(rewards: Tensor, loss_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """R = Σ_t γ^(t−1)·r̂_t per row [B], t = 1, 2, … counting the row's completion tokens.

    ``rewards`` [B, L] as from :func:`token_rewards`, ``loss_mask`` [B, L] (column 0 ignored, as
    there). Gaps in the mask do not advance t: the discount counts actions.
    """
    mask = loss_mask.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32).clone()
    mask[:, 0] = 0.0
    steps = (mask.cumsum(dim=1) - 1.0).clamp_min(0.0)
    discount = torch.full_like(mask, float(gamma)).pow(steps)
    r = torch.where(mask > 0, rewards.to(mask.dtype), torch.zeros_like(mask))
    return (discount * r * mask).sum(dim=1)


def model_returns(
    model: torch.nn.Module,
    batch: TokenBatch,
    terminated: Tensor | bool | None = None,
    gamma: float = 1.0,
) -> Tensor:
    """:func:`sequence_returns` of :func:`token_rewards`: the model's return of each row [B]."""
    rewards = token_rewards(model, batch, terminated, gamma)
    return sequence_returns(rewards, batch.loss_mask, gamma)


def spearman(returns: Tensor | np.ndarray | list[float], metric: object) -> tuple[float, float]:
    """Spearman rank correlation (rho, two-sided p-value) between returns and a task metric.

    Both are 1-D of the same length (tensors, arrays or lists). With fewer than 2 pairs, or a
    constant input (rank correlation undefined), returns ``(nan, nan)`` without a warning.
    """
    x = _as_array(returns)
    y = _as_array(metric)
    if x.shape != y.shape:
        raise ValueError(f"returns and metric differ in shape: {x.shape} vs {y.shape}")
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's small-sample / NaN warnings
        result = scipy_stats.spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


def _as_array(values: object) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)
