"""The RL stage's whole loss, one pure function (docs/methods.md §1–3): :func:`rl_loss`.

For a rollout of B completions (tensors [B, T] over completion tokens, ``mask`` 1 on real
ones) scored under the policy π_θ (with gradient) and the frozen reference π_ref, both at the
sampling temperature:

    loss = L_PG                                   (REINFORCE / RLOO / A2C / PPO-clip)
         + α · mean_t w_t·KL_t                    (kl_placement loss)
         − c_H · mean_t H(π_θ(·|s_t))             (entropy bonus)
         + c_V · ½·mean_t (V_t − R_t)²            (A2C and PPO: the value head)

with the rewards r_t = r(x, y) on each row's last token, or r_t − α·w_t·KL_t with
``kl_placement reward`` (a detached shaped reward, so only k1 = log π/π_ref gives the
sequence-KL penalty: k2, k3 and exact are refused there, and k1 in the loss, whose expected
gradient is zero). w_t = 1 (standard KL) or Ĵ_ref(s_t)^β_c (prioritised KL, ``kl_weights``).
Every mean is over the batch's real tokens: Σ_{b,t} m·x / N, N = ``token_count``.

GRPO (``algorithm: grpo``, TRL's ``GRPOTrainer``) puts the KL inside its per-token loss,

    loss = agg_t[ −min(ρ_t·A, clip(ρ_t, 1 ± ε)·A) + α·w_t·KL_t ] − c_H · mean_t H

with A the group-normalised advantage and agg the ``grpo_loss`` reduction
(:func:`~tether.objectives.policy_gradient.grpo_loss`).

Nothing here communicates: across processes the stage passes N / W as ``token_count`` and
REINFORCE's batch-mean baseline as ``baseline`` (the mean return over every process's tokens,
:func:`rl_returns` averaged), so the loss of each process is its share of the global one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tether.objectives.common import entropy_and_exact_kl, entropy_from_log_softmax, masked_mean
from tether.objectives.kl import (
    KLEstimator,
    exact_kl_from_log_softmax,
    kl_penalty,
)
from tether.objectives.policy_gradient import (
    GRPOAggregation,
    RewardScale,
    discounted_returns,
    gae,
    grpo_advantages,
    grpo_loss,
    ppo_clip_loss,
    reinforce_loss,
    rloo_baseline,
    shape_rewards_with_kl,
    terminal_rewards,
    value_loss,
)

RLAlgorithm = Literal["reinforce", "rloo", "a2c", "ppo", "grpo"]
RLKLEstimator = Literal["k1", "k2", "k3", "exact"]
KLPlacement = Literal["loss", "reward"]


@dataclass(frozen=True)
class RLLossSettings:
    """The recipe's ``rl`` keys that shape the loss (``tether.config.RLConfig``)."""

    algorithm: RLAlgorithm = "a2c"
    kl_coef: float = 0.0  # α
    kl_estimator: RLKLEstimator = "k2"
    kl_placement: KLPlacement = "loss"
    entropy_coef: float = 0.0  # c_H
    value_coef: float = 0.0  # c_V (a2c, ppo)
    gamma: float = 1.0
    gae_lambda: float = 0.95  # λ (a2c, ppo)
    clip_eps: float = 0.2  # ε (ppo, grpo)
    group_size: int = 1  # samples per prompt, consecutive rows (rloo, grpo)
    reward_scale: RewardScale = "group"  # grpo: the advantages' std (TRL's scale_rewards)
    grpo_loss: GRPOAggregation = "dapo"  # grpo: the token reduction (TRL's loss_type)
    max_completion_length: int | None = None  # grpo_loss dr_grpo: L of B·L

    def __post_init__(self) -> None:
        if self.kl_placement == "reward" and self.kl_estimator != "k1":
            raise ValueError(
                f"kl_placement reward needs kl_estimator k1 (got {self.kl_estimator}): the "
                "shaped reward is detached, so only k1 gives the sequence-KL penalty"
            )
        if self.kl_placement == "loss" and self.kl_estimator == "k1":
            raise ValueError("kl_estimator k1 in the loss has zero expected gradient")
        if self.algorithm == "grpo" and self.kl_placement != "loss":
            raise ValueError("algorithm grpo puts the KL in its per-token loss (kl_placement loss)")


def rl_returns(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    seq_rewards: Tensor,
    settings: RLLossSettings,
    kl_weights: Tensor | None = None,
) -> Tensor:
    """REINFORCE's returns G_t = r_t + γ·G_{t+1} [B, T] (detached, 0 at padding) of the
    terminal rewards, shaped by −α·w_t·k1_t with ``kl_placement reward``: the returns
    :func:`rl_loss` computes, for a stage that averages them across processes (the baseline)."""
    return discounted_returns(
        _token_rewards(logp, ref_logp, mask, seq_rewards, settings, kl_weights),
        mask,
        settings.gamma,
    )


