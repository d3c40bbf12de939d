"""InfAlign / CTRL (docs/methods.md §8): calibration, transforms, the best-of-N distribution and
win rates, against hand computations, brute-force enumeration of every N-tuple, and closed
forms."""

import itertools
import math

import numpy as np
import pytest
import torch

from tether.distributions.infalign import (
    best_of_n_distribution,
    calibrate,
    calibrated_win_rate,
    default_t,
    local_win_rate_slope_target,
    optimise_t,
    pick_of_n,
    standard_win_rate,
    transform,
    transform_for,
    win_rate_bon_from_cdf,
    win_rate_exact,
    win_rate_mc,
    win_scores,
)

F64 = torch.float64

# ----------------------------------------------------------------------------- calibration


def test_calibrate_hand_computed():
    ref = torch.tensor([[1.0, 2.0, 2.0, 3.0]])  # K = 4, a tie at 2
    reward = torch.tensor([[0.0, 1.0, 2.0, 2.5, 3.0, 4.0]])
    # (#below + ½·#equal)/4: 0 → 0; 1 → ½/4; 2 → (1 + 1)/4; 2.5 → 3/4; 3 → 3.5/4; 4 → 1
    expected = torch.tensor([[0.0, 0.125, 0.5, 0.75, 0.875, 1.0]])
    c = calibrate(reward, ref)
    assert c.dtype == torch.float32 and c.shape == (1, 6)
    assert torch.equal(c, expected)
    # one response per prompt: reward [B]; integer (checker) rewards work too
    refs = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])
    assert torch.equal(calibrate(torch.tensor([1, 0]), refs), torch.tensor([0.625, 0.375]))
    assert calibrate(reward.double(), ref).dtype == F64


