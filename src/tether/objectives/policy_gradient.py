"""Policy-gradient pieces of KL-regularised RL: returns, advantages and losses (docs/methods.md §2).

REINFORCE with a baseline, RLOO, A2C (value head + GAE(γ, λ)), PPO-clip and GRPO / Dr. GRPO
(group-normalised advantages, TRL's ``GRPOTrainer`` loss) are assembled from
these pure functions (the RL stage's whole loss: :func:`tether.objectives.rl.rl_loss`). Tensors
are [B, T] over completion tokens with a float ``mask`` [B, T] (1 = real token, 0 = padding),
right-padded: each row's real tokens come first. Every episode ends at its last real token
(V = 0 after it). All math in fp32 (fp64 inputs stay fp64).

Token means are masked means over all real tokens of the batch
(:func:`~tether.objectives.common.masked_mean`); ``token_count`` replaces their denominator
(across processes, N / W). The KL is kept separate: put it in the reward with
:func:`shape_rewards_with_kl`, or add ``kl_coef * masked_mean(kl_penalty(...), mask)`` to the
loss (``tether.objectives.kl``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from tether.objectives.common import at_least_fp32, masked_mean
from tether.objectives.kl import kl_estimate


def _on_real(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` on real tokens, 0 at padding (whatever the padding held, NaN included)."""
    return torch.where(mask > 0, values, torch.zeros_like(values))


def _per_token(advantages: Tensor, like: Tensor) -> Tensor:
    """Sequence-level advantages [B] broadcast over tokens to [B, T]; [B, T] passes through."""
    if advantages.dim() == like.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    return advantages.expand_as(like)


# ----------------------------------------------------------------------------- rewards


def terminal_rewards(seq_rewards: Tensor, mask: Tensor) -> Tensor:
    """Sparse token rewards [B, T]: r(x, y) on the last real token of each row, 0 elsewhere.

    A row with no real token gets no reward.
    """
    real = mask > 0
    t = mask.shape[-1]
    # index of the last True in each row: T − 1 − (index of the first True in the flipped row)
    last = t - 1 - real.flip(-1).long().argmax(dim=-1)
    at_last = torch.arange(t, device=mask.device) == last.unsqueeze(-1)
    rewards = at_least_fp32(seq_rewards).unsqueeze(-1)
    return torch.where(at_last & real, rewards, torch.zeros_like(rewards))


def shape_rewards_with_kl(token_rewards: Tensor, kl: Tensor, kl_coef: float) -> Tensor:
    """KL in the reward (docs/methods.md §1, "Placement"): r̃_t = r_t − kl_coef · kl_t, per token.

    ``kl`` is a per-token penalty such as ``kl_penalty(...)`` (0 at padding). Both are detached:
    a shaped reward is a constant of the policy-gradient estimator, so the KL reaches the policy
    only through the advantages, before they are computed.
    """
    return at_least_fp32(token_rewards).detach() - kl_coef * at_least_fp32(kl).detach()


# ----------------------------------------------------------------------------- returns, advantages


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + γ·G_{t+1}, with G = 0 after the last real token; 0 at padding. [B, T], detached."""
    rewards = _on_real(at_least_fp32(rewards).detach(), mask)
    returns = torch.zeros_like(rewards)
    next_return = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        real = mask[:, t] > 0
        current = rewards[:, t] + gamma * next_return
        next_return = torch.where(real, current, torch.zeros_like(current))
        returns[:, t] = next_return
    return returns


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), right to left over each row:

        δ_t = r_t + γ·V_{t+1} − V_t,        A_t = δ_t + γλ·A_{t+1},        R_t = A_t + V_t,

    with V_{t+1} = A_{t+1} = 0 after the last real token: the episode ends there, with no
    bootstrap from the value head. That holds for a row cut at ``max_new_tokens`` too: its
    reward is judged on the cut completion and nothing continues it, so the cut is where its
    episode ends (unlike IQLearn's implicit reward on demonstrations, docs/methods.md §1).
    λ = 1 gives A_t = G_t − V_t (Monte-Carlo returns); λ = 0 gives the one-step TD error.
    Returns ``(advantages, returns)`` [B, T], both 0 at padding and detached (the returns are
    the value head's regression targets).
    """
    rewards = _on_real(at_least_fp32(rewards).detach(), mask)
    values = _on_real(at_least_fp32(values).detach(), mask)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        real = mask[:, t] > 0
        td_error = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = td_error + gamma * lam * next_advantage
        # a padding position resets both, so the next real token to its left is terminal
        next_advantage = torch.where(real, advantage, torch.zeros_like(advantage))
        next_value = values[:, t]  # already 0 at padding
        advantages[:, t] = next_advantage
    returns = _on_real(advantages + values, mask)
    return advantages, returns


