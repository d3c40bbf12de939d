"""KL estimators, exact KL and the prioritised-KL weights, against hand computations and an
enumerable toy where every expectation is an exact sum (docs/methods.md §1, §3)."""

import math

import pytest
import torch

from tether.objectives.kl import exact_kl, kl_estimate, kl_penalty, prioritized_kl_weights

# ----------------------------------------------------------------------------- hand computations


def test_kl_estimators_hand_computed():
    logp = torch.tensor([[-0.5, -1.0, -2.0]])
    ref_logp = torch.tensor([[-1.0, -1.0, -0.5]])
    # ρ = logp − ref_logp = [0.5, 0, −1.5]
    k1 = kl_estimate(logp, ref_logp, "k1")
    assert torch.allclose(k1, torch.tensor([[0.5, 0.0, -1.5]]))
    # k2 = ½ρ² = [0.125, 0, 1.125]
    k2 = kl_estimate(logp, ref_logp, "k2")
    assert torch.allclose(k2, torch.tensor([[0.125, 0.0, 1.125]]))
    # k3 = exp(−ρ) − 1 + ρ:
    #   ρ = 0.5:  exp(−0.5) − 0.5 = 0.6065306597 − 0.5 = 0.1065306597
    #   ρ = 0:    1 − 1 + 0 = 0
    #   ρ = −1.5: exp(1.5) − 2.5 = 4.4816890703 − 2.5 = 1.9816890703
    k3 = kl_estimate(logp, ref_logp, "k3")
    assert torch.allclose(k3, torch.tensor([[0.1065306597, 0.0, 1.9816890703]]))
    # k3 = (r − 1) − log r with r = π_ref/π = exp(−ρ)
    r = torch.exp(ref_logp - logp)
    assert torch.allclose(k3, (r - 1) - torch.log(r))
    assert k1.dtype == k2.dtype == k3.dtype == torch.float32


def test_kl_estimate_upcasts_and_rejects_unknown_kind():
    logp = torch.tensor([-0.5, -1.0]).bfloat16()
    assert kl_estimate(logp, torch.zeros(2).bfloat16(), "k3").dtype == torch.float32
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, logp, "k4")


def test_k3_and_k2_are_never_negative():
    rho = torch.cat(
        [
            torch.linspace(-1e-3, 1e-3, 200_001),
            torch.logspace(-12, 1.3, 10_000),
            -torch.logspace(-12, 1.3, 10_000),
            torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 1e-4,
        ]
    )
    zeros = torch.zeros_like(rho)
    assert kl_estimate(rho, zeros, "k3").min() >= 0.0
    assert kl_estimate(rho, zeros, "k2").min() >= 0.0
    # the same in fp64
    assert kl_estimate(rho.double(), zeros.double(), "k3").min() >= 0.0


# ----------------------------------------------------------------------------- enumerable toy

# a categorical over 5 outcomes: policy π and reference π_ref
PI = torch.tensor([0.40, 0.25, 0.15, 0.12, 0.08], dtype=torch.float64)
PI_REF = torch.tensor([0.20, 0.20, 0.20, 0.20, 0.20], dtype=torch.float64)
TRUE_KL = float((PI * (PI.log() - PI_REF.log())).sum())


def _estimates(kind: str) -> torch.Tensor:
    """The estimator's value at each of the 5 outcomes."""
    return kl_estimate(PI.log(), PI_REF.log(), kind)


def test_true_kl_of_the_toy_by_hand():
    # Σ π log(π/π_ref) with π_ref = 1/5 everywhere
    by_hand = sum(p * math.log(p / 0.2) for p in (0.40, 0.25, 0.15, 0.12, 0.08))
    assert TRUE_KL == pytest.approx(by_hand, rel=1e-12)
    # 0.40·ln 2 + 0.25·ln 1.25 + 0.15·ln 0.75 + 0.12·ln 0.6 + 0.08·ln 0.4
    # = 0.277259 + 0.055786 − 0.043152 − 0.061299 − 0.073303 = 0.155290
    assert TRUE_KL == pytest.approx(0.155290, abs=1e-6)


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_k1_and_k3_are_unbiased_exactly(kind):
    expectation = float((PI * _estimates(kind)).sum())  # E_π[k], exactly
    assert expectation == pytest.approx(TRUE_KL, rel=1e-12)


