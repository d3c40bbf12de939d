"""The Bayesian view of KL-tethered fine-tuning: target distributions, and what samples say
about them (docs/methods.md §2, §5).

Fine-tuning with a KL tether toward π_ref is inference toward a *target*, an energy-based
model (EBM) known up to its normaliser:

    P(y|x) = π_ref(y|x)·exp(r(x,y)/β)       reward, KL-RL's optimum p* = P/Z (§2);
    P(y|x) = π_ref(y|x)·b(x,y), b ∈ {0, 1}    hard constraint: π_ref conditioned on b = 1;
    P(y|x) = π_ref(y|x)·exp(λ·φ(x,y))        moment constraints E_p[φ] = targets (λ fitted);

p = P/Z with Z(x) = Σ_y P(y|x). Everything here works on *sequence-level* log-values, one per
sampled response y (a 1-D tensor [N]): log P(y), log q(y) (the proposal that drew the sample),
log π(y) (the policy). Sums over tokens of a response are the caller's
(``tether.objectives.preference.sequence_logprobs``).

Three kinds of functions:

- targets: :func:`reward_log_target`, :func:`constraint_log_target`, :func:`moment_log_target`,
  and :func:`fit_moments` (λ by self-normalised importance sampling on the convex dual);
- monitors from samples y ∼ q: :func:`log_z_estimate`, :func:`kl_target_policy`,
  :func:`kl_policy_target`, :func:`kl_policy_ref`, :func:`tv_estimate`, :func:`snis_moments`;
- samplers over a set of candidates drawn from q: :func:`quasi_rejection_sampling`,
  :func:`importance_resample`, :func:`best_of_n`.

Their exact counterparts (sums over an enumerated support) are in :mod:`tether.distributions.exact`.
Math in fp64 where it is cheap (the dual, the weights); inputs of any float dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# ----------------------------------------------------------------------------- targets


def reward_log_target(log_ref: Tensor, reward: Tensor, beta: float) -> Tensor:
    """log P(y) = log π_ref(y) + r(y)/β: the EBM whose normalisation is KL-RL's optimum.

    J(π) = E_π[r] − β·KL(π‖π_ref) = −β·KL(π‖P/Z) + β·log Z, so the policy maximising J is
    p* = P/Z (docs/methods.md §2). β → ∞ gives π_ref, β → 0 collapses onto argmax r.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return log_ref + reward / beta


def constraint_log_target(log_ref: Tensor, satisfied: Tensor) -> Tensor:
    """log P(y) = log π_ref(y) + log b(y), b ∈ {0, 1}: −inf where the constraint fails.

    p = P/Z is π_ref conditioned on b = 1, and Z = π_ref(b = 1): the least π_ref must be moved
    (in KL(p‖π_ref) = −log Z) to satisfy the constraint everywhere.
    """
    b = satisfied.to(log_ref.dtype) if satisfied.dtype == torch.bool else satisfied
    if not bool(((b == 0) | (b == 1)).all()):
        raise ValueError("a hard constraint takes values in {0, 1}")
    return torch.where(b > 0, log_ref, torch.full_like(log_ref, -math.inf))


def moment_log_target(log_ref: Tensor, features: Tensor, lam: Tensor) -> Tensor:
    """log P(y) = log π_ref(y) + λ·φ(y), features [N, F], λ [F]: the moment-constraint EBM.

    With λ from :func:`fit_moments`, p = P/Z is the distribution closest to π_ref in
    KL(p‖π_ref) whose feature means are the targets (the I-projection; GDC's pointwise and
    distributional constraints).
    """
    return log_ref + features.to(log_ref.dtype) @ lam.to(log_ref.dtype)


@dataclass
class MomentFit:
    """What :func:`fit_moments` found: λ, and the SNIS moments it reaches on the samples."""

    lam: Tensor  # [F] float64
    moments: Tensor  # [F] SNIS estimate of E_{P_λ}[φ] on the given samples
    max_error: float  # max_f |moments − targets|
    effective_sample_size: float  # (Σw)² / Σw² of the tilted weights, in samples
    converged: bool  # max_error ≤ tol: the SNIS moments hit the targets