def rloo_baseline(seq_rewards: Tensor, group_size: int) -> Tensor:
    """RLOO advantages [B]: each sample's reward minus the mean reward of the other k − 1
    samples of its prompt (Kool et al. 2019; Ahmadian et al. 2024):

        A_i = r_i − (Σ_{j≠i} r_j) / (k − 1) = k/(k − 1) · (r_i − mean_j r_j).

    Samples of the same prompt are consecutive: rows [0, k) are one group, [k, 2k) the next...
    The advantages of a group sum to 0. Detached.
    """
    k = int(group_size)
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got group_size={group_size}")
    if seq_rewards.dim() != 1 or seq_rewards.shape[0] % k != 0:
        raise ValueError(
            f"RLOO needs 1-D rewards whose length is a multiple of group_size={k}, "
            f"got shape {tuple(seq_rewards.shape)}"
        )
    groups = at_least_fp32(seq_rewards).detach().view(-1, k)
    leave_one_out_mean = (groups.sum(dim=1, keepdim=True) - groups) / (k - 1)
    return (groups - leave_one_out_mean).view(-1)


RewardScale = Literal["group", "batch", "none"]
REWARD_SCALES: tuple[RewardScale, ...] = ("group", "batch", "none")
GRPOAggregation = Literal["grpo", "dr_grpo", "dapo"]
GRPO_AGGREGATIONS: tuple[GRPOAggregation, ...] = ("grpo", "dr_grpo", "dapo")
GRPO_STD_EPS = 1e-4  # TRL's ε in (r − mean) / (std + ε)


def sample_std(values: Tensor, dim: int | None = None) -> Tensor:
    """The standard deviation with Bessel's correction, √(Σ(x − x̄)² / (n − 1)) (TRL's
    ``nanstd`` without NaNs); 0 for a single value instead of NaN."""
    n = values.numel() if dim is None else values.shape[dim]
    if n < 2:
        return torch.zeros_like(values.mean() if dim is None else values.mean(dim=dim))
    return values.std() if dim is None else values.std(dim=dim)


def grpo_advantages(
    seq_rewards: Tensor,
    group_size: int,
    scale: RewardScale = "group",
    batch_std: Tensor | None = None,
) -> Tensor:
    """GRPO's advantages [B] (Shao et al. 2024; TRL's ``GRPOTrainer``): each completion's
    reward against the mean of its prompt's group of k, scaled by a standard deviation,

        A_i = (r_i − mean_group r) / (std + ε),   ε = 1e-4,

    std = the group's (``scale="group"``, GRPO), the whole batch's (``"batch"``), or no scaling
    at all, A_i = r_i − mean_group r (``"none"``: Dr. GRPO, Liu et al. 2025, which drops the
    std because it weighs easy and hard questions unequally). The std has Bessel's correction,
    as TRL's. Rows [0, k) are one group, [k, 2k) the next... ``batch_std``: the std of every
    process's rewards for ``"batch"`` (None: this batch's). Detached.
    """
    k = int(group_size)
    if k < 1 or seq_rewards.dim() != 1 or seq_rewards.shape[0] % k != 0:
        raise ValueError(
            f"GRPO needs 1-D rewards whose length is a multiple of group_size={group_size}, "
            f"got shape {tuple(seq_rewards.shape)}"
        )
    if scale not in REWARD_SCALES:
        raise ValueError(f"unknown reward scale {scale!r}: choose one of {REWARD_SCALES}")
    rewards = at_least_fp32(seq_rewards).detach()
    groups = rewards.view(-1, k)
    centred = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = sample_std(groups, dim=1).repeat_interleave(k)
    else:
        std = sample_std(rewards) if batch_std is None else at_least_fp32(batch_std).detach()
    return centred / (std + GRPO_STD_EPS)


# ----------------------------------------------------------------------------- losses