def test_calibrate_rejects_bad_shapes_and_nan():
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        calibrate(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[B\] or \[B, M\]"):
        calibrate(torch.zeros(2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        calibrate(torch.tensor([float("nan")]), torch.zeros(1, 4))


def test_reference_rewards_calibrate_to_the_midpoint_grid_exactly():
    g = torch.Generator().manual_seed(0)
    k = 64
    ref = torch.randn(3, k, generator=g, dtype=F64)  # distinct with probability 1
    c = calibrate(ref, ref)  # each reference reward against the K (itself included)
    grid = (torch.arange(k, dtype=F64) + 0.5) / k
    for row in c:
        assert torch.equal(row.sort().values, grid)
    assert torch.allclose(c.mean(-1), torch.full((3,), 0.5, dtype=F64), rtol=0, atol=1e-15)


def test_fresh_reference_samples_calibrate_to_uniform():
    g = torch.Generator().manual_seed(1)
    k, m = 20, 1000
    ref = torch.randn(1, k, generator=g, dtype=F64)
    fresh = torch.randn(1, m, generator=g, dtype=F64)  # more samples of π_ref, same prompt
    c = calibrate(fresh, ref)[0]
    # a fresh continuous sample falls in each of the K + 1 gaps with probability 1/(K + 1)
    # *averaged over the K cached rewards*; for one fixed set the gaps have random masses, so
    # test over many sets of K: E[C] = ½ exactly
    assert set(torch.unique(c).tolist()) <= {i / k for i in range(k + 1)}
    refs = torch.randn(2000, k, generator=g, dtype=F64)
    fresh = torch.randn(2000, 50, generator=g, dtype=F64)
    c = calibrate(fresh, refs)
    se = float(c.mean(-1).std() / math.sqrt(2000))
    assert abs(float(c.mean()) - 0.5) < 4 * se
    counts = torch.bincount((c * k).round().long().flatten(), minlength=k + 1).double()
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.full_like(freq, 1 / (k + 1)), rtol=0.1)


@pytest.mark.parametrize(
    "monotone",
    [torch.exp, lambda r: 3 * r + 1, torch.sigmoid, lambda r: r**3],
    ids=["exp", "affine", "sigmoid", "cube"],
)
def test_calibration_is_invariant_to_a_monotone_map_of_the_reward(monotone):
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(4, 16, generator=g, dtype=F64).round(decimals=1)  # with ties
    reward = torch.randn(4, 9, generator=g, dtype=F64).round(decimals=1)
    # map each distinct value once: vectorised kernels may round equal inputs differently
    # depending on where they sit in a tensor, and a tie must stay a tie
    values, inverse = torch.unique(
        torch.cat([ref.flatten(), reward.flatten()]), return_inverse=True
    )
    assert torch.all(monotone(values).diff() > 0)  # strictly increasing on these values
    mapped = monotone(values)[inverse]
    new_ref, new_reward = mapped[: ref.numel()].view_as(ref), mapped[ref.numel() :].view_as(reward)
    assert torch.equal(calibrate(new_reward, new_ref), calibrate(reward, ref))


def reference_calibration(p_ref: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """The population calibration on an enumerable space (the K → ∞ limit of ``calibrate``),
    written out term by term: c(y) = P_ref(R < r(y)) + ½·P_ref(R = r(y)), R = r(Y), Y ∼ π_ref."""
    p, r = p_ref.tolist(), reward.tolist()
    below = [sum(pj for pj, rj in zip(p, r, strict=True) if rj < ri) for ri in r]
    equal = [sum(pj for pj, rj in zip(p, r, strict=True) if rj == ri) for ri in r]
    return torch.tensor([b + 0.5 * e for b, e in zip(below, equal, strict=True)], dtype=F64)


def test_calibrate_on_a_sample_in_the_reference_proportions_is_the_population_mid_rank():
    p = torch.tensor([0.1, 0.3, 0.2, 0.4], dtype=F64)
    r = torch.tensor([1.0, 2.0, 2.0, 0.5])  # outcomes 1 and 2 tie
    c = reference_calibration(p, r)
    # 0.5 is lowest: ½·0.4 = 0.2; 1.0: 0.4 + ½·0.1 = 0.45; 2.0: 0.5 + ½·0.5 = 0.75 (both)
    assert torch.allclose(c, torch.tensor([0.45, 0.75, 0.75, 0.2], dtype=F64), rtol=1e-15)
    assert float((p * c).sum()) == pytest.approx(0.5, abs=1e-15)
    # a reference sample with exactly these proportions (10 draws) calibrates identically
    sample = torch.tensor([1.0] * 1 + [2.0] * 3 + [2.0] * 2 + [0.5] * 4, dtype=F64)
    assert torch.allclose(calibrate(r.double().unsqueeze(0), sample.unsqueeze(0))[0], c)


# ----------------------------------------------------------------------------- transforms and t


def test_transforms_by_hand():
    c = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    assert torch.equal(transform(c, "identity"), c)
    log_c = transform(c, "log", log_floor=1 / 64)
    assert log_c.tolist() == pytest.approx([math.log(1 / 64), math.log(0.25), 0.0])
    assert torch.isfinite(transform(c, "log")).all()  # guarded at 0 by the default floor
    assert transform(c, "exp", t=3.0).tolist() == pytest.approx(
        [1.0, math.exp(0.75), math.exp(3.0)]
    )
    assert transform(c, "neg_exp", t=3.0).tolist() == pytest.approx(
        [-1.0, -math.exp(-0.75), -math.exp(-3.0)]
    )
    assert transform_for("best") == "exp" and transform_for("worst") == "neg_exp"
    with pytest.raises(ValueError, match="needs a t"):
        transform(c, "exp")
    with pytest.raises(ValueError, match="unknown transform"):
        transform(c, "square", t=1.0)


def test_default_t_is_2n_minus_1():
    assert [default_t(n) for n in (1, 2, 4, 16)] == [1.0, 3.0, 7.0, 31.0]
    assert default_t(8, "worst") == 15.0
    with pytest.raises(ValueError):
        default_t(0)
    with pytest.raises(ValueError, match="decoding mode"):
        default_t(2, "median")


@pytest.mark.parametrize("mode", ["best", "worst"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_first_order_win_rate_gain_has_the_derived_closed_form(n, mode):
    """default_t's derivation: near π_ref, W − ½ = ε·N²/(2N − 1)·Cov_U(ψ(C), h(C)). With the
    identity tilt (h = C − ½) the slope is N/(4(2N + 1)) for best and worst alike."""
    grid = 1024
    c = (torch.arange(grid, dtype=F64) + 0.5) / grid
    uniform = torch.full_like(c, 1.0 / grid)

    def win_rate(eps: float) -> float:
        return float(win_rate_exact((eps * c).softmax(-1), uniform, c, n, mode))

    assert win_rate(0.0) == pytest.approx(0.5, abs=1e-14)
    slope = (win_rate(1e-4) - win_rate(-1e-4)) / 2e-4
    psi = local_win_rate_slope_target(c, n, mode)
    covariance = float(((psi - psi.mean()) * (c - 0.5)).mean())
    assert slope == pytest.approx(n * n / (2 * n - 1) * covariance, rel=1e-5)
    assert slope == pytest.approx(n / (4 * (2 * n + 1)), rel=1e-5)


def test_optimise_t_near_the_reference_is_about_2n():
    t2 = optimise_t(2, grid=512)
    t4 = optimise_t(4, grid=512)
    assert 3.0 < t2 < 3.8  # ≈ 3.36; default_t says 3
    assert 7.0 < t4 < 8.5  # ≈ 7.82; default_t says 7
    assert optimise_t(4, "worst", grid=512) == pytest.approx(t4, rel=1e-6)  # C → 1 − C
    # N = 1: the identity is best, the t → 0 end of e^{t·C}
    assert optimise_t(1, grid=512, t_bounds=(0.01, 10.0)) < 0.02


def test_optimise_t_at_a_small_kl_budget_tends_to_the_local_optimum():
    local = optimise_t(2, grid=256)
    at_budget = optimise_t(2, kl_budget=1e-4, grid=256)
    assert at_budget == pytest.approx(local, abs=0.05)


def test_ctrl_beats_the_identity_transform_in_the_calibrated_model():
    kl = 0.5
    identity = calibrated_win_rate(4, "best", "identity", None, kl, grid=512)
    exp_default = calibrated_win_rate(4, "best", "exp", default_t(4), kl, grid=512)
    assert identity.win_rate > 0.5
    assert exp_default.win_rate > identity.win_rate + 0.03  # ≈ 0.866 vs 0.800
    worst_identity = calibrated_win_rate(4, "worst", "identity", None, kl, grid=512)
    worst_ctrl = calibrated_win_rate(4, "worst", "neg_exp", default_t(4, "worst"), kl, grid=512)
    assert worst_ctrl.win_rate > worst_identity.win_rate
    # the returned β reaches the KL budget with Φ exactly as transform() gives it
    c = (torch.arange(512, dtype=F64) + 0.5) / 512
    pi = (transform(c, "exp", default_t(4)) / exp_default.beta).softmax(-1)
    assert float((pi * (pi * 512).log()).sum()) == pytest.approx(kl, rel=1e-8)
    uniform = torch.full_like(c, 1 / 512)
    assert float(win_rate_exact(pi, uniform, c, 4, "best")) == pytest.approx(
        exp_default.win_rate, rel=1e-10
    )


# ----------------------------------------------------------------------------- best of N


def _brute_force_best_of_n(p: torch.Tensor, r: torch.Tensor, n: int) -> torch.Tensor:
    """Every N-tuple of outcomes with its probability; the pick is uniform among the samples
    tied at the highest reward."""
    out = torch.zeros_like(p, dtype=F64)
    for tup in itertools.product(range(len(p)), repeat=n):
        prob = math.prod(float(p[i]) for i in tup)
        target = max(float(r[i]) for i in tup)
        picked = [i for i in tup if float(r[i]) == target]
        for i in picked:
            out[i] += prob / len(picked)
    return out


TOY_P = torch.tensor([0.1, 0.3, 0.2, 0.4, 0.0], dtype=F64)
TOY_R = torch.tensor([1.0, 2.0, 2.0, 0.5, 3.0])  # a tie at 2.0; a zero-probability top outcome


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_best_of_n_distribution_matches_enumeration(n):
    bon = best_of_n_distribution(TOY_P, TOY_R, n)
    assert torch.allclose(bon, _brute_force_best_of_n(TOY_P, TOY_R, n), rtol=0, atol=1e-15)
    assert float(bon.sum()) == pytest.approx(1.0, abs=1e-14)
    if n == 1:
        assert torch.allclose(bon, TOY_P)
    # tied outcomes share their level in proportion to p
    assert float(bon[1] / bon[2]) == pytest.approx(1.5, rel=1e-12)


def test_best_of_n_hand_computed():
    # rewards 0 < 1 with p = (¼, ¾): best-of-2 picks the 0 only if both are 0
    p = torch.tensor([0.25, 0.75], dtype=F64)
    r = torch.tensor([0.0, 1.0])
    assert best_of_n_distribution(p, r, 2).tolist() == pytest.approx([1 / 16, 15 / 16])


# ----------------------------------------------------------------------------- the log transform


def _log_transform_optimum(p: torch.Tensor, r: torch.Tensor, n: int) -> torch.Tensor:
    """The KL-RL optimum π_ref·exp(Φ/β)/Z for Φ = log C (population mid-rank), β = 1/(N − 1)."""
    beta = 1.0 / (n - 1)
    phi = transform(reference_calibration(p, r), "log", log_floor=1e-300)
    weights = p * torch.exp(phi / beta)
    return weights / weights.sum()


def test_log_transform_reproduces_best_of_2_exactly_even_with_ties():
    """N = 2: best-of-2 = p·(F + F⁻) = 2·p·C, and Z = E[C] = ½, so π_ref·C/Z is it exactly."""
    bon = best_of_n_distribution(TOY_P, TOY_R, 2)
    assert torch.allclose(_log_transform_optimum(TOY_P, TOY_R, 2), bon, rtol=0, atol=1e-15)
    assert torch.allclose(bon, 2 * TOY_P * reference_calibration(TOY_P, TOY_R), atol=1e-15)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_best_of_n_is_p_times_n_times_the_mean_of_u_to_the_n_minus_1(n):
    """The exact identity for any N, ties or not: P_bon(y) = p(y)·N·E[U^{N−1}] with
    U ∼ Uniform(F⁻(y), F(y)), computed here by Gauss–Legendre quadrature (exact for this
    polynomial), independently of the library's geometric sum. The mid-rank C = E[U]."""
    nodes, weights = np.polynomial.legendre.leggauss(n)  # exact to degree 2n − 1 on [−1, 1]
    c = reference_calibration(TOY_P, TOY_R).numpy()
    below = c - 0.5 * np.array([0.1, 0.5, 0.5, 0.4, 0.0])  # F⁻ = C − ½·p_level
    above = c + 0.5 * np.array([0.1, 0.5, 0.5, 0.4, 0.0])  # F = C + ½·p_level
    u = 0.5 * (above - below)[:, None] * nodes[None, :] + 0.5 * (above + below)[:, None]
    mean_u_power = 0.5 * (weights[None, :] * u ** (n - 1)).sum(-1)
    expected = TOY_P.numpy() * n * mean_u_power
    bon = best_of_n_distribution(TOY_P, TOY_R, n).numpy()
    assert np.allclose(bon, expected, rtol=0, atol=1e-14)
    # Jensen: p·N·C^{N−1} ≤ P_bon pointwise, equality iff N ≤ 2 or the level has no mass
    assert np.all(TOY_P.numpy() * n * c ** (n - 1) <= bon + 1e-15)


@pytest.mark.parametrize("n", [3, 5])
def test_log_transform_reproduces_best_of_n_in_the_continuous_limit(n):
    """N ≥ 3 on atoms is an approximation: on a grid of M equiprobable outcomes with distinct
    rewards, TV(π_ref·C^{N−1}/Z, best-of-N) > 0 but shrinks as 1/M² (the midpoint rule)."""
    g = torch.Generator().manual_seed(3)
    tvs = []
    for m in (10, 20, 40, 80):
        p = torch.full((m,), 1.0 / m, dtype=F64)
        r = torch.randn(m, generator=g, dtype=F64)  # distinct, in random order
        tv = 0.5 * float(
            (_log_transform_optimum(p, r, n) - best_of_n_distribution(p, r, n)).abs().sum()
        )
        tvs.append(tv)
    assert tvs[0] > 1e-4  # not exact on atoms
    for coarse, fine in itertools.pairwise(tvs):
        assert 3.8 < coarse / fine < 4.2
    assert tvs[-1] < 1e-4


# ----------------------------------------------------------------------------- win rates


def test_win_scores_and_monte_carlo_win_rate_by_hand():
    policy = torch.tensor([1.0, 2.0, 3.0, 0.0])
    ref = torch.tensor([0.0, 2.0, 4.0, 0.0])
    assert win_scores(policy, ref).tolist() == [1.0, 0.5, 0.0, 0.5]
    wr = win_rate_mc(policy, ref)
    assert wr.rate == 0.5 and wr.games == 4
    # sd of [1, ½, 0, ½] (unbiased) = √(1/6), over √4
    assert wr.stderr == pytest.approx(math.sqrt(1 / 6) / 2, rel=1e-12)
    # decoded games: best and worst of 3 per row
    groups = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.4]])
    assert pick_of_n(groups, "best").tolist() == pytest.approx([0.9, 0.4])
    assert pick_of_n(groups, "worst").tolist() == pytest.approx([0.1, 0.2])


def _bernoulli_win_rate(p: float, q: float, n: int, mode: str) -> float:
    """Rewards in {0, 1}, P(1) = p for the policy and q for the reference: the decoded
    reward is 1 with probability a = 1 − (1 − p)^N (best) or p^N (worst)."""
    a = 1 - (1 - p) ** n if mode == "best" else p**n
    b = 1 - (1 - q) ** n if mode == "best" else q**n
    return a * (1 - b) + 0.5 * (a * b + (1 - a) * (1 - b))


@pytest.mark.parametrize("mode", ["best", "worst"])
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_cdf_win_rate_matches_the_bernoulli_closed_form(n, mode):
    policy = torch.tensor([1.0] * 3 + [0.0] * 7)  # P(1) = 0.3 exactly
    ref = torch.tensor([0.0] * 4 + [1.0])  # P(1) = 0.2 exactly
    w = win_rate_bon_from_cdf(policy, ref, n, mode)
    assert w.shape == () and w.dtype == F64
    assert float(w) == pytest.approx(_bernoulli_win_rate(0.3, 0.2, n, mode), rel=1e-12)


def _brute_force_win_rate(p_pol, p_ref, r, n, mode) -> float:
    """Every N-tuple of each side: P(decoded π > decoded π_ref) + ½·P(=)."""
    pick = max if mode == "best" else min
    decoded_pol: dict[float, float] = {}
    decoded_ref: dict[float, float] = {}
    for dist, out in ((p_pol, decoded_pol), (p_ref, decoded_ref)):
        for tup in itertools.product(range(len(r)), repeat=n):
            v = pick(r[i] for i in tup)
            out[v] = out.get(v, 0.0) + math.prod(dist[i] for i in tup)
    return sum(
        pa * pb * (1.0 if va > vb else 0.5 if va == vb else 0.0)
        for va, pa in decoded_pol.items()
        for vb, pb in decoded_ref.items()
    )


@pytest.mark.parametrize("mode", ["best", "worst"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_exact_and_cdf_win_rates_match_enumeration(n, mode):
    r = [0.0, 1.0, 1.0, 2.5]  # a tied level
    p_pol = [0.1, 0.2, 0.3, 0.4]
    p_ref = [0.4, 0.3, 0.2, 0.1]
    expected = _brute_force_win_rate(p_pol, p_ref, r, n, mode)
    exact = win_rate_exact(
        torch.tensor(p_pol, dtype=F64), torch.tensor(p_ref, dtype=F64), torch.tensor(r), n, mode
    )
    assert float(exact) == pytest.approx(expected, rel=1e-12)
    # empirical samples with exactly these proportions (10 draws each)
    policy = torch.tensor([0.0] * 1 + [1.0] * 5 + [2.5] * 4)
    ref = torch.tensor([0.0] * 4 + [1.0] * 5 + [2.5] * 1)
    assert float(win_rate_bon_from_cdf(policy, ref, n, mode)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("mode", ["best", "worst"])
@pytest.mark.parametrize("n", [1, 4, 16])
def test_uniform_against_uniform_is_one_half(n, mode):
    g = torch.Generator().manual_seed(4)
    samples = torch.rand(2000, generator=g, dtype=F64)
    # the same empirical distribution on both sides: exactly ½ (ties ½)
    assert float(win_rate_bon_from_cdf(samples, samples, n, mode)) == pytest.approx(0.5, abs=1e-12)
    other = torch.rand(3000, generator=g, dtype=F64)
    assert float(win_rate_bon_from_cdf(samples, other, n, mode)) == pytest.approx(0.5, abs=0.03)
    # antisymmetry: W(π, π_ref) + W(π_ref, π) = 1
    total = win_rate_bon_from_cdf(samples, other, n, mode) + win_rate_bon_from_cdf(
        other, samples, n, mode
    )
    assert float(total) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_cdf_win_rate_matches_power_law_closed_forms(n):
    """Reference U(0, 1). Best: policy CDF c^a ⇒ its best-of-N has CDF c^{aN} against c^N, and
    P(X > Y) = ∫ aN·c^{aN−1}·c^N dc = a/(a + 1) for every N. Worst: policy survival (1 − c)^a
    ⇒ P(min_π > min_ref) = ∫ N(1 − c)^{N−1}·(1 − c)^{aN} dc = 1/(1 + a)."""
    m, a = 4000, 2.0
    quantiles = (torch.arange(m, dtype=F64) + 0.5) / m  # a deterministic "sample" of U(0, 1)
    best_policy = quantiles ** (1 / a)  # CDF c^a
    worst_policy = 1 - quantiles ** (1 / a)  # survival (1 − c)^a
    best = float(win_rate_bon_from_cdf(best_policy, quantiles, n, "best"))
    worst = float(win_rate_bon_from_cdf(worst_policy, quantiles, n, "worst"))
    assert best == pytest.approx(a / (a + 1), abs=2e-3)
    assert worst == pytest.approx(1 / (1 + a), abs=2e-3)


def test_standard_win_rate_is_the_mean_calibrated_reward_and_batches():
    g = torch.Generator().manual_seed(5)
    policy = torch.randn(3, 40, generator=g, dtype=F64).round(decimals=1) + 0.3
    ref = torch.randn(3, 25, generator=g, dtype=F64).round(decimals=1)
    batched = standard_win_rate(policy, ref)
    assert batched.shape == (3,)
    assert torch.allclose(batched, calibrate(policy, ref).mean(-1), rtol=0, atol=1e-15)
    for n, mode in ((1, "best"), (4, "best"), (4, "worst")):
        rows = win_rate_bon_from_cdf(policy, ref, n, mode)
        for b in range(3):
            assert float(rows[b]) == pytest.approx(
                float(win_rate_bon_from_cdf(policy[b], ref[b], n, mode)), abs=1e-15
            )


def test_cdf_estimator_has_less_variance_than_monte_carlo():
    """Same samples, same target: M = 64 rewards per side, best-of-4. Monte Carlo gets 16
    games; the CDF estimator plays every N-subset against every other."""
    values = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=F64)
    p_pol = torch.tensor([0.3, 0.3, 0.2, 0.2], dtype=F64)
    p_ref = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64)
    exact = float(win_rate_exact(p_pol, p_ref, values, 4, "best"))
    g = torch.Generator().manual_seed(6)
    mc, cdf = [], []
    for _ in range(300):
        pol = values[torch.multinomial(p_pol, 64, replacement=True, generator=g)]
        ref = values[torch.multinomial(p_ref, 64, replacement=True, generator=g)]
        mc.append(
            win_rate_mc(pick_of_n(pol.view(16, 4), "best"), pick_of_n(ref.view(16, 4), "best")).rate
        )
        cdf.append(float(win_rate_bon_from_cdf(pol, ref, 4, "best")))
    mc_arr, cdf_arr = np.array(mc), np.array(cdf)
    assert abs(mc_arr.mean() - exact) < 4 * mc_arr.std() / math.sqrt(300)
    assert abs(cdf_arr.mean() - exact) < 0.01  # O(N/M) plug-in bias allowed
    assert cdf_arr.var() < 0.8 * mc_arr.var()  # ≈ 0.0055 against 0.0087 here


def test_win_rate_exact_of_a_model_against_itself_is_one_half():
    p = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    r = torch.tensor([1.0, 1.0, 0.0])
    for n in (1, 2, 5):
        for mode in ("best", "worst"):
            assert float(win_rate_exact(p, p, r, n, mode)) == pytest.approx(0.5, abs=1e-15)


# ---------------------------------------------------------------- the tilted optimum


def test_tilted_optimum_limits_and_a_hand_computed_case():
    from tether.distributions.infalign import tilted_optimum

    r = torch.tensor([[0.0, 1.0]])
    # β → ∞: the reference itself (KL 0, win rate ½)
    far = tilted_optimum(r, r, 1e9, n=1)
    assert far.kl == pytest.approx(0.0, abs=1e-9) and far.win_rate == pytest.approx(0.5)
    # β = 1/log 3: weights (1/4, 3/4); win rate against (½, ½): ¾·(½ + ½·½) + ¼·(½·½) = 5/8
    opt = tilted_optimum(r, r, 1 / math.log(3), n=1)
    assert opt.win_rate == pytest.approx(5 / 8)
    assert opt.kl == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert opt.mean_reward == pytest.approx(0.75)
    # best-of-2 of both: π* picks 1 w.p. 1 − (1/4)², the reference w.p. 3/4
    opt2 = tilted_optimum(r, r, 1 / math.log(3), n=2)
    p, q = 15 / 16, 3 / 4
    assert opt2.win_rate == pytest.approx(p * (1 - q) + 0.5 * (p * q + (1 - p) * (1 - q)))


def test_log_calibrated_tilt_is_the_best_of_n_distribution():
    """Distinct rewards, Φ = log C (mid-ranks), β = 1/(N − 1): the tilt is ∝ C^{N−1}, which
    tends to best-of-N; its standard win rate approaches best-of-N's against π_ref."""
    from tether.distributions.infalign import calibrate, tilted_optimum

    m, n = 4000, 4
    r = torch.rand(1, m, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = calibrate(r, r)
    opt = tilted_optimum(r, torch.log(c), 1 / (n - 1), n=1)
    # the best of N uniforms beats a uniform with probability N/(N + 1)
    assert opt.win_rate == pytest.approx(n / (n + 1), abs=2e-3)