def test_k2_bias_is_its_closed_form_and_third_order():
    rho = PI.log() - PI_REF.log()
    closed_form = float((PI * 0.5 * rho**2).sum())  # Σ π·½ρ²
    expectation = float((PI * _estimates("k2")).sum())
    assert expectation == pytest.approx(closed_form, rel=1e-12)
    assert abs(expectation - TRUE_KL) > 1e-3  # biased on this toy

    # Near the reference, π_ε ∝ π_ref·exp(ε·h): KL and E[k2] agree to second order (both
    # ≈ ½ε²·Var(h)), so the bias shrinks as ε³: halving ε divides it by about 8.
    q = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
    h = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8], dtype=torch.float64)

    def kl_and_bias(eps: float) -> tuple[float, float]:
        p = q * torch.exp(eps * h)
        p = p / p.sum()
        k2 = kl_estimate(p.log(), q.log(), "k2")
        kl = float((p * (p.log() - q.log())).sum())
        return kl, float((p * k2).sum()) - kl

    for eps in (0.1, 0.05):
        assert 7.0 < kl_and_bias(eps)[1] / kl_and_bias(eps / 2)[1] < 9.5
    kl, bias = kl_and_bias(0.025)
    assert abs(bias) / kl < 2e-3  # KL ≈ 1.9e-4 here, the bias ≈ −2.7e-7


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_monte_carlo_mean_within_standard_error(kind):
    values = _estimates(kind)
    std = math.sqrt(float((PI * values**2).sum()) - TRUE_KL**2)  # exact sd under π
    n = 200_000
    draws = torch.multinomial(PI, n, replacement=True, generator=torch.Generator().manual_seed(0))
    sample_mean = float(values[draws].mean())
    standard_error = std / math.sqrt(n)
    assert abs(sample_mean - TRUE_KL) < 4 * standard_error


# ----------------------------------------------------------------------------- exact KL


def test_exact_kl_hand_computed():
    logits = torch.tensor([0.0, math.log(3.0)])  # π = [1/4, 3/4]
    ref_logits = torch.tensor([0.0, 0.0])  # π_ref = [1/2, 1/2]
    # ¼·log(½) + ¾·log(3/2) = −0.1732868 + 0.3040988 = 0.1308120
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert exact_kl(logits, ref_logits).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.1308120, abs=1e-7)
    # at T = 2: π ∝ [1, √3], π_ref uniform
    s = 1 + math.sqrt(3)
    p = [1 / s, math.sqrt(3) / s]
    expected_t2 = sum(pi * math.log(pi / 0.5) for pi in p)
    assert exact_kl(logits, ref_logits, temperature=2.0).item() == pytest.approx(
        expected_t2, rel=1e-6
    )


def test_exact_kl_matches_manual_sum_and_is_zero_for_identical_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    kl = exact_kl(logits, ref_logits)
    assert kl.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            p = [math.exp(v) for v in logits[b, t].tolist()]
            q = [math.exp(v) for v in ref_logits[b, t].tolist()]
            p = [v / sum(p) for v in p]
            q = [v / sum(q) for v in q]
            manual = sum(pa * math.log(pa / qa) for pa, qa in zip(p, q, strict=True))
            assert kl[b, t].item() == pytest.approx(manual, rel=1e-10)
    assert torch.all(exact_kl(logits, logits) == 0)
    assert torch.all(exact_kl(logits.float(), logits.float()) == 0)


def test_exact_kl_with_masked_out_tokens_is_finite():
    logits = torch.tensor([0.0, 0.0, -math.inf], requires_grad=True)  # π = [½, ½, 0]
    ref_logits = torch.tensor([0.0, 0.0, 0.0])  # π_ref = [⅓, ⅓, ⅓]
    kl = exact_kl(logits, ref_logits)
    assert kl.item() == pytest.approx(math.log(1.5), rel=1e-6)
    kl.backward()
    assert torch.isfinite(logits.grad).all()


