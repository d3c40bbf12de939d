"""Targets, sample-based monitors and samplers of the Bayesian view (docs/methods.md §5), by hand
and on a categorical toy whose every expectation is an exact sum: estimators within 4
standard errors of the truth, QRS acceptance and output against their closed forms."""

import math

import pytest
import torch

from tether.distributions.bayes import (
    best_of_n,
    constraint_log_target,
    fit_moments,
    importance_resample,
    kl_policy_ref,
    kl_policy_target,
    kl_target_policy,
    log_z_estimate,
    moment_log_target,
    quasi_rejection_sampling,
    reward_log_target,
    snis_moments,
    tv_estimate,
)
from tether.distributions.exact import (
    expectation,
    kl,
    normalize,
    qrs_acceptance_rate,
    qrs_distribution,
    total_variation,
)
from tether.distributions.infalign import best_of_n_distribution

F64 = torch.float64

# the toy: 6 outcomes; reference, reward, policy π and proposal q, all with full support
LOG_REF = torch.tensor([0.4, 0.1, -0.3, 0.2, -0.5, 0.0], dtype=F64).log_softmax(0)
REWARD = torch.tensor([1.5, -0.5, 0.2, 2.0, 0.0, -1.0], dtype=F64)
BETA = 0.8
LOG_P = LOG_REF + REWARD / BETA  # unnormalised target
LOG_Z = torch.logsumexp(LOG_P, 0)
LOG_PT = LOG_P - LOG_Z  # the normalised target p
LOG_PI = torch.tensor([0.9, -0.2, 0.1, 0.6, -0.4, -0.3], dtype=F64).log_softmax(0)
LOG_Q = torch.tensor([0.2, 0.1, 0.3, 0.2, 0.0, 0.1], dtype=F64).log_softmax(0)


