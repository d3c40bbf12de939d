"""Distribution matching: DPG, GDC++ and f-DPG toward a target EBM (docs/methods.md §5).

The target is p = P/Z with P(y|x) known pointwise (``tether.distributions.bayes``: π_ref·exp(r/β), π_ref·b,
π_ref·exp(λ·φ)). The policy π_θ is moved toward p by minimising a divergence with a
score-function gradient over responses y drawn from a proposal q (q = π_θ on-policy).

Every loss takes sequence-level tensors [B], one entry per response:

- ``policy_logp``: log π_θ(y) with grad, summed over the response's tokens
  (``tether.objectives.preference.sequence_logprobs``);
- ``proposal_logp``: log q(y) of the policy that drew y (on-policy: ``policy_logp.detach()``);
- ``log_P``: log P(y), the unnormalised target (−inf where a hard constraint fails);
- ``log_z``: an estimate of log Z (``tether.distributions.bayes.log_z_estimate`` over many samples, or the
  exact value on an enumerable space); ``None`` estimates it from this batch,
  log Ẑ = log mean(P/q), which makes the weights self-normalised (consistent, biased at
  small B).

and returns ``(loss, stats)`` where ∇loss is the estimator: the loss is −mean_i(A_i·log π_θ(y_i))
with a detached A_i, so its value means nothing, its gradient is what is estimated. Math in
fp64 for the weights, the loss in the dtype of ``policy_logp`` (at least fp32).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tether.distributions.bayes import kl_target_policy
from tether.objectives.common import at_least_fp32

FDivergence = Literal["forward_kl", "reverse_kl", "jensen_shannon", "total_variation"]
F_DIVERGENCES: tuple[FDivergence, ...] = (
    "forward_kl",
    "reverse_kl",
    "jensen_shannon",
    "total_variation",
)
FDPGBaseline = Literal["none", "mean", "loo"]
FDPG_BASELINES: tuple[FDPGBaseline, ...] = ("none", "mean", "loo")


def _batch_log_z(log_P: Tensor, log_q: Tensor, log_z: Tensor | float | None) -> Tensor:
    """The log Z to use, fp64 and detached: the given one, or log mean(P/q) over the batch."""
    if log_z is not None:
        return torch.as_tensor(log_z, dtype=torch.float64, device=log_P.device).detach()
    log_w = log_P.detach().double() - log_q.detach().double()
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def _weight_stats(weights: Tensor) -> dict[str, float]:
    """Mean and effective sample size fraction (Σw)²/(B·Σw²) ∈ (0, 1] of importance weights."""
    total = weights.sum()
    ess = total.square() / (weights.numel() * weights.square().sum()).clamp_min(1e-300)
    return {"importance_weight_mean": float(weights.mean()), "ess_fraction": float(ess)}


def dpg_loss(
    policy_logp: Tensor,
    proposal_logp: Tensor,
    log_P: Tensor,
    log_z: Tensor | float | None = None,
    *,
    baseline: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """DPG, the forward-KL gradient (Parshakova et al. 2019; Khalifa et al. 2021):

        ∇_θ KL(p‖π_θ) = −Σ_y p(y)·∇log π_θ(y) = −E_{y∼q}[(P(y)/q(y))/Z · ∇log π_θ(y)],

    so L = −mean_i(w_i·log π_θ(y_i)) with w_i = P(y_i)/(Z·q(y_i)) detached, and E_q[∇L] is
    exactly ∇KL(p‖π_θ). On-policy (q = π_θ) the weight is P/(Z·π_θ).

    ``baseline=True`` is GDC++ (Korbak et al. 2022): the advantage P/q − Z·π_θ/q (off-policy),
    P/π_θ − Z (on-policy), here divided by Z like the weight:

        A_i = P(y_i)/(Z·q(y_i)) − π_θ(y_i)/q(y_i).

    The subtracted term has mean E_q[(π_θ/q)·∇log π_θ] = ∇Σ_y π_θ(y) = 0, so the estimator
    stays unbiased (with the true Z) and its variance drops where π_θ ≈ p. Dividing by Z keeps
    the gradient equal to ∇KL(p‖π_θ) itself, not Z times it (a step-size rescaling).

    Stats: ``dpg_loss``; ``log_z`` used; ``importance_weight_mean`` (mean P/(Z·q), ≈ 1 when Z
    is right) and ``ess_fraction`` of the weights P/q; ``policy_proposal_ratio_mean``
    (mean π_θ/q, ≈ 1); ``kl_target_policy``, the importance-sampling estimate of KL(p‖π_θ).
    """
    logp = at_least_fp32(policy_logp)
    log_q = proposal_logp.detach().double()
    log_target = log_P.detach().double()
    lz = _batch_log_z(log_target, log_q, log_z)
    weights = torch.exp(log_target - log_q - lz)  # p/q, 0 where P = 0
    pi_over_q = torch.exp(logp.detach().double() - log_q)
    advantages = weights - pi_over_q if baseline else weights
    loss = -(advantages.to(logp.dtype) * logp).mean()
    stats = {
        "dpg_loss": float(loss.detach()),
        "log_z": float(lz),
        **_weight_stats(weights),
        "policy_proposal_ratio_mean": float(pi_over_q.mean()),
        "kl_target_policy": float(kl_target_policy(log_target, log_q, logp.detach(), lz)),
    }
    return loss, stats


def kl_adaptive_proposal_update(
    log_P: Tensor,
    proposal_logp: Tensor,
    policy_logp: Tensor,
    log_z: Tensor | float | None = None,
) -> tuple[bool, dict[str, float]]:
    """Off-policy DPG's proposal update (Khalifa et al. 2021; GDC++): replace q by π_θ when
    π_θ is the closer of the two to the target, KL(p‖π_θ) < KL(p‖q).

    Both KLs are estimated on the same samples y_i ∼ q with the same log Z
    (``tether.distributions.bayes.kl_target_policy``), so their difference is the SNIS/IS estimate of
    E_p[log q − log π_θ], free of Z's own error. Returns (update?, stats with both estimates).
    """
    log_q = proposal_logp.detach().double()
    log_target = log_P.detach().double()
    lz = _batch_log_z(log_target, log_q, log_z)
    kl_policy = kl_target_policy(log_target, log_q, policy_logp.detach().double(), lz)
    kl_proposal = kl_target_policy(log_target, log_q, log_q, lz)
    update = bool(kl_policy < kl_proposal)
    stats = {
        "kl_target_policy": float(kl_policy),
        "kl_target_proposal": float(kl_proposal),
        "proposal_updated": float(update),
    }
    return update, stats


def f_dpg_pseudo_reward(
    policy_logp: Tensor, log_P: Tensor, log_z: Tensor | float, divergence: FDivergence
) -> Tensor:
    """The pseudo-reward R = −f′(π_θ/p) of f-DPG (Go et al. 2023), fp64, detached.

    D_f(π_θ‖p) = Σ_y p(y)·f(π_θ(y)/p(y)) has gradient Σ_y f′(π_θ/p)·∇π_θ
    = −E_{π_θ}[R·∇log π_θ]: a policy gradient with reward R. With t = π_θ/p = Z·π_θ/P:

    - ``forward_kl``, KL(p‖π_θ):  f(t) = −log t,    R = 1/t = p/π_θ;
    - ``reverse_kl``, KL(π_θ‖p):  f(t) = t·log t,   R = −log t − 1 = log(p/π_θ) − 1;
    - ``jensen_shannon``:  f(t) = ½[t·log(2t/(1 + t)) + log(2/(1 + t))],
      R = ½·log((1 + t)/(2t));
    - ``total_variation``:  f(t) = ½|t − 1|,   R = −½·sign(t − 1).

    JS here is ½KL(π‖m) + ½KL(p‖m), m = (π+p)/2, in [0, log 2]; without the ½ (2·JS, as some
    write it) R doubles: a step-size rescaling. With P = π_ref·exp(r/β), β·R of the reverse KL
    is r − β·log(π_θ/π_ref) − β(log Z + 1): the KL-shaped reward of KL-RL (docs/methods.md §2) up to
    a constant, so reverse-KL f-DPG *is* KL-RL, its gradient −(1/β)·∇J. It is infinite where
    P = 0 < π_θ (a hard constraint), which raises; JS and TV stay bounded there.
    """
    if divergence not in F_DIVERGENCES:
        raise ValueError(f"unknown f-divergence {divergence!r}: choose one of {F_DIVERGENCES}")
    lz = torch.as_tensor(log_z, dtype=torch.float64, device=log_P.device)
    log_t = policy_logp.detach().double() - log_P.detach().double() + lz  # log(π_θ/p)
    if divergence == "forward_kl":
        return torch.exp(-log_t)
    if divergence == "reverse_kl":
        if bool(torch.isinf(log_t).any()):
            raise ValueError(
                "reverse-KL f-DPG: a sample with P = 0 makes KL(π‖p) infinite; use "
                "jensen_shannon, total_variation or forward_kl with a hard constraint"
            )
        return -log_t - 1.0
    if divergence == "jensen_shannon":
        # ½·log((1 + t)/(2t)) = ½·(log(1 + 1/t) − log 2); bounded: → −½·log 2 as t → ∞
        return 0.5 * (F.softplus(-log_t) - math.log(2.0))
    return -0.5 * torch.sign(log_t)


def f_dpg_loss(
    policy_logp: Tensor,
    proposal_logp: Tensor,
    log_P: Tensor,
    log_z: Tensor | float | None = None,
    divergence: FDivergence = "jensen_shannon",
    baseline: FDPGBaseline = "none",
) -> tuple[Tensor, dict[str, float]]:
    """f-DPG (Go et al. 2023): minimise D_f(π_θ‖p) with the pseudo-reward of
    :func:`f_dpg_pseudo_reward` (JS is the recommended default):

        ∇_θ D_f(π_θ‖p) = −E_{y∼q}[(π_θ(y)/q(y))·(R(y) − b)·∇log π_θ(y)],

    so L = −mean_i(ρ_i·(R_i − b_i)·log π_θ(y_i)), ρ = π_θ/q (1 on-policy), all detached.
    A constant b adds E_q[ρ·∇log π_θ] = ∇Σπ_θ = 0, so any baseline not depending on the sample
    itself keeps the estimator unbiased:

    - ``"none"``: b = 0;
    - ``"loo"``: b_i = Σ_{j≠i} ρ_j R_j / Σ_{j≠i} ρ_j, the leave-one-out (self-normalised)
      estimate of E_π[R]; on-policy, mean_{j≠i} R_j as in RLOO. Unbiased;
    - ``"mean"``: the same over the whole batch, i included (a bias of order 1/B).

    ``forward_kl`` is DPG: ρ·R = p/q, the weight of :func:`dpg_loss`. ``reverse_kl`` times β
    is KL-RL's REINFORCE with the k1-shaped reward (``f_dpg_pseudo_reward``).

    Stats: ``f_dpg_loss``; ``pseudo_reward_mean`` (the SNIS estimate of E_π[R]);
    ``policy_proposal_ratio_mean`` (mean π_θ/q); ``log_z`` used; ``ess_fraction`` of π_θ/q.
    """
    if baseline not in FDPG_BASELINES:
        raise ValueError(f"unknown f-DPG baseline {baseline!r}: choose one of {FDPG_BASELINES}")
    logp = at_least_fp32(policy_logp)
    log_q = proposal_logp.detach().double()
    lz = _batch_log_z(log_P, log_q, log_z)
    reward = f_dpg_pseudo_reward(logp, log_P, lz, divergence)
    rho = torch.exp(logp.detach().double() - log_q)
    weighted = rho * reward
    if baseline == "none":
        b = torch.zeros_like(reward)
    elif baseline == "mean":
        b = (weighted.sum() / rho.sum()).expand_as(reward)
    else:
        if reward.numel() < 2:
            raise ValueError("the leave-one-out baseline needs at least 2 samples")
        b = (weighted.sum() - weighted) / (rho.sum() - rho).clamp_min(1e-300)
    advantages = rho * (reward - b)
    loss = -(advantages.to(logp.dtype) * logp).mean()
    stats = {
        "f_dpg_loss": float(loss.detach()),
        "pseudo_reward_mean": float(weighted.sum() / rho.sum()),
        "policy_proposal_ratio_mean": float(rho.mean()),
        "ess_fraction": _weight_stats(rho)["ess_fraction"],
        "log_z": float(lz),
    }
    return loss, stats