def test_exact_kl_agrees_with_k1_and_k3_expectations():
    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref_logits = torch.zeros(4, 7, dtype=torch.float64)
    log_p, log_q = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    for kind in ("k1", "k3"):
        expectation = (log_p.exp() * kl_estimate(log_p, log_q, kind)).sum(-1)
        assert torch.allclose(expectation, exact_kl(logits, ref_logits), rtol=1e-12)


# ----------------------------------------------------------------------------- prioritised KL


@pytest.mark.parametrize("form", ["entropy", "max_prob"])
def test_prioritized_weights_are_one_on_a_deterministic_reference(form):
    ref_logits = torch.zeros(2, 3, 11)
    ref_logits[..., 4] = 1e4  # one-hot-like
    w = prioritized_kl_weights(ref_logits, certainty_exponent=150.0, form=form)
    assert w.shape == (2, 3)
    assert torch.allclose(w, torch.ones(2, 3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("form", ["entropy", "max_prob"])
def test_prioritized_weights_vanish_on_a_uniform_reference(form):
    uniform = torch.zeros(2, 3, 11)
    for exponent in (1.0, 2.0, 150.0):
        assert torch.all(prioritized_kl_weights(uniform, exponent, form=form) == 0)
    # nearly uniform: near 0, and smaller for a larger exponent
    nearly = torch.tensor([[0.1, 0.0, -0.1, 0.05, 0.0]])
    w1 = prioritized_kl_weights(nearly, 1.0, form=form)
    w10 = prioritized_kl_weights(nearly, 10.0, form=form)
    assert 0 < w1.item() < 0.05 and 0 <= w10.item() < w1.item()
    # exponent 0 turns the prioritisation off: w = 1 everywhere
    assert torch.all(prioritized_kl_weights(nearly, 0.0, form=form) == 1)


def test_prioritized_weights_are_certainty_to_the_exponent():
    # entropy form, T = 1: Ĵ = (log 3 − H(softmax([2, 1, 0]))) / log 3
    z = [math.exp(v) for v in (2.0, 1.0, 0.0)]
    p = [v / sum(z) for v in z]
    j = (math.log(3) + sum(q * math.log(q) for q in p)) / math.log(3)
    w = prioritized_kl_weights(torch.tensor([2.0, 1.0, 0.0]), 3.0, form="entropy")
    assert w.item() == pytest.approx(j**3, rel=1e-5)
    # max_prob form at its default T = 4: Ĵ = 1 + log max softmax(ℓ/4) / log 3
    z4 = [math.exp(v / 4) for v in (2.0, 1.0, 0.0)]
    j4 = 1 + math.log(z4[0] / sum(z4)) / math.log(3)
    w4 = prioritized_kl_weights(torch.tensor([2.0, 1.0, 0.0]), 3.0, form="max_prob")
    assert w4.item() == pytest.approx(j4**3, rel=1e-5)
    # an explicit certainty temperature
    w4_t1 = prioritized_kl_weights(
        torch.tensor([2.0, 1.0, 0.0]), 3.0, form="max_prob", certainty_temperature=1.0
    )
    assert w4_t1.item() == pytest.approx((1 + math.log(p[0]) / math.log(3)) ** 3, rel=1e-5)
    with pytest.raises(ValueError, match="certainty_exponent"):
        prioritized_kl_weights(torch.zeros(3), -1.0)


def test_prioritized_weights_carry_no_gradient():
    ref_logits = torch.randn(2, 3, 5, requires_grad=True)
    w = prioritized_kl_weights(ref_logits, 2.0)
    assert not w.requires_grad
    # the weighted penalty's gradient reaches the policy's log-probs only
    logp = torch.randn(2, 3, requires_grad=True)
    kl_penalty(logp, torch.randn(2, 3), torch.ones(2, 3), "k2", weights=w).sum().backward()
    assert logp.grad is not None and ref_logits.grad is None


# ----------------------------------------------------------------------------- kl_penalty


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_unit_weights_change_nothing_bit_for_bit(kind):
    g = torch.Generator().manual_seed(3)
    logp, ref_logp = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [1.0] + [0.0] * 5])
    deterministic = torch.zeros(3, 6, 9)
    deterministic[..., 0] = 1e4
    weights = prioritized_kl_weights(deterministic, 150.0)
    assert torch.all(weights == 1)
    unweighted = kl_penalty(logp, ref_logp, mask, kind)
    assert torch.equal(kl_penalty(logp, ref_logp, mask, kind, weights=weights), unweighted)