def _draw(log_probs: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return torch.multinomial(
        log_probs.exp(), n, replacement=True, generator=torch.Generator().manual_seed(seed)
    )


def _within_4_se(per_sample: torch.Tensor, truth: float, estimate: float | None = None) -> None:
    """The estimate (default: the mean of the per-sample values) is within 4 standard errors."""
    mean = float(per_sample.mean()) if estimate is None else estimate
    se = float(per_sample.std()) / math.sqrt(per_sample.numel())
    assert abs(mean - truth) <= 4 * se + 1e-12, (mean, truth, se)


# ----------------------------------------------------------------------------- targets


def test_target_log_densities_by_hand():
    log_ref = torch.tensor([math.log(0.5), math.log(0.5)], dtype=F64)
    assert reward_log_target(log_ref, torch.tensor([1.0, 0.0], dtype=F64), 0.5).tolist() == (
        pytest.approx([math.log(0.5) + 2.0, math.log(0.5)])
    )
    with pytest.raises(ValueError, match="beta"):
        reward_log_target(log_ref, torch.zeros(2), 0.0)
    for b in (torch.tensor([True, False]), torch.tensor([1, 0])):
        assert constraint_log_target(log_ref, b).tolist() == [math.log(0.5), -math.inf]
    with pytest.raises(ValueError, match="0, 1"):
        constraint_log_target(log_ref, torch.tensor([0.5, 1.0]))
    phi = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    lam = torch.tensor([0.5, -1.0], dtype=F64)
    assert moment_log_target(log_ref, phi, lam).tolist() == pytest.approx(
        [math.log(0.5) + 0.5, math.log(0.5) + 1.0 - 1.0]
    )


def test_snis_moments_by_hand():
    phi = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    # weights ∝ [1, 3]: moments = ¼·[1, 0] + ¾·[3, 2]
    assert snis_moments(phi, torch.tensor([0.0, math.log(3)])).tolist() == pytest.approx([2.5, 1.5])
    assert float(snis_moments(phi[:, 0], torch.zeros(2))) == 2.0  # a plain mean


def test_fit_moments_exact_and_from_samples():
    phi = torch.stack([REWARD, (REWARD > 0).double()], dim=1)  # two features
    targets = torch.tensor([1.0, 0.7], dtype=F64)
    # the whole support weighted by π_ref: the exact I-projection of π_ref on the constraints
    fit = fit_moments(phi, targets, log_weights=LOG_REF)
    assert fit.converged and fit.max_error < 1e-9
    log_p = normalize(moment_log_target(LOG_REF, phi, fit.lam))
    assert expectation(log_p, phi).tolist() == pytest.approx(targets.tolist(), abs=1e-9)
    # from samples of π_ref: the SNIS moments hit the targets; λ is near the exact one
    idx = _draw(LOG_REF, 50_000, seed=0)
    sample_fit = fit_moments(phi[idx], targets)
    assert sample_fit.converged and sample_fit.max_error < 1e-9
    assert torch.allclose(snis_moments(phi[idx], phi[idx] @ sample_fit.lam), targets, atol=1e-9)
    assert torch.allclose(sample_fit.lam, fit.lam, atol=0.05)
    # from samples of q, reweighted to π_ref: the same λ up to noise
    idx_q = _draw(LOG_Q, 50_000, seed=1)
    q_fit = fit_moments(phi[idx_q], targets, log_weights=(LOG_REF - LOG_Q)[idx_q])
    assert q_fit.converged and torch.allclose(q_fit.lam, fit.lam, atol=0.05)
    # one feature, given 1-D
    one = fit_moments(REWARD, torch.tensor([0.5], dtype=F64), log_weights=LOG_REF)
    assert one.converged and one.lam.shape == (1,)


def test_fit_moments_rejects_unreachable_targets():
    with pytest.raises(ValueError, match="outside the range"):
        fit_moments(REWARD, torch.tensor([2.5], dtype=F64))
    # on the boundary (the largest reward, one outcome): λ runs off toward +∞, and all the
    # weight lands on that outcome
    boundary = fit_moments(REWARD, torch.tensor([2.0], dtype=F64), log_weights=LOG_REF)
    assert float(boundary.lam) > 20 and boundary.effective_sample_size < 1 + 1e-6
    with pytest.raises(ValueError, match="features must be"):
        fit_moments(torch.zeros(4, 2), torch.zeros(3))


# ----------------------------------------------------------------------------- monitors


def test_monitors_by_hand():
    # two samples from q = ½ each; P = [1, 3]: P/q = [2, 6], Ẑ = 4
    log_P = torch.tensor([0.0, math.log(3)], dtype=F64)
    log_q = torch.full((2,), math.log(0.5), dtype=F64)
    assert float(log_z_estimate(log_P, log_q)) == pytest.approx(math.log(4))
    # π = [0.5, 0.5] on these samples: KL(p‖π) ≈ −log 4 + mean[(P/q)(log P − log π)]/4
    log_pi = log_q
    expected = -math.log(4) + 0.5 * (2 * (0 + math.log(2)) + 6 * (math.log(3) + math.log(2))) / 4
    assert float(kl_target_policy(log_P, log_q, log_pi)) == pytest.approx(expected)
    # TV ≈ ½·mean|π/q − P/(Ẑq)| = ½·mean(|1 − ½|, |1 − 3/2|) = ¼
    assert float(tv_estimate(log_P, log_q, log_pi)) == pytest.approx(0.25)
    # KL(π‖p) from samples of π with log Z = log 4: mean(log π − log P) + log 4
    expected = 0.5 * ((math.log(0.5) - 0) + (math.log(0.5) - math.log(3))) + math.log(4)
    assert float(kl_policy_target(log_pi, log_P, math.log(4))) == pytest.approx(expected)
    assert float(kl_policy_ref(log_pi, log_P)) == pytest.approx(
        0.5 * (2 * math.log(0.5) - math.log(3))
    )


def test_z_and_kl_estimators_are_unbiased_on_the_toy():
    n = 100_000
    idx = _draw(LOG_Q, n, seed=2)
    log_P, log_q, log_pi = LOG_P[idx], LOG_Q[idx], LOG_PI[idx]
    weights = torch.exp(log_P - log_q)  # P/q: Ẑ is their mean
    _within_4_se(weights, float(LOG_Z.exp()), float(log_z_estimate(log_P, log_q).exp()))

    # KL(p‖π) with the true Z: importance sampling, unbiased
    truth = float(kl(LOG_PT, LOG_PI))
    per_sample = weights / LOG_Z.exp() * (log_P - log_pi) - LOG_Z
    _within_4_se(per_sample, truth, float(kl_target_policy(log_P, log_q, log_pi, LOG_Z)))
    # with Ẑ from the same samples (SNIS): consistent, close at this size
    assert float(kl_target_policy(log_P, log_q, log_pi)) == pytest.approx(truth, abs=0.01)
    # TV(π, p) with the true Z: unbiased
    per_sample = 0.5 * (torch.exp(log_pi - log_q) - weights / LOG_Z.exp()).abs()
    truth = float(total_variation(LOG_PI, LOG_PT))
    _within_4_se(per_sample, truth, float(tv_estimate(log_P, log_q, log_pi, LOG_Z)))
    assert float(tv_estimate(log_P, log_q, log_pi)) == pytest.approx(truth, abs=0.01)

    # KL(π‖p) and KL(π‖π_ref) from samples of π (on-policy), and of q with weights π/q
    idx_pi = _draw(LOG_PI, n, seed=3)
    per_sample = LOG_PI[idx_pi] - LOG_P[idx_pi] + LOG_Z
    estimate = float(kl_policy_target(LOG_PI[idx_pi], LOG_P[idx_pi], LOG_Z))
    _within_4_se(per_sample, float(kl(LOG_PI, LOG_PT)), estimate)
    rho = torch.exp(log_pi - log_q)
    per_sample = rho * (log_pi - log_P) + LOG_Z
    estimate = float(kl_policy_target(log_pi, log_P, LOG_Z, log_q=log_q))
    _within_4_se(per_sample, float(kl(LOG_PI, LOG_PT)), estimate)
    per_sample = LOG_PI[idx_pi] - LOG_REF[idx_pi]
    estimate = float(kl_policy_ref(LOG_PI[idx_pi], LOG_REF[idx_pi]))
    _within_4_se(per_sample, float(kl(LOG_PI, LOG_REF)), estimate)
    per_sample = rho * (log_pi - LOG_REF[idx])
    estimate = float(kl_policy_ref(log_pi, LOG_REF[idx], log_q=log_q))
    _within_4_se(per_sample, float(kl(LOG_PI, LOG_REF)), estimate)


def test_a_hard_constraint_target_gives_zero_weights():
    satisfied = torch.tensor([1, 0, 1, 1, 0, 1])
    log_P = constraint_log_target(LOG_REF, satisfied)
    idx = _draw(LOG_Q, 50_000, seed=4)
    z = float(LOG_REF.exp()[satisfied > 0].sum())  # π_ref(b = 1)
    per_sample = torch.exp(log_P[idx] - LOG_Q[idx])
    _within_4_se(per_sample, z, float(log_z_estimate(log_P[idx], LOG_Q[idx]).exp()))
    estimate = float(kl_target_policy(log_P[idx], LOG_Q[idx], LOG_PI[idx]))
    truth = float(kl(normalize(log_P), LOG_PI))
    assert math.isfinite(estimate) and estimate == pytest.approx(truth, abs=0.02)


# ----------------------------------------------------------------------------- samplers


def test_qrs_closed_forms_by_hand():
    log_q = torch.tensor([0.5, 0.5], dtype=F64).log()
    log_P = torch.tensor([0.2, 0.6], dtype=F64).log()  # P/q = [0.4, 1.2], Z = 0.8
    # β = 1: Σ min(q, P) = 0.2 + 0.5 = 0.7; output ∝ [0.2, 0.5]
    assert float(qrs_acceptance_rate(log_P, log_q, 1.0)) == pytest.approx(0.7)
    assert qrs_distribution(log_P, log_q, 1.0).exp().tolist() == pytest.approx([2 / 7, 5 / 7])
    # β = 1.2 = max P/q: exact rejection sampling, output p, acceptance Z/β
    assert float(qrs_acceptance_rate(log_P, log_q, 1.2)) == pytest.approx(0.8 / 1.2)
    assert qrs_distribution(log_P, log_q, 1.2).exp().tolist() == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize("beta_qrs", [0.5, 1.5, 4.0])
def test_qrs_acceptance_and_output_match_the_closed_form(beta_qrs):
    n = 200_000
    idx = _draw(LOG_Q, n, seed=5)
    result = quasi_rejection_sampling(
        LOG_P[idx], LOG_Q[idx], beta_qrs, torch.Generator().manual_seed(6)
    )
    rate = float(qrs_acceptance_rate(LOG_P, LOG_Q, beta_qrs))
    _within_4_se(result.accepted.double(), rate, result.acceptance_rate)
    clipped = float(LOG_Q.exp()[(LOG_P - LOG_Q).exp() > beta_qrs].sum())
    _within_4_se(((LOG_P - LOG_Q)[idx].exp() > beta_qrs).double(), clipped, result.clipped_fraction)
    # the accepted samples follow p_β ∝ min(q, P/β), outcome by outcome
    kept = idx[result.accepted]
    expected = qrs_distribution(LOG_P, LOG_Q, beta_qrs).exp()
    for y in range(6):
        _within_4_se((kept == y).double(), float(expected[y]))


def test_qrs_approaches_the_target_as_beta_grows():
    max_ratio = float((LOG_P - LOG_Q).exp().max())
    betas = (0.1, 0.5, 1.0, 2.0, max_ratio)
    tvs = [float(total_variation(qrs_distribution(LOG_P, LOG_Q, b), LOG_PT)) for b in betas]
    assert all(a > b for a, b in zip(tvs, tvs[1:], strict=False))
    assert tvs[-1] < 1e-12  # β ≥ max P/q: exact
    assert float(qrs_acceptance_rate(LOG_P, LOG_Q, 2 * max_ratio)) == pytest.approx(
        float(LOG_Z.exp()) / (2 * max_ratio)
    )
    assert float(total_variation(qrs_distribution(LOG_P, LOG_Q, 1e-6), LOG_Q)) < 1e-12
    with pytest.raises(ValueError, match="beta_qrs"):
        quasi_rejection_sampling(LOG_P, LOG_Q, 0.0)


def test_importance_resampling_follows_the_target():
    pool, n = 100_000, 100_000
    idx = _draw(LOG_Q, pool, seed=7)
    picked = idx[importance_resample(LOG_P[idx], LOG_Q[idx], n, torch.Generator().manual_seed(8))]
    p, w = LOG_PT.exp(), torch.exp(LOG_PT - LOG_Q)  # p/q
    for y in range(6):
        # two sources of noise: the pool's SNIS estimate of p(y), and the n draws from it
        pool_var = float(
            (LOG_Q.exp() * w.square() * ((torch.arange(6) == y).double() - p[y]).square()).sum()
        )
        se = math.sqrt(pool_var / pool + float(p[y] * (1 - p[y])) / n)
        assert abs(float((picked == y).double().mean()) - float(p[y])) <= 4 * se


def test_best_of_n_picks_the_first_best():
    rewards = torch.tensor([[0.1, 0.9, 0.9, -1.0], [2.0, 0.0, 1.0, 2.0]])
    assert best_of_n(rewards).tolist() == [1, 0]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_best_of_n_distribution_matches_sampling(n):
    reward = torch.tensor([1.0, 0.0, 1.0, 2.0, 0.0, 2.0])  # ties at every level
    draws = 50_000
    idx = _draw(LOG_Q, draws * n, seed=9).view(draws, n)
    best = idx.gather(1, best_of_n(reward[idx]).unsqueeze(1)).squeeze(1)
    expected = best_of_n_distribution(LOG_Q.exp(), reward, n)
    assert float(expected.sum()) == pytest.approx(1.0)
    for y in range(6):
        _within_4_se((best == y).double(), float(expected[y]))