def reinforce_loss(
    logp: Tensor, advantages: Tensor, mask: Tensor, token_count: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """L = −Σ_t m_t·A_t·log π(a_t|s_t) / Σ_t m_t, with A detached (score-function estimator).

    ``advantages`` are per token [B, T] (e.g. from :func:`gae`) or per sequence [B] (e.g. from
    :func:`rloo_baseline`, broadcast to every token of the row). ``token_count`` replaces the
    denominator Σ_t m_t (module docstring).
    """
    logp = at_least_fp32(logp)
    advantages = _per_token(at_least_fp32(advantages).detach(), logp)
    loss = -masked_mean(advantages * logp, mask, token_count)
    advantage_mean = masked_mean(advantages, mask, token_count)
    stats = {"pg_loss": loss.item(), "advantage_mean": advantage_mean.item()}
    return loss, stats


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped objective per token [B, T] (to maximise; 0 at padding),

        ρ_t = π_θ(a_t|s_t) / π_old(a_t|s_t),   min(ρ_t·A_t, clip(ρ_t, 1 − ε, 1 + ε)·A_t),

    with ``old_logp`` (the sampling policy) and ``advantages`` ([B, T] or [B]) detached, and
    the per-token diagnostics (no gradient): ``ratio``, ``outside_band`` (|ρ − 1| > ε),
    ``clip_active`` (the clipped term wins, so the token's gradient is 0) and ``approx_kl``
    (k3 of KL(π_old‖π_θ) = ρ − 1 − log ρ on these samples)."""
    logp = at_least_fp32(logp)
    old_logp = at_least_fp32(old_logp).detach()
    advantages = _per_token(at_least_fp32(advantages).detach(), logp)
    real = mask > 0
    # padding may hold anything: a zero log-ratio there keeps exp() finite
    log_ratio = torch.where(real, logp - old_logp, torch.zeros_like(logp))
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    objective = _on_real(torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        diagnostics = {
            "ratio": ratio.detach(),
            "outside_band": ((ratio - 1.0).abs() > clip_eps).to(logp.dtype),
            "clip_active": (clipped < unclipped).to(logp.dtype),
            # samples come from π_old, so KL(π_old‖π_θ) takes k3 with the roles swapped
            "approx_kl": kl_estimate(old_logp, logp.detach(), "k3"),
        }
    return objective, diagnostics


def _surrogate_stats(
    diagnostics: dict[str, Tensor], mask: Tensor, token_count: Tensor | None
) -> dict[str, float]:
    names = {
        "clip_fraction": "outside_band",
        "clip_active_fraction": "clip_active",
        "approx_kl": "approx_kl",
        "ratio_mean": "ratio",
    }
    return {k: masked_mean(diagnostics[v], mask, token_count).item() for k, v in names.items()}


def ppo_clip_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    token_count: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017), as a loss to minimise:

        ρ_t = π_θ(a_t|s_t) / π_old(a_t|s_t),
        L = −mean_t min(ρ_t·A_t, clip(ρ_t, 1 − ε, 1 + ε)·A_t).

    ``old_logp`` (the sampling policy) and ``advantages`` ([B, T] or [B]) are detached. Stats:
    ``clip_fraction``: fraction of real tokens with ρ outside [1 − ε, 1 + ε];
    ``clip_active_fraction``: fraction where the clipped term wins, so the token's gradient is 0;
    ``approx_kl``: the k3 estimate of KL(π_old‖π_θ) = mean(ρ − 1 − log ρ) on these samples.
    ``token_count`` replaces the denominator of the token means (module docstring).
    """
    objective, diagnostics = clipped_surrogate(logp, old_logp, advantages, mask, clip_eps)
    loss = -masked_mean(objective, mask, token_count)
    stats = {"pg_loss": loss.item(), **_surrogate_stats(diagnostics, mask, token_count)}
    return loss, stats


def aggregate_token_losses(
    per_token: Tensor,
    mask: Tensor,
    aggregation: GRPOAggregation,
    max_completion_length: int | None = None,
    token_count: Tensor | None = None,
) -> Tensor:
    """A scalar loss from per-token losses ℓ [B, T] as TRL's ``loss_type`` reduces them:

    - ``"grpo"``: (1/B)·Σ_b (Σ_t m·ℓ / Σ_t m), each sequence's token mean, then the mean over
      sequences (GRPO's paper; a short completion's tokens weigh more);
    - ``"dr_grpo"``: Σ_{b,t} m·ℓ / (B·L), L = ``max_completion_length`` (Dr. GRPO: a constant
      denominator, no length bias);
    - ``"dapo"``: Σ_{b,t} m·ℓ / N, the mean over the batch's real tokens (DAPO; TRL 1.16's
      default). ``token_count`` replaces N (across processes N / W, module docstring).

    B is this batch's row count: a micro-batch of w·B rows, weighted by w, or one of W
    processes, averaged by DDP, adds up to the whole batch's value for ``grpo`` and
    ``dr_grpo`` with no global count."""
    per_token = _on_real(at_least_fp32(per_token), mask)
    mask = mask.to(per_token.dtype)
    rows = max(per_token.shape[0], 1)
    if aggregation == "grpo":
        lengths = mask.sum(dim=1).clamp_min(1.0)
        return ((per_token * mask).sum(dim=1) / lengths).sum() / rows
    if aggregation == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError("aggregation dr_grpo needs max_completion_length >= 1")
        return (per_token * mask).sum() / (rows * max_completion_length)
    if aggregation == "dapo":
        return masked_mean(per_token, mask, token_count)
    raise ValueError(f"unknown aggregation {aggregation!r}: choose one of {GRPO_AGGREGATIONS}")


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    aggregation: GRPOAggregation = "dapo",
    max_completion_length: int | None = None,
    token_count: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO's loss as TRL's ``GRPOTrainer`` computes it (docs/methods.md §2, "GRPO"):

        ℓ_t = −min(ρ_t·A, clip(ρ_t, 1 − ε, 1 + ε)·A) + β·KL_t,    ρ_t = π_θ(a_t|s_t) / π_old(a_t|s_t),

    reduced over tokens by ``aggregation`` (:func:`aggregate_token_losses`). A [B] comes from
    :func:`grpo_advantages`; ``kl`` [B, T] is the per-token penalty with its gradient (TRL:
    k3 = π_ref/π_θ − log(π_ref/π_θ) − 1, :func:`tether.objectives.kl.kl_penalty`), β =
    ``kl_coef``, inside the per-token loss, so it is reduced as the policy term is. Stats: the
    PPO ones (:func:`ppo_clip_loss`, as token means), ``pg_loss`` (the clipped term alone,
    reduced the same way) and ``advantage_std``."""
    objective, diagnostics = clipped_surrogate(logp, old_logp, advantages, mask, clip_eps)
    per_token = -objective
    pg = aggregate_token_losses(per_token, mask, aggregation, max_completion_length, token_count)
    loss = pg
    if kl is not None and kl_coef != 0.0:
        kl_term = aggregate_token_losses(
            kl_coef * at_least_fp32(kl), mask, aggregation, max_completion_length, token_count
        )
        loss = loss + kl_term
    stats = {"pg_loss": pg.item(), **_surrogate_stats(diagnostics, mask, token_count)}
    stats["advantage_std"] = float(sample_std(at_least_fp32(advantages).detach().reshape(-1)))
    return loss, stats


def value_loss(
    values: Tensor,
    returns: Tensor,
    mask: Tensor,
    old_values: Tensor | None = None,
    clip: float | None = None,
    token_count: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Value-head regression: L_V = ½·mean_t (V_t − R_t)², R detached (e.g. from :func:`gae`).

    With ``clip`` (PPO-style, needs ``old_values``): V^clip = V_old + clip(V − V_old, −c, c) and
    L_V = ½·mean_t max((V_t − R_t)², (V^clip_t − R_t)²). ``token_count`` replaces the
    denominator of the token means (module docstring).
    """
    values = at_least_fp32(values)
    returns = at_least_fp32(returns).detach()
    squared_error = (values - returns).square()
    stats: dict[str, float] = {}
    if clip is not None:
        if old_values is None:
            raise ValueError("value clipping needs old_values")
        old_values = at_least_fp32(old_values).detach()
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        clipped_error = (clipped_values - returns).square()
        with torch.no_grad():
            stats["value_clip_fraction"] = masked_mean(
                (clipped_error > squared_error).to(values.dtype), mask, token_count
            ).item()
        squared_error = torch.maximum(squared_error, clipped_error)
    loss = 0.5 * masked_mean(squared_error, mask, token_count)
    stats["value_loss"] = loss.item()
    return loss, stats