def _token_rewards(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    seq_rewards: Tensor,
    settings: RLLossSettings,
    kl_weights: Tensor | None,
    penalty: Tensor | None = None,
) -> Tensor:
    """r(x, y) on each row's last token; minus α·w_t·k1_t with the KL in the reward."""
    rewards = terminal_rewards(seq_rewards, mask)
    if settings.kl_placement != "reward":
        return rewards
    if penalty is None:
        penalty = kl_penalty(logp, ref_logp, mask, "k1", kl_weights)
    return shape_rewards_with_kl(rewards, penalty, settings.kl_coef)


def rl_loss(
    log_p: Tensor | None,
    logp: Tensor,
    ref_logp: Tensor,
    ref_log_softmax: Tensor,
    mask: Tensor,
    seq_rewards: Tensor,
    settings: RLLossSettings,
    *,
    values: Tensor | None = None,
    old_logp: Tensor | None = None,
    kl_weights: Tensor | None = None,
    correct: Tensor | None = None,
    token_count: Tensor | None = None,
    baseline: Tensor | None = None,
    advantages: Tensor | None = None,
    metrics: tuple[Tensor, Tensor] | None = None,
    token_entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The RL stage's loss and the figures it logs (module docstring).

    ``log_p`` [B, T, V] is log π_θ(·|s_t) at the sampling temperature and ``logp`` [B, T] its
    value at the sampled tokens, both from one log-softmax with gradient
    (:func:`~tether.objectives.common.log_softmax_and_token_logprobs`); ``ref_logp`` and
    ``ref_log_softmax`` the same for π_ref (no gradient). ``seq_rewards`` [B] the rewards.
    ``values`` [B, T]: the value head's (A2C, PPO); ``old_logp`` [B, T]: the sampling
    policy's (PPO); ``kl_weights`` [B, T]: the prioritised KL's w (None: w = 1); ``correct``
    [B]: the task's checker, logged as ``accuracy``. ``token_count``: N of the token means
    (default Σ m). ``baseline``: REINFORCE's b (default: the mean of :func:`rl_returns` over
    this batch's real tokens). ``advantages`` [B]: GRPO's, computed once over the whole
    rollout (default: :func:`grpo_advantages` of this batch's rewards). ``metrics``: the
    entropy and exact KL per position [B, T], already computed (the stage's chunked pass over a
    large vocabulary); then ``log_p`` may be None, unless the loss itself needs it (the exact
    estimator; an entropy bonus, unless ``token_entropy`` [B, T] gives H with its gradient).

    Stats: those of the policy-gradient and value losses, ``loss``, ``reward``, ``accuracy``,
    ``kl_penalty`` (mean w·KL), ``kl_sampled`` (mean k1), ``entropy``, ``completion_tokens``,
    ``kl_exact`` (mean full-vocabulary KL), ``kl_sequence`` (mean Σ_t k1 per row) and, with
    weights, their distribution (:func:`kl_weight_stats`).
    """
    s = settings
    # the exact KL per position and the entropy: metrics always (one pass, no gradient), and
    # with gradient where they are in the loss (the exact estimator, an entropy bonus)
    bonus_without_h = s.entropy_coef > 0 and token_entropy is None
    if log_p is None and (metrics is None or s.kl_estimator == "exact" or bonus_without_h):
        raise ValueError(
            "rl_loss needs log_p (the full log π) for its metrics, the exact KL or an entropy bonus"
        )
    if metrics is not None:
        entropy_metric, exact = metrics
    else:
        assert log_p is not None
        entropy_metric, exact = entropy_and_exact_kl(log_p, ref_log_softmax)
    if s.kl_estimator == "exact":
        assert log_p is not None
        exact = exact_kl_from_log_softmax(log_p, ref_log_softmax)
        penalty = torch.where(mask > 0, exact, torch.zeros_like(exact))
        if kl_weights is not None:
            penalty = penalty * kl_weights
    else:
        estimator: KLEstimator = s.kl_estimator
        penalty = kl_penalty(logp, ref_logp, mask, estimator, kl_weights)
    rewards = _token_rewards(logp, ref_logp, mask, seq_rewards, s, kl_weights, penalty)

    stats: dict[str, float] = {}
    if s.algorithm == "reinforce":
        returns = discounted_returns(rewards, mask, s.gamma)
        if baseline is None:  # this batch's mean return (a constant, no gradient)
            real = torch.where(mask > 0, returns, torch.zeros_like(returns)).detach()
            baseline = real.sum() / mask.sum().clamp_min(1.0)
        pg, stats = reinforce_loss(logp, (returns - baseline).detach(), mask, token_count)
    elif s.algorithm == "rloo":
        seq_return = (rewards * mask).sum(1)
        pg, stats = reinforce_loss(logp, rloo_baseline(seq_return, s.group_size), mask, token_count)
    elif s.algorithm == "grpo":
        if old_logp is None:
            raise ValueError("algorithm grpo needs the sampling policy's old_logp")
        if advantages is None:
            advantages = grpo_advantages(seq_rewards, s.group_size, s.reward_scale)
        pg, stats = grpo_loss(
            logp,
            old_logp,
            advantages,
            mask,
            s.clip_eps,
            kl=penalty,
            kl_coef=s.kl_coef,
            aggregation=s.grpo_loss,
            max_completion_length=s.max_completion_length,
            token_count=token_count,
        )
    else:
        if values is None:
            raise ValueError(f"algorithm {s.algorithm} needs the value head's values")
        token_advantages, returns = gae(rewards, values, mask, s.gamma, s.gae_lambda)
        if s.algorithm == "a2c":
            pg, stats = reinforce_loss(logp, token_advantages, mask, token_count)
        else:
            if old_logp is None:
                raise ValueError("algorithm ppo needs the sampling policy's old_logp")
            pg, stats = ppo_clip_loss(
                logp, old_logp, token_advantages, mask, s.clip_eps, token_count
            )
        v_loss, v_stats = value_loss(values, returns, mask, token_count=token_count)
        pg = pg + s.value_coef * v_loss
        stats.update(v_stats)

    kl_mean = masked_mean(penalty, mask, token_count)
    loss = pg
    if s.kl_placement == "loss" and s.algorithm != "grpo":  # grpo: inside its per-token loss
        loss = loss + s.kl_coef * kl_mean
    if s.entropy_coef > 0:
        h = token_entropy if log_p is None else entropy_from_log_softmax(log_p)
        assert h is not None
        entropy = masked_mean(h, mask, token_count)
        loss = loss - s.entropy_coef * entropy
    else:  # a metric only: no backward pass through it
        entropy = masked_mean(entropy_metric, mask, token_count)

    with torch.no_grad():
        log_ratio = logp - ref_logp  # k1: unbiased KL(π‖π_ref) per token
        stats["loss"] = float(loss.item())
        stats["reward"] = float(seq_rewards.mean())
        if correct is not None:
            stats["accuracy"] = float(correct.float().mean())
        stats["kl_penalty"] = float(kl_mean.item())
        stats["kl_sampled"] = float(masked_mean(log_ratio, mask, token_count).item())
        stats["entropy"] = float(entropy.item())
        stats["completion_tokens"] = float(mask.sum(1).mean())
        stats["kl_exact"] = float(masked_mean(exact.detach(), mask, token_count))
        stats["kl_sequence"] = float((log_ratio * mask).sum(1).mean())
        if kl_weights is not None:
            stats.update(kl_weight_stats(kl_weights, mask, token_count))
    return loss, stats


# a prioritised-KL weight below this is "off", above KL_WEIGHT_HIGH "fully on" (the training
# monitor warns when almost every token is one or the other)
KL_WEIGHT_LOW = 0.05
KL_WEIGHT_HIGH = 0.95


def kl_weight_stats(
    kl_weights: Tensor, mask: Tensor, token_count: Tensor | None = None
) -> dict[str, float]:
    """How the prioritised KL's weights w [B, T] fall over the real completion tokens:
    ``kl_weight_mean``, ``kl_weight_median`` (this process's tokens; 0 without any), and the
    shares of tokens with w < 0.5 (``kl_weight_below_half``), w < 0.05 (``kl_weight_low``:
    the KL is off there) and w > 0.95 (``kl_weight_high``: fully on). The mean and shares are
    masked means over ``token_count`` tokens (:func:`masked_mean`)."""
    real = kl_weights.detach()[mask > 0]
    return {
        "kl_weight_mean": float(masked_mean(kl_weights, mask, token_count)),
        "kl_weight_median": float(real.float().median()) if real.numel() else 0.0,
        "kl_weight_below_half": float(masked_mean(kl_weights < 0.5, mask, token_count)),
        "kl_weight_low": float(masked_mean(kl_weights < KL_WEIGHT_LOW, mask, token_count)),
        "kl_weight_high": float(masked_mean(kl_weights > KL_WEIGHT_HIGH, mask, token_count)),
    }
