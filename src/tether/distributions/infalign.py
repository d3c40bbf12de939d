"""InfAlign / CTRL: align for the decoding that will be used (docs/methods.md §8).

Balashankar et al. 2024, "InfAlign: Inference-aware language model alignment", arXiv 2412.19792.
When a model is decoded by best-of-N (pick the highest-reward of N samples) or attacked by
worst-of-N ("best-of-N jailbreaking": the lowest-reward of N), what matters is the win rate of
the *decoded* output against π_ref decoded the same way, not the win rate of a plain sample.
CTRL (calibrate-and-transform RL) gets there in three steps:

1. **Calibrate** (:func:`calibrate`): replace r(x, y) by its mid-rank among K cached rewards of
   reference samples for the same prompt,
       C(x, y) = (#{k: r_k < r} + ½·#{k: r_k = r}) / K  ∈ [0, 1].
   Under π_ref, C is uniform (exactly so for continuous rewards and K → ∞; E[C] = ½ for any
   reward distribution), and C is unchanged by any strictly increasing map of the reward, so
   the reward model's scale and drift across prompts stop mattering.
2. **Transform** (:func:`transform`): Φ(C) = C (standard win rate), e^{t·C} (best-of-N),
   −e^{−t·C} (worst-of-N), or log C with β = 1/(N − 1), whose KL-RL optimum is the best-of-N
   distribution itself (see :func:`best_of_n_distribution` for when that is exact).
3. **KL-regularised RL** on Φ(C) with any estimator of docs/methods.md §2.

Evaluation: the inference-time win rate, from samples (:func:`win_rate_mc`), or with much less
variance from the two empirical reward distributions (:func:`win_rate_bon_from_cdf`), or
exactly on an enumerable space (:func:`win_rate_exact`). Ties score ½ everywhere.

Everything here is torch, float64 where it computes probabilities, and carries no gradient:
the calibrated reward is a rank, a constant of the policy-gradient estimator.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

DecodeMode = Literal["best", "worst"]
DECODE_MODES: tuple[DecodeMode, ...] = ("best", "worst")
TransformKind = Literal["identity", "log", "exp", "neg_exp"]
TRANSFORMS: tuple[TransformKind, ...] = ("identity", "log", "exp", "neg_exp")


def _check_mode(mode: str) -> None:
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decoding mode {mode!r}: choose one of {DECODE_MODES}")


def _check_n(n: int) -> int:
    if int(n) != n or n < 1:
        raise ValueError(f"N must be a positive integer, got {n}")
    return int(n)


def _no_nan(*tensors: Tensor) -> None:
    for x in tensors:
        if torch.isnan(x).any():
            raise ValueError("rewards must not be NaN")


# ----------------------------------------------------------------------------- 1. calibration


def _rank_counts(values: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """(#{ref < v}, #{ref ≤ v}) per value, counted by binary search in the sorted reference.

    ``reference`` [..., K] and ``values`` [..., M] share their leading dims.
    """
    sorted_ref = reference.sort(dim=-1).values.contiguous()
    values = values.contiguous()
    below = torch.searchsorted(sorted_ref, values, right=False)
    at_or_below = torch.searchsorted(sorted_ref, values, right=True)
    return below, at_or_below


def calibrate(reward: Tensor, reference_rewards: Tensor) -> Tensor:
    """Mid-rank calibration against K cached reference rewards of the same prompt:

        C(x, y) = (#{k: r_ref,k < r} + ½·#{k: r_ref,k = r}) / K  ∈ [0, 1].

    ``reward`` [B] (one response per prompt) or [B, M] (M responses per prompt);
    ``reference_rewards`` [B, K], rewards of K samples from π_ref for each prompt.
    Returns C with the shape of ``reward``, float32 (float64 when either input is float64),
    no gradient.

    Why mid-rank: the fraction of reference samples the response beats, ties counted ½, is the
    response's standard win rate against π_ref; it is uniform under π_ref (a fresh reference
    sample is exchangeable with the K cached ones, so, over the draw of all K + 1, it lands in
    each of the K + 1 gaps with probability 1/(K + 1) when rewards are continuous, and
    E[C] = ½ exactly for any reward distribution); a strictly increasing map of the reward
    leaves every comparison, and so C, unchanged. The K cached rewards calibrated against themselves give exactly the grid
    {(i + ½)/K : i = 0..K−1} when they are distinct.
    """
    if reference_rewards.dim() != 2:
        raise ValueError(
            f"reference_rewards must be [B, K], got shape {tuple(reference_rewards.shape)}"
        )
    batch, k = reference_rewards.shape
    if k < 1:
        raise ValueError("calibration needs at least one reference reward per prompt")
    if reward.dim() not in (1, 2) or reward.shape[0] != batch:
        raise ValueError(
            f"reward must be [B] or [B, M] with B = {batch}, got shape {tuple(reward.shape)}"
        )
    _no_nan(reward, reference_rewards)
    out_dtype = (
        torch.float64 if torch.float64 in (reward.dtype, reference_rewards.dtype) else torch.float32
    )
    with torch.no_grad():
        values = reward.detach().to(torch.float64)
        values = values.unsqueeze(-1) if reward.dim() == 1 else values
        reference = reference_rewards.detach().to(device=values.device, dtype=torch.float64)
        below, at_or_below = _rank_counts(values, reference)
        c = (below + at_or_below).to(torch.float64) / (2.0 * k)  # (#< + ½#=)/K
        c = c.squeeze(-1) if reward.dim() == 1 else c
        return c.to(out_dtype)


# ----------------------------------------------------------------------------- 2. transforms


def transform(
    c: Tensor, kind: TransformKind, t: float | None = None, *, log_floor: float = 1e-6
) -> Tensor:
    """Φ(C), the reward CTRL maximises under the KL tether (docs/methods.md §8, step 2):

    - ``"identity"``: Φ = C, for the standard win rate (N = 1);
    - ``"log"``: Φ = log max(C, ``log_floor``); with β = 1/(N − 1) the KL-RL optimum is
      π_ref·C^{N−1}/Z, the best-of-N distribution (exact in the continuous limit: see
      :func:`best_of_n_distribution`). C = 0 (a reward below all K references) would give
      −∞: the floor guards it. A principled floor is 1/(2K), half a rank below the lowest
      reference;
    - ``"exp"``: Φ = e^{t·C}, for best-of-N (:func:`default_t`, :func:`optimise_t`);
    - ``"neg_exp"``: Φ = −e^{−t·C}, for worst-of-N.

    Only differences and the ratio to β matter: e^{t·C} and e^{t·(C−1)} = e^{−t}·e^{t·C} give
    the same optimum at β and e^{−t}·β. Elementwise, same dtype as ``c``.
    """
    if kind == "identity":
        return c
    if kind == "log":
        if not log_floor > 0:
            raise ValueError(f"log_floor must be > 0, got {log_floor}")
        return torch.log(c.clamp_min(log_floor))
    if kind in ("exp", "neg_exp"):
        if t is None or not t > 0:
            raise ValueError(f"the {kind!r} transform needs a t > 0, got {t}")
        return torch.exp(t * c) if kind == "exp" else -torch.exp(-t * c)
    raise ValueError(f"unknown transform {kind!r}: choose one of {TRANSFORMS}")


def transform_for(mode: DecodeMode) -> TransformKind:
    """The exponential transform that goes with a decoding: ``"exp"`` for best-of-N,
    ``"neg_exp"`` for worst-of-N."""
    _check_mode(mode)
    return "exp" if mode == "best" else "neg_exp"


def default_t(n: int, mode: DecodeMode = "best") -> float:
    """t = 2N − 1 for both best-of-N (e^{t·C}) and worst-of-N (−e^{−t·C}) (docs/methods.md §8:
    "near π_ref a good t is about 2N − 1 (derived; the paper tunes t per N and KL budget)").

    The derivation, in the calibrated model (C ∼ U(0, 1) under π_ref; the policy's C has
    density g = 1 + ε·h near π_ref, ∫h = 0): the best-of-N win rate is
    W = ∫ N·G^{N−1}·g·c^N dc, and to first order in ε, after an integration by parts,
    W − ½ = ε·N²/(2N − 1)·∫ c^{2N−1}·h(c) dc, while KL ≈ ½ε²·Var(h). At a fixed small KL the
    best h is therefore ∝ c^{2N−1} − 1/(2N), i.e. Φ(C) = C^{2N−1} = e^{(2N−1)·log C}, and
    e^{t·C} with t = 2N − 1 matches it to first order at C = 1, where best-of-N decides. For
    worst-of-N the mirror image C → 1 − C gives Φ = −(1 − C)^{2N−1} ≈ −e^{−(2N−1)·C} near 0.
    (The t maximising the correlation of e^{t·C} with C^{2N−1} is a little above, ≈ 2N, at a
    correlation ≥ 0.998 either way: :func:`optimise_t` with ``kl_budget=None``.)
    """
    _check_mode(mode)
    return float(2 * _check_n(n) - 1)


# ----------------------------------------------------------------------------- 3. best/worst of N


def _geometric_sum(upper: Tensor, lower: Tensor, n: int) -> Tensor:
    """Σ_{k=0}^{N−1} upper^k·lower^{N−1−k} = (upper^N − lower^N)/(upper − lower), with no
    cancellation when upper ≈ lower (and = N·upper^{N−1} when they are equal)."""
    k = torch.arange(n, dtype=upper.dtype, device=upper.device)
    return (upper.unsqueeze(-1) ** k * lower.unsqueeze(-1) ** (n - 1 - k)).sum(-1)


def best_of_n_distribution(p: Tensor, reward: Tensor, n: int) -> Tensor:
    """The exact distribution of best-of-N: draw Y_1..Y_N i.i.d. from the categorical ``p``,
    return the one with the highest reward; among samples tied at the highest reward, one
    picked uniformly at random (or the first drawn, as :func:`tether.distributions.bayes.best_of_n`
    picks: the same distribution, by exchangeability).

    With F(y) = P(R ≤ r_y), F⁻(y) = P(R < r_y) and the level mass p_L(y) = F − F⁻:
    P(max reward = r_y) = F^N − F⁻^N, and by exchangeability the tie-break gives the outcomes
    of a level in proportion to p, so

        P_bon(y) = p(y)·(F^N − F⁻^N)/p_L = p(y)·Σ_{k=0}^{N−1} F^k·F⁻^{N−1−k}
                 = p(y)·N·E[U^{N−1}],   U ∼ Uniform(F⁻(y), F(y)).

    The last form is the exact link to InfAlign's log transform: C(y) = E[U] is the mid-rank
    calibration, and the KL-RL optimum for reward log C at β = 1/(N − 1) is
    π_ref·C^{N−1}/Z, which puts (E U)^{N−1} where best-of-N has E[U^{N−1}]. They agree
    exactly for N ≤ 2 (whatever the ties: for N = 2, F + F⁻ = 2C and Z = E[C] = ½), and in the
    continuous limit (p_L → 0) for every N; on atoms the relative gap is
    (N − 1)(N − 2)/24·(p_L/C)² + O(p_L⁴) (Jensen: C^{N−1} ≤ E[U^{N−1}]).

    ``p`` (probabilities) and ``reward`` [V], e.g. over an enumerated response space
    (:mod:`tether.distributions.exact`); returns [V] in float64, summing to 1. The reward levels
    are sorted once, O(V log V): the whole space of exact mode, not only toys.
    """
    n = _check_n(n)
    prob = p.to(torch.float64)
    r = reward.to(device=prob.device, dtype=torch.float64)
    _no_nan(r)
    levels, level_of = torch.unique(r, return_inverse=True)  # levels sorted ascending
    level_mass = torch.zeros_like(levels).index_add_(0, level_of, prob)  # p_L of each level
    below = torch.cat([level_mass.new_zeros(1), level_mass.cumsum(0)[:-1]])  # F⁻ = P(R < level)
    upper = (below + level_mass).clamp(0.0, 1.0)  # F = P(R ≤ level)
    return prob * _geometric_sum(upper, below, n)[level_of]


def pick_of_n(rewards: Tensor, mode: DecodeMode) -> Tensor:
    """The decoded reward of each group of N: max (best-of-N) or min (worst-of-N) over the
    last dim, ``rewards`` [..., N] → [...]."""
    _check_mode(mode)
    return rewards.amax(dim=-1) if mode == "best" else rewards.amin(dim=-1)


# ----------------------------------------------------------------------------- 4. win rates


class WinRate(NamedTuple):
    """A Monte-Carlo win rate: the mean score and its standard error over ``games`` games."""

    rate: float
    stderr: float
    games: int


def win_scores(rewards_policy: Tensor, rewards_ref: Tensor) -> Tensor:
    """Per-game score: 1 if the policy's reward is higher, ½ on a tie, 0 if lower (float64)."""
    _no_nan(rewards_policy, rewards_ref)
    a = rewards_policy.to(torch.float64)
    b = rewards_ref.to(torch.float64)
    return (a > b).to(torch.float64) + 0.5 * (a == b).to(torch.float64)


def win_rate_mc(rewards_policy: Tensor, rewards_ref: Tensor) -> WinRate:
    """Monte-Carlo win rate over paired games, ties ½: mean of :func:`win_scores`.

    ``rewards_policy`` and ``rewards_ref`` broadcast together; game i opposes the policy's
    ``rewards_policy[i]`` and the reference's ``rewards_ref[i]`` (same prompt). For the
    inference-time win rate pass the decoded rewards, ``pick_of_n(rewards [..., N], mode)``
    of N fresh samples of each model per game. The standard error is sd/√games (0 for one game).
    """
    scores = win_scores(rewards_policy, rewards_ref).reshape(-1)
    games = scores.numel()
    if games == 0:
        raise ValueError("no games to score")
    stderr = float(scores.std(unbiased=True) / math.sqrt(games)) if games > 1 else 0.0
    return WinRate(rate=float(scores.mean()), stderr=stderr, games=games)


def _win_rate_weighted(
    values_policy: Tensor,
    weights_policy: Tensor,
    values_ref: Tensor,
    weights_ref: Tensor,
    n: int,
    mode: DecodeMode,
) -> Tensor:
    """P(decoded π beats decoded π_ref) + ½·P(tie) for two discrete reward distributions given
    as weighted atoms ([..., M] and [..., K], same leading dims; weights ≥ 0, normalised here).

    Policy side: atoms sorted by value with cumulative weights W_{i−1} < W_i; the max of N
    draws is atom i (ties between equal values broken by the sort order, which changes no
    value) with probability W_i^N − W_{i−1}^N, the min with (1 − W_{i−1})^N − (1 − W_i)^N.
    Reference side, at a value v: F⁻ = P(R < v), F = P(R ≤ v) by binary search; then
    best:  P(max_ref < v) + ½·P(max_ref = v) = ½·(F⁻^N + F^N),
    worst: P(min_ref < v) + ½·P(min_ref = v) = 1 − ½·((1 − F⁻)^N + (1 − F)^N).
    """
    vp, order = values_policy.to(torch.float64).sort(dim=-1)
    wp = weights_policy.to(torch.float64).gather(-1, order)
    wp = wp / wp.sum(dim=-1, keepdim=True)
    cum_p = torch.nn.functional.pad(wp.cumsum(dim=-1), (1, 0)).clamp(0.0, 1.0)
    lower, upper = cum_p[..., :-1], cum_p[..., 1:]

    vr, order_r = values_ref.to(torch.float64).sort(dim=-1)
    wr = weights_ref.to(torch.float64).gather(-1, order_r)
    wr = wr / wr.sum(dim=-1, keepdim=True)
    cum_r = torch.nn.functional.pad(wr.cumsum(dim=-1), (1, 0)).clamp(0.0, 1.0)
    below_idx = torch.searchsorted(vr.contiguous(), vp.contiguous(), right=False)
    at_or_below_idx = torch.searchsorted(vr.contiguous(), vp.contiguous(), right=True)
    f_below = cum_r.gather(-1, below_idx)
    f_at_or_below = cum_r.gather(-1, at_or_below_idx)

    if mode == "best":
        pmf = upper**n - lower**n
        beaten = 0.5 * (f_below**n + f_at_or_below**n)
    else:
        pmf = (1.0 - lower) ** n - (1.0 - upper) ** n
        beaten = 1.0 - 0.5 * ((1.0 - f_below) ** n + (1.0 - f_at_or_below) ** n)
    return (pmf * beaten).sum(dim=-1)


def win_rate_bon_from_cdf(
    policy_rewards: Tensor, ref_rewards: Tensor, n: int, mode: DecodeMode = "best"
) -> Tensor:
    """Inference-time win rate from the two empirical reward distributions, computed exactly:

        W = P(decode_N(π) beats decode_N(π_ref)) + ½·P(tie),

    where decode_N picks the best (``mode="best"``) or worst (``"worst"``) of N i.i.d. draws
    from the *empirical* distribution of the given rewards: the max of N has CDF F̂^N, the min
    survival (1 − F̂⁻)^N. Rather than spending N samples per game (:func:`win_rate_mc` gets
    M/N games from M samples), every N-subset (with replacement) of the M policy and K
    reference samples plays every other: the same samples, far less variance. It is the
    plug-in (V-statistic) estimator: consistent, with an O(N/M) bias from drawing with
    replacement.

    ``policy_rewards`` [M] and ``ref_rewards`` [K] (one prompt) → a 0-dim tensor, or
    [B, M] and [B, K] (per prompt) → [B]; average over prompts yourself. float64, no grad.
    N = 1 is the standard win rate (:func:`standard_win_rate`).
    """
    n = _check_n(n)
    _check_mode(mode)
    if policy_rewards.dim() != ref_rewards.dim() or policy_rewards.dim() not in (1, 2):
        raise ValueError(
            "policy_rewards and ref_rewards must both be [M] and [K], or [B, M] and [B, K]; "
            f"got {tuple(policy_rewards.shape)} and {tuple(ref_rewards.shape)}"
        )
    if policy_rewards.shape[:-1] != ref_rewards.shape[:-1]:
        raise ValueError(
            f"different numbers of prompts: {policy_rewards.shape[0]} and {ref_rewards.shape[0]}"
        )
    if policy_rewards.shape[-1] == 0 or ref_rewards.shape[-1] == 0:
        raise ValueError("need at least one reward on each side")
    _no_nan(policy_rewards, ref_rewards)
    with torch.no_grad():
        p = policy_rewards.detach().to(torch.float64)
        r = ref_rewards.detach().to(device=p.device, dtype=torch.float64)
        return _win_rate_weighted(p, torch.ones_like(p), r, torch.ones_like(r), n, mode)


def standard_win_rate(policy_rewards: Tensor, ref_rewards: Tensor) -> Tensor:
    """The plain-sampling win rate (N = 1) from the empirical distributions: the mean over
    policy samples of their mid-rank calibration against the reference rewards."""
    return win_rate_bon_from_cdf(policy_rewards, ref_rewards, 1, "best")


def win_rate_exact(
    p_policy: Tensor, p_ref: Tensor, reward: Tensor, n: int, mode: DecodeMode = "best"
) -> Tensor:
    """The exact inference-time win rate on an enumerable space: outcomes y with rewards
    ``reward`` [..., V], π = ``p_policy`` and π_ref = ``p_ref`` [..., V] (ties ½). float64."""
    n = _check_n(n)
    _check_mode(mode)
    _no_nan(reward)
    r = reward.to(torch.float64)
    return _win_rate_weighted(r, p_policy, r, p_ref, n, mode)


# ----------------------------------------------------------------------------- choosing t


def _calibrated_grid(grid: int) -> Tensor:
    """The calibrated model on a grid: π_ref uniform over G atoms at C = (i + ½)/G."""
    if grid < 2:
        raise ValueError(f"grid must be at least 2, got {grid}")
    return (torch.arange(grid, dtype=torch.float64) + 0.5) / grid


def _standardised(phi: Tensor) -> Tensor:
    """(Φ − mean)/sd under the uniform grid: the KL-RL optimum depends on Φ only through
    Φ/β, so this fixes the scale for the root-finder and cannot overflow."""
    centred = phi - phi.mean()
    sd = centred.square().mean().sqrt()
    if not sd > 0:
        raise ValueError("the transform is constant on the grid: t is too large or too small")
    return centred / sd


def _tilt(phi: Tensor, strength: float) -> Tensor:
    """log π on the grid for the KL-RL optimum π ∝ π_ref·exp(strength·Φ), π_ref uniform."""
    return torch.log_softmax(strength * phi, dim=-1)


def _kl_to_uniform(log_pi: Tensor) -> float:
    grid = log_pi.shape[-1]
    return float((log_pi.exp() * (log_pi + math.log(grid))).sum())


def _strength_for_kl(phi: Tensor, kl_budget: float) -> float:
    """The tilt strength 1/β whose optimum has KL(π‖π_ref) = ``kl_budget`` (KL grows with it)."""
    from scipy.optimize import brentq

    sup = math.log(phi.shape[-1])  # the KL of a point mass: the budget must stay below it
    if not 0 < kl_budget < sup:
        raise ValueError(f"kl_budget must be in (0, log(grid) = {sup:.3g}), got {kl_budget}")
    hi = 2.0 * math.sqrt(2.0 * kl_budget)  # KL ≈ ½·strength² for a standardised Φ
    while _kl_to_uniform(_tilt(phi, hi)) < kl_budget:
        hi *= 2.0
        if hi > 1e12:
            raise ValueError(f"kl_budget {kl_budget} is out of reach of this transform")
    return float(brentq(lambda s: _kl_to_uniform(_tilt(phi, s)) - kl_budget, 0.0, hi, xtol=1e-12))


class CalibratedOptimum(NamedTuple):
    """CTRL's optimum in the calibrated model at a KL budget (:func:`calibrated_win_rate`)."""

    win_rate: float  # inference-time win rate against π_ref decoded the same way, ties ½
    beta: float  # the KL coefficient β that reaches the budget with Φ exactly as transform() gives


def _phi(c: Tensor, kind: TransformKind, t: float | None) -> Tensor:
    """Φ on the grid, shifted where that avoids overflow: e^{t·(C−1)} for ``"exp"``
    (= e^{−t}·e^{t·C}, the same optimum at β·e^{−t})."""
    return transform(c - 1.0, kind, t) if kind == "exp" else transform(c, kind, t)


def calibrated_win_rate(
    n: int,
    mode: DecodeMode,
    kind: TransformKind,
    t: float | None,
    kl_budget: float,
    grid: int = 2048,
) -> CalibratedOptimum:
    """Inference-time win rate of CTRL's optimum in the calibrated model, at a KL budget.

    The model (InfAlign's reduction): under π_ref the calibrated reward is C ∼ U(0, 1), here
    a grid of G equiprobable atoms C_i = (i + ½)/G; the KL-RL optimum for Φ = ``transform``
    at strength β is π ∝ π_ref·exp(Φ(C)/β), with β solved so that KL(π‖π_ref) =
    ``kl_budget`` (nats). Its decoded (``mode``) win rate against π_ref, ties ½, is exact on
    the grid (:func:`win_rate_exact`); the grid differs from the continuous model only when
    both decodes land on the same atom (probability O(1/G), scored ½). Every prompt maps to
    this one model, so the figure holds for any reward model with continuous rewards.
    ``beta`` is for Φ exactly as :func:`transform` gives it (it overflows to inf for e^{t·C}
    with t ≳ 700).
    """
    n = _check_n(n)
    _check_mode(mode)
    c = _calibrated_grid(grid)
    phi = _phi(c, kind, t)
    sd = float((phi - phi.mean()).square().mean().sqrt())
    strength = _strength_for_kl(_standardised(phi), kl_budget)
    pi = _tilt(_standardised(phi), strength).exp()
    rate = float(win_rate_exact(pi, torch.full_like(c, 1.0 / grid), c, n, mode))
    # π ∝ exp(strength·(Φ − m)/sd) = exp(Φ/β) with β = sd/strength; undo the e^{−t} shift
    beta = sd / strength
    if kind == "exp":
        assert t is not None
        beta = beta * math.exp(t) if t < 700 else math.inf
    return CalibratedOptimum(win_rate=rate, beta=beta)


def local_win_rate_slope_target(c: Tensor, n: int, mode: DecodeMode) -> Tensor:
    """ψ(C) with W − ½ = ε·N²/(2N − 1)·Cov_U(ψ(C), h(C)) + O(ε²) for a policy whose calibrated
    density is 1 + ε·h (see :func:`default_t`): C^{2N−1} for best-of-N, −(1 − C)^{2N−1} for
    worst-of-N. The best transform near π_ref is Φ = ψ itself."""
    _check_mode(mode)
    k = 2 * _check_n(n) - 1
    return c**k if mode == "best" else -((1.0 - c) ** k)


def optimise_t(
    n: int,
    mode: DecodeMode = "best",
    kl_budget: float | None = None,
    *,
    t_bounds: tuple[float, float] | None = None,
    grid: int = 2048,
) -> float:
    """The t of e^{t·C} (best-of-N) or −e^{−t·C} (worst-of-N) that maximises the
    inference-time win rate in the calibrated model (C ∼ U(0, 1) under π_ref).

    docs/methods.md §8 says only that the paper tunes t per N and KL budget; this is the numeric
    search that reduction allows, since every prompt maps to the same calibrated model:

    - ``kl_budget=None``, the near-π_ref limit: maximise corr_U(Φ_t(C), ψ(C)), ψ from
      :func:`local_win_rate_slope_target` (C^{2N−1} or −(1 − C)^{2N−1}). At a fixed small KL
      the first-order win-rate gain is √(2·KL)·N²/(2N − 1)·sd(ψ)·corr(Φ_t, ψ), so this t
      wins most per unit of √KL. It is ≈ 2N (3.36 for N = 2, 7.8 for N = 4, 15.9 for N = 8),
      near the :func:`default_t` 2N − 1. Best and worst give the same t (C → 1 − C).
    - ``kl_budget`` > 0 (nats): for each t, solve β so the KL-RL optimum has exactly that KL
      and compute its win rate (:func:`calibrated_win_rate`); maximise over t.

    The search: 48 log-spaced t over ``t_bounds`` (default (0.05, 10·(2N − 1) + 10)), then
    Brent's bounded search between the neighbours of the best. For N = 1 near π_ref the
    identity is optimal (the t → 0 limit of e^{t·C}), so the lower bound comes back.
    Cost: ~0.3 s near π_ref, ~1 s with a KL budget at ``grid=512`` (it scales with the grid).
    """
    from scipy.optimize import minimize_scalar

    n = _check_n(n)
    _check_mode(mode)
    kind = transform_for(mode)
    lo, hi = t_bounds if t_bounds is not None else (0.05, 10.0 * (2 * n - 1) + 10.0)
    if not 0 < lo < hi:
        raise ValueError(f"t_bounds must satisfy 0 < lo < hi, got {(lo, hi)}")
    c = _calibrated_grid(grid)
    target = _standardised(local_win_rate_slope_target(c, n, mode))

    def objective(t: float) -> float:
        phi = _standardised(_phi(c, kind, t))
        if kl_budget is None:
            return -float((phi * target).mean())  # the correlation of two standardised vectors
        strength = _strength_for_kl(phi, kl_budget)
        pi = _tilt(phi, strength).exp()
        return -float(win_rate_exact(pi, torch.full_like(c, 1.0 / grid), c, n, mode))

    ts = np.geomspace(lo, hi, 48)
    values = [objective(float(t)) for t in ts]
    best = int(np.argmin(values))
    left, right = float(ts[max(best - 1, 0)]), float(ts[min(best + 1, len(ts) - 1)])
    result = minimize_scalar(
        objective, bounds=(left, right), method="bounded", options={"xatol": 1e-4 * right}
    )
    t_star = float(result.x)
    return t_star if objective(t_star) <= values[best] else float(ts[best])


# ----------------------------------------------------------------------------- the KL-RL optimum


class TiltedOptimum(NamedTuple):
    """The KL-RL optimum over a reference's empirical samples, at one β (:func:`tilted_optimum`)."""

    win_rate: float  # decoded win rate against the reference, mean over prompts, ties ½
    kl: float  # KL(π*‖π̂_ref) per prompt, mean over prompts, nats
    mean_reward: float  # E_π*[r], mean over prompts


def tilted_optimum(
    rewards: Tensor, phi: Tensor, beta: float, n: int, mode: DecodeMode = "best"
) -> TiltedOptimum:
    """The KL-RL optimum π* ∝ π̂_ref·exp(Φ/β) on the support of a reference's samples, judged
    by the raw reward.

    ``rewards`` [P, M]: raw rewards of M reference samples for each of P prompts (π̂_ref puts
    1/M on each); ``phi`` [P, M]: the reward RL would maximise on the same samples (the raw
    reward, its calibration, a transform of it). The optimum of E_π[Φ] − β·KL(π‖π̂_ref) over
    distributions on those samples is the tilt w_i ∝ exp(Φ_i/β), exactly (the Gibbs
    variational principle), so the figures are those of a perfectly trained policy with no
    optimisation noise, for this reference and reward: the decoded win rate (best/worst of
    N, from the two weighted CDFs, exact) and KL(π*‖π̂_ref) = Σ w·log(M·w). Sweeping β traces
    the win-rate-vs-KL frontier that each choice of Φ can reach.
    """
    n = _check_n(n)
    _check_mode(mode)
    if rewards.dim() != 2 or rewards.shape != phi.shape:
        raise ValueError(
            f"rewards and phi must both be [prompts, samples], got {tuple(rewards.shape)} "
            f"and {tuple(phi.shape)}"
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _no_nan(rewards, phi)
    r = rewards.detach().to(torch.float64)
    log_w = torch.log_softmax(phi.detach().to(torch.float64) / beta, dim=-1)
    w = log_w.exp()
    m = r.shape[-1]
    kl = (w * (log_w + math.log(m))).sum(-1)
    win = _win_rate_weighted(r, w, r, torch.ones_like(r), n, mode)
    return TiltedOptimum(
        win_rate=float(win.mean()), kl=float(kl.mean()), mean_reward=float((w * r).sum(-1).mean())
    )