def fit_moments(
    features: Tensor,
    targets: Tensor,
    log_weights: Tensor | None = None,
    tol: float = 1e-9,
) -> MomentFit:
    """λ such that P_λ ∝ π_ref·exp(λ·φ) has feature means ``targets`` (docs/methods.md §5).

    ``features`` [N, F] are φ(y_i) of samples y_i ∼ π_ref (``log_weights=None``), or of samples
    from a proposal q with ``log_weights`` = log π_ref(y_i) − log q(y_i). With
    w_i(λ) = exp(log_weights_i + λ·φ_i), the self-normalised importance-sampling (SNIS) moment
    is m(λ) = Σ w_i φ_i / Σ w_i, and m(λ) = targets is the stationarity condition of the convex
    dual

        g(λ) = log Σ_i exp(log_weights_i + λ·φ_i) − λ·targets,
        ∇g = m(λ) − targets,      ∇²g = SNIS covariance of φ  (positive semi-definite),

    minimised here by a trust-region Newton method (scipy ``trust-exact``). Passing the whole
    enumerated support with ``log_weights = log π_ref`` gives the exact λ. A solution exists when
    the targets lie inside the convex hull of the sample features; a target outside a feature's
    range raises. One on the boundary sends λ toward ±∞: the fit stops at a large λ that meets
    the target within ``tol`` by putting all the weight on the extreme samples (watch
    ``effective_sample_size``).
    """
    from scipy import optimize  # here, not at the top: importing the objectives stays light

    phi = features.detach().to(torch.float64).cpu()
    if phi.dim() == 1:
        phi = phi.unsqueeze(-1)
    mu = targets.detach().to(torch.float64).cpu().reshape(-1)
    if phi.dim() != 2 or phi.shape[1] != mu.shape[0]:
        raise ValueError(
            f"features must be [N, F] with F = len(targets), got {tuple(features.shape)} "
            f"and {tuple(targets.shape)}"
        )
    base = (
        torch.zeros(phi.shape[0], dtype=torch.float64)
        if log_weights is None
        else log_weights.detach().to(torch.float64).cpu()
    )
    seen = torch.isfinite(base)
    lo, hi = phi[seen].amin(0), phi[seen].amax(0)
    if bool(((mu < lo) | (mu > hi)).any()):
        raise ValueError(
            f"moment targets {mu.tolist()} lie outside the range of the sample features "
            f"[{lo.tolist()}, {hi.tolist()}]: no λ reaches them"
        )
    phi_np, base_np, mu_np = phi.numpy(), base.numpy(), mu.numpy()

    def tilted(lam: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        logits = base_np + phi_np @ lam
        top = logits[np.isfinite(logits)].max()
        w = np.exp(logits - top)
        total = w.sum()
        p = w / total
        mean = p @ phi_np
        centred = phi_np - mean
        cov = (centred * p[:, None]).T @ centred
        return float(top + math.log(total)), mean, cov

    def dual(lam: np.ndarray) -> float:
        return tilted(lam)[0] - float(lam @ mu_np)

    def grad(lam: np.ndarray) -> np.ndarray:
        return tilted(lam)[1] - mu_np

    def hess(lam: np.ndarray) -> np.ndarray:
        return tilted(lam)[2]

    start = np.zeros(mu_np.shape[0])
    result = optimize.minimize(
        dual, start, jac=grad, hess=hess, method="trust-exact", options={"gtol": tol * 0.1}
    )
    lam = torch.from_numpy(np.asarray(result.x, dtype=np.float64))
    log_w = base + phi @ lam
    moments = snis_moments(phi, log_w)
    max_error = float((moments - mu).abs().max())
    w = torch.softmax(log_w, dim=0)
    return MomentFit(
        lam=lam,
        moments=moments,
        max_error=max_error,
        effective_sample_size=float(1.0 / w.square().sum()),
        converged=max_error <= tol,
    )


# ----------------------------------------------------------------------------- monitors


def _log_mean_exp(x: Tensor) -> Tensor:
    return torch.logsumexp(x, dim=0) - math.log(x.shape[0])


def _importance_log_weights(log_P: Tensor, log_q: Tensor) -> Tensor:
    """log(P/q) in fp64; a sample the target rules out (log P = −inf) gets weight 0."""
    return log_P.to(torch.float64) - log_q.to(torch.float64)


def log_z_estimate(log_P: Tensor, log_q: Tensor) -> Tensor:
    """log Ẑ with Ẑ = mean_i P(y_i)/q(y_i), y_i ∼ q: unbiased for Z (log Ẑ is biased low).

    Computed as logsumexp(log P − log q) − log N, so P/q over- or underflowing costs nothing.
    """
    return _log_mean_exp(_importance_log_weights(log_P, log_q))


def snis_moments(features: Tensor, log_weights: Tensor) -> Tensor:
    """Σ_i w̄_i φ_i with w̄ = softmax(log_weights): the SNIS estimate of E[φ] under the
    distribution the weights point to. features [N] or [N, F] → [] or [F], fp64.

    Samples from π itself: ``log_weights`` = 0 (a plain mean). Samples from q, moments under
    the target p: ``log_weights`` = log P − log q. Under π from samples of q: log π − log q.
    """
    w = torch.softmax(log_weights.to(torch.float64), dim=0)
    phi = features.to(torch.float64)
    return w @ phi if phi.dim() > 1 else (w * phi).sum()


def kl_target_policy(
    log_P: Tensor, log_q: Tensor, log_pi: Tensor, log_z: Tensor | float | None = None
) -> Tensor:
    """KL(p‖π) from samples y_i ∼ q (docs/methods.md §5):

        KL(p‖π) = E_p[log P − log π] − log Z
                ≈ −log Ẑ + mean_i[(P/q)_i·(log P_i − log π_i)] / Ẑ.

    ``log_z=None`` estimates Ẑ from these samples (the SNIS estimator: consistent, biased at
    small N); a known or better ``log_z`` gives the plain importance-sampling estimator.
    π = q (``log_pi = log_q``) gives KL(p‖q), as the KL-adaptive proposal update compares.
    """
    log_w = _importance_log_weights(log_P, log_q)
    lz = _log_mean_exp(log_w) if log_z is None else torch.as_tensor(log_z, dtype=torch.float64)
    ratio = torch.exp(log_w - lz)  # (P/q)/Z, 0 where P = 0
    gap = torch.where(
        ratio > 0, log_P.to(torch.float64) - log_pi.to(torch.float64), torch.zeros_like(ratio)
    )
    return (ratio * gap).mean() - lz


def kl_policy_target(
    log_pi: Tensor, log_P: Tensor, log_z: Tensor | float, log_q: Tensor | None = None
) -> Tensor:
    """KL(π‖p) = E_π[log π − log P] + log Z, from samples y_i ∼ π (``log_q=None``), or from
    y_i ∼ q with importance weights π/q (plain IS, unbiased).

    ``log_z`` must come from elsewhere (:func:`log_z_estimate` on samples of a proposal covering
    p): samples of π do not see the mass of p that π misses. Infinite if π puts mass where
    P = 0. With the reward target, β·KL(π‖p*) = β·log Z − J(π) (docs/methods.md §2).
    """
    gap = log_pi.to(torch.float64) - log_P.to(torch.float64)
    lz = torch.as_tensor(log_z, dtype=torch.float64)
    if log_q is None:
        return gap.mean() + lz
    ratio = torch.exp(log_pi.to(torch.float64) - log_q.to(torch.float64))
    return (ratio * gap).mean() + lz


def kl_policy_ref(log_pi: Tensor, log_ref: Tensor, log_q: Tensor | None = None) -> Tensor:
    """KL(π‖π_ref) ≈ mean_i[log π(y_i) − log π_ref(y_i)], y_i ∼ π: the sequence-level k1
    (unbiased; can be negative on a batch). With ``log_q``: samples from q, weights π/q."""
    gap = log_pi.to(torch.float64) - log_ref.to(torch.float64)
    if log_q is None:
        return gap.mean()
    return (torch.exp(log_pi.to(torch.float64) - log_q.to(torch.float64)) * gap).mean()


def tv_estimate(
    log_P: Tensor, log_q: Tensor, log_pi: Tensor, log_z: Tensor | float | None = None
) -> Tensor:
    """TV(π, p) = ½·Σ_y |π(y) − p(y)| ≈ ½·mean_i |π_i/q_i − P_i/(Ẑ·q_i)|, y_i ∼ q (docs/methods.md §5).

    Unbiased with the true Z when q covers both π and p; ``log_z=None`` plugs in Ẑ.
    """
    log_w = _importance_log_weights(log_P, log_q)
    lz = _log_mean_exp(log_w) if log_z is None else torch.as_tensor(log_z, dtype=torch.float64)
    pi_over_q = torch.exp(log_pi.to(torch.float64) - log_q.to(torch.float64))
    return 0.5 * (pi_over_q - torch.exp(log_w - lz)).abs().mean()


# ----------------------------------------------------------------------------- samplers


@dataclass
class QRSResult:
    """Outcome of :func:`quasi_rejection_sampling` over N candidates."""

    accepted: Tensor  # [N] bool
    accept_prob: Tensor  # [N] min(1, P/(β·q)), fp64
    acceptance_rate: float  # accepted / N
    clipped_fraction: float  # share of candidates with P/(β·q) > 1: the output departs from p there


def quasi_rejection_sampling(
    log_P: Tensor, log_q: Tensor, beta_qrs: float, rng: torch.Generator | None = None
) -> QRSResult:
    """Quasi-rejection sampling (Eikema, Kruszewski, Dance, Aziz, Dymetman 2022): keep each
    candidate y ∼ q with probability min(1, P(y)/(β·q(y))).

    The kept samples follow p_β(y) ∝ min(q(y), P(y)/β); the acceptance rate is
    Σ_y min(q(y), P(y)/β) = E_q[min(P/q, β)]/β (``tether.distributions.exact.qrs_acceptance_rate`` and
    ``qrs_distribution`` give both exactly). β ≥ max_y P/q makes p_β = p exactly (plain
    rejection sampling) at acceptance Z/β; a smaller β trades fidelity for acceptance, and
    TV(p_β, p) falls monotonically as β grows. P need not be normalised.
    """
    if not beta_qrs > 0:
        raise ValueError(f"beta_qrs must be > 0, got {beta_qrs}")
    log_ratio = _importance_log_weights(log_P, log_q) - math.log(beta_qrs)
    accept_prob = torch.exp(log_ratio.clamp(max=0.0))
    u = torch.rand(accept_prob.shape, generator=rng, dtype=torch.float64)
    accepted = u.to(accept_prob.device) < accept_prob
    n = max(accept_prob.numel(), 1)
    return QRSResult(
        accepted=accepted,
        accept_prob=accept_prob,
        acceptance_rate=float(accepted.sum()) / n,
        clipped_fraction=float((log_ratio > 0).sum()) / n,
    )


def importance_resample(
    log_P: Tensor, log_q: Tensor, n: int, rng: torch.Generator | None = None
) -> Tensor:
    """Sampling-importance-resampling: n indices drawn with replacement, P(i) ∝ P(y_i)/q(y_i).

    With candidates y_i ∼ q, the resampled y follow p as the number of candidates grows (for a
    finite number, a mixture between q and p: an index is biased toward what q over-covers).
    Returns indices [n] into the candidates.
    """
    probs = torch.softmax(_importance_log_weights(log_P, log_q), dim=0)
    return torch.multinomial(probs.cpu(), n, replacement=True, generator=rng).to(log_P.device)


def best_of_n(rewards: Tensor) -> Tensor:
    """Index of the highest reward along the last dim (the first one on ties): [..., N] → [...].

    With the N candidates drawn i.i.d. from q, the pick follows the best-of-N distribution
    (``tether.distributions.infalign.best_of_n_distribution``).
    """
    return rewards.argmax(dim=-1)