def test_kl_penalty_values_weights_and_padding():
    logp = torch.tensor([[-0.5, -1.0, -2.0], [-1.0, -0.3, 0.0]])
    ref_logp = torch.tensor([[-1.0, -1.0, -0.5], [-1.5, -math.inf, math.nan]])  # junk at padding
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    k2 = kl_penalty(logp, ref_logp, mask, "k2")
    # row 0: ½ρ² with ρ = [0.5, 0, −1.5]; row 1: ρ = 0.5 then padding
    assert torch.allclose(k2, torch.tensor([[0.125, 0.0, 1.125], [0.125, 0.0, 0.0]]))
    weights = torch.tensor([[2.0, 5.0, 0.5], [4.0, math.nan, 7.0]])
    weighted = kl_penalty(logp, ref_logp, mask, "k2", weights=weights)
    assert torch.allclose(weighted, torch.tensor([[0.25, 0.0, 0.5625], [0.5, 0.0, 0.0]]))
    for kind in ("k1", "k3"):
        out = kl_penalty(logp, ref_logp, mask, kind)
        assert torch.all(out[1, 1:] == 0) and torch.isfinite(out).all()
    # no NaN gradient leaks from the padding
    logp.requires_grad_(True)
    kl_penalty(logp, ref_logp, mask, "k3", weights=weights).sum().backward()
    assert torch.isfinite(logp.grad).all() and torch.all(logp.grad[1, 1:] == 0)


# ------------------------------------------------- what each estimator's gradient is, in the loss


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_expected_gradient_of_each_estimator_in_the_loss(kind):
    """With the KL in the loss, the gradient flows through log π of tokens already sampled
    (no score-function term), so the expected gradient is Σ_a π(a)·∇k(ρ_a), enumerated
    exactly here on one categorical: k2 gives ∇KL(π‖π_ref), the reverse KL that KL-RL
    regularises; k3 gives ∇KL(π_ref‖π), the forward KL (GRPO's choice); k1 gives 0 in
    expectation. Derivation: ∇k1 = ∇log π, ∇k2 = ρ·∇log π, ∇k3 = (1 − π_ref/π)·∇log π, and
    Σ_a π·∇log π = 0."""
    torch.manual_seed(0)
    theta = torch.randn(7, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(7, dtype=torch.float64)
    logp = torch.log_softmax(theta, -1)
    ref_logp = torch.log_softmax(ref_logits, -1)
    probs = logp.exp().detach()  # the sampling distribution: no gradient through it
    per_token = kl_penalty(logp, ref_logp, torch.ones(7), kind)
    (estimated,) = torch.autograd.grad((probs * per_token).sum(), theta, retain_graph=True)

    reverse = (logp.exp() * (logp - ref_logp)).sum()  # KL(π‖π_ref)
    forward = (ref_logp.exp() * (ref_logp - logp)).sum()  # KL(π_ref‖π)
    (grad_reverse,) = torch.autograd.grad(reverse, theta, retain_graph=True)
    (grad_forward,) = torch.autograd.grad(forward, theta)
    expected = {"k1": torch.zeros(7, dtype=torch.float64), "k2": grad_reverse, "k3": grad_forward}
    assert torch.allclose(estimated, expected[kind], atol=1e-12)
    # and the three differ: the test would see a swap
    assert not torch.allclose(grad_reverse, grad_forward, atol=1e-3)
    assert grad_reverse.abs().max() > 1e-2
