"""DPO, IPO, XPO and the Bradley–Terry reward-model loss: hand computations, finite-difference
gradients, the XPO bonus's direction, and DPO's optimum on an enumerable toy (docs/methods.md §7)."""

import math

import pytest
import torch

from tether.objectives.preference import (
    bradley_terry_loss,
    dpo_loss,
    ipo_loss,
    preference_loss,
    preference_pairs,
    sequence_logprobs,
    sequence_logratios,
    xpo_loss,
)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------- sequence sums


def test_sequence_logratios_hand_computed_and_padding_is_ignored():
    logp = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, float("-inf"), float("nan")]])
    ref_logp = torch.tensor([[-1.0, -1.5, -1.0], [-0.4, 0.0, float("inf")]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    h = sequence_logratios(logp, ref_logp, mask)
    # row 0: 0.5 + 0.5 − 1.0 = 0.0; row 1: −0.1 + 0.4 = 0.3 (padding holds −inf, nan, inf)
    assert torch.allclose(h, torch.tensor([0.0, 0.3]))
    # length-normalised: 0/3 and 0.3/1
    assert torch.allclose(sequence_logratios(logp, ref_logp, mask, average=True), h / mask.sum(1))
    # log π(y|x): −3.5 and −0.1
    assert torch.allclose(sequence_logprobs(logp, mask), torch.tensor([-3.5, -0.1]))


def test_sequence_logratios_gradient_reaches_the_policy_only():
    logp = torch.tensor([[-0.5, -1.0], [-0.2, -7.0]], requires_grad=True)
    ref_logp = torch.tensor([[-1.0, -1.0], [-0.3, -1.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    sequence_logratios(logp, ref_logp, mask).sum().backward()
    assert torch.equal(logp.grad, mask)  # ∂h/∂log π_t = m_t
    assert ref_logp.grad is None  # the reference is frozen


# ----------------------------------------------------------------------------- DPO and IPO by hand


def test_dpo_loss_hand_computed():
    beta = 0.1
    chosen = torch.tensor([1.0, -0.2])
    rejected = torch.tensor([-0.5, 0.8])
    # Δ = [1.5, −1.0], β·Δ = [0.15, −0.10]
    losses = [-_log_sigmoid(0.15), -_log_sigmoid(-0.10)]
    # −log σ(0.15) = log(1 + e^{−0.15}) = 0.62095; −log σ(−0.1) = log(1 + e^{0.1}) = 0.74440
    assert losses[0] == pytest.approx(math.log(1 + math.exp(-0.15)), rel=1e-12)
    assert losses[0] == pytest.approx(0.62095, abs=1e-5)
    assert losses[1] == pytest.approx(0.74440, abs=1e-5)
    loss, stats = dpo_loss(chosen, rejected, beta)
    assert loss.item() == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert stats["loss"] == pytest.approx(loss.item())
    assert stats["reward_margin"] == pytest.approx((0.15 - 0.10) / 2, rel=1e-6)
    assert stats["reward_accuracy"] == 0.5  # the first pair is ranked right, the second not
    assert stats["chosen_reward"] == pytest.approx(beta * (1.0 - 0.2) / 2, rel=1e-6)
    assert stats["rejected_reward"] == pytest.approx(beta * (-0.5 + 0.8) / 2, rel=1e-6)


def test_dpo_label_smoothing_hand_computed_and_at_a_tie():
    eps = 0.1
    loss, _ = dpo_loss(torch.tensor([1.0]), torch.tensor([-0.5]), 0.1, label_smoothing=eps)
    # −(1 − ε)·log σ(0.15) − ε·log σ(−0.15)
    expected = -(1 - eps) * _log_sigmoid(0.15) - eps * _log_sigmoid(-0.15)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # at Δ = 0 every form is log 2 and a tie is not an accurate ranking
    loss, stats = dpo_loss(torch.tensor([0.3]), torch.tensor([0.3]), 0.5, label_smoothing=0.2)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert stats["reward_accuracy"] == 0.0


def test_dpo_is_stable_at_large_margins():
    chosen = torch.tensor([200.0, -200.0], requires_grad=True)
    loss, _ = dpo_loss(chosen, torch.zeros(2), beta=1.0)
    # −log σ(200) ≈ e^{−200} ≈ 0; −log σ(−200) ≈ 200, not inf
    assert loss.item() == pytest.approx(100.0, rel=1e-6)
    loss.backward()
    assert torch.isfinite(chosen.grad).all()


def test_ipo_loss_hand_computed():
    beta = 0.25  # the target margin 1/(2β) = 2
    chosen = torch.tensor([1.0, -0.2])
    rejected = torch.tensor([-0.5, 0.8])
    loss, stats = ipo_loss(chosen, rejected, beta)
    # Δ = [1.5, −1.0]: (1.5 − 2)² = 0.25 and (−1 − 2)² = 9, mean 4.625
    assert loss.item() == pytest.approx(4.625, rel=1e-6)
    assert stats["reward_margin"] == pytest.approx(beta * (1.5 - 1.0) / 2, rel=1e-6)
    assert stats["reward_accuracy"] == 0.5
    # the minimum is at Δ = 1/(2β), not at Δ → ∞
    at_target, _ = ipo_loss(torch.tensor([2.0]), torch.tensor([0.0]), beta)
    assert at_target.item() == 0.0
    assert preference_loss(chosen, rejected, beta, kind="ipo")[0].item() == loss.item()


def test_pair_losses_reject_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(x, torch.zeros(2), 0.1)
    with pytest.raises(ValueError, match="beta"):
        ipo_loss(x, x, 0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, 0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss(x, x, 0.1, kind="hinge")


# ----------------------------------------------------------------------------- gradients


def test_dpo_gradient_closed_form():
    beta = 0.3
    chosen = torch.tensor([0.4, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.1, 0.5, -1.0], dtype=torch.float64, requires_grad=True)
    loss, _ = dpo_loss(chosen, rejected, beta)
    loss.backward()
    # ∂/∂h_w [−log σ(βΔ)] = −β·σ(−βΔ), divided by B for the mean; ∂/∂h_l is its negative
    delta = (chosen - rejected).detach()
    expected = -beta * torch.sigmoid(-beta * delta) / 3
    assert torch.allclose(chosen.grad, expected, rtol=1e-12)
    assert torch.allclose(rejected.grad, -expected, rtol=1e-12)


@pytest.mark.parametrize(
    "fn",
    [
        lambda w, lo, s: dpo_loss(w, lo, 0.7)[0],
        lambda w, lo, s: dpo_loss(w, lo, 0.7, label_smoothing=0.15)[0],
        lambda w, lo, s: ipo_loss(w, lo, 0.7)[0],
        lambda w, lo, s: xpo_loss(w, lo, s, 0.7, alpha=0.3)[0],
        lambda w, lo, s: xpo_loss(w, lo, s, 0.7, alpha=0.3, kind="ipo")[0],
        lambda w, lo, s: bradley_terry_loss(w, lo)[0],
    ],
    ids=["dpo", "cdpo", "ipo", "xpo", "xpo_ipo", "bradley_terry"],
)
def test_gradients_match_finite_differences(fn):
    g = torch.Generator().manual_seed(0)
    inputs = tuple(
        torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    assert torch.autograd.gradcheck(fn, inputs)


def test_dpo_gradient_through_token_logprobs():
    """End to end: token log-probs → sequence log-ratios → DPO, by finite differences."""
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(2, 2, 3, generator=g, dtype=torch.float64).log_softmax(-1)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)

    def fn(chosen_logp, rejected_logp):
        h_w = sequence_logratios(chosen_logp, ref[0], mask)
        h_l = sequence_logratios(rejected_logp, ref[1], mask)
        return dpo_loss(h_w, h_l, beta=0.5)[0]

    inputs = tuple(
        torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)
    )
    assert torch.autograd.gradcheck(fn, inputs)


# ----------------------------------------------------------------------------- XPO


def _toy_sequence_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A position-wise categorical 'model': log π(y_t) = log_softmax(logits[t])[y_t], [1, T]."""
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).unsqueeze(0)


def test_a_gradient_step_on_the_xpo_bonus_lowers_log_prob_of_the_reference_sample():
    torch.manual_seed(0)
    logits = torch.nn.Parameter(torch.randn(4, 6))  # T = 4 positions, V = 6
    ref_sample = torch.tensor([2, 0, 5, 1])  # ỹ ∼ π_ref
    mask = torch.ones(1, 4)
    # the pair does not depend on θ here, so the step is the bonus's alone
    chosen, rejected = torch.tensor([0.5]), torch.tensor([0.1])

    def log_prob_of_ref_sample() -> torch.Tensor:
        return sequence_logprobs(_toy_sequence_logp(logits, ref_sample), mask)

    before = log_prob_of_ref_sample().item()
    loss, stats = xpo_loss(chosen, rejected, log_prob_of_ref_sample(), beta=0.1, alpha=0.5)
    assert stats["xpo_bonus"] == pytest.approx(before, rel=1e-6)
    loss.backward()
    step = logits.grad.clone()
    with torch.no_grad():
        logits -= 0.1 * step
    after = log_prob_of_ref_sample().item()
    assert after < before - 1e-3
    # the step is −lr·α·∇log π(ỹ), so to first order log π(ỹ) moves by −lr·α·‖∇log π(ỹ)‖²
    with torch.no_grad():
        logits += 0.1 * step  # back to θ
    grad_logp = torch.autograd.grad(log_prob_of_ref_sample().sum(), logits)[0]
    assert torch.allclose(step, 0.5 * grad_logp)
    with torch.no_grad():
        logits -= 1e-4 * step
    predicted = -1e-4 * 0.5 * float(grad_logp.square().sum())
    assert log_prob_of_ref_sample().item() - before == pytest.approx(predicted, rel=2e-2)


def test_xpo_is_dpo_plus_the_bonus():
    chosen = torch.tensor([1.0, -0.2])
    rejected = torch.tensor([-0.5, 0.8])
    ref_sample_logp = torch.tensor([-12.0, -30.0], requires_grad=True)
    dpo, dpo_stats = dpo_loss(chosen, rejected, 0.1)
    loss, stats = xpo_loss(chosen, rejected, ref_sample_logp, beta=0.1, alpha=1e-2)
    # L = DPO + α·mean log π(ỹ) = DPO + 0.01·(−21)
    assert loss.item() == pytest.approx(dpo.item() - 0.21, rel=1e-6)
    assert stats["preference_loss"] == pytest.approx(dpo_stats["loss"])
    assert stats["xpo_bonus"] == pytest.approx(-21.0)
    assert stats["loss"] == pytest.approx(loss.item())
    assert stats["reward_accuracy"] == dpo_stats["reward_accuracy"]
    loss.backward()
    assert torch.allclose(ref_sample_logp.grad, torch.tensor([0.005, 0.005]))  # α/B, positive
    # α = 0 is online DPO
    zero_alpha, _ = xpo_loss(chosen, rejected, ref_sample_logp, beta=0.1, alpha=0.0)
    assert zero_alpha.item() == dpo.item()
    # the IPO variant swaps the pair term only
    ipo, _ = ipo_loss(chosen, rejected, 0.1)
    with_ipo, _ = xpo_loss(chosen, rejected, ref_sample_logp, beta=0.1, alpha=1e-2, kind="ipo")
    assert with_ipo.item() == pytest.approx(ipo.item() - 0.21, rel=1e-6)
    with pytest.raises(ValueError, match="one entry per pair"):
        xpo_loss(chosen, rejected, torch.zeros(3), beta=0.1, alpha=1e-2)


def test_xpo_without_a_bonus_is_online_dpo_and_dropped_pairs_leave_the_pair_term():
    chosen = torch.tensor([1.0, -0.2, 0.3], requires_grad=True)
    rejected = torch.tensor([-0.5, 0.8, 0.3])
    ref_sample_logp = torch.tensor([-12.0, -30.0, -3.0])
    # no ỹ log-probs: online DPO, the pair loss alone and no bonus stat
    dpo, dpo_stats = dpo_loss(chosen, rejected, 0.1)
    loss, stats = xpo_loss(chosen, rejected, None, beta=0.1, alpha=0.0)
    assert loss.item() == dpo.item() and "xpo_bonus" not in stats
    assert stats["preference_loss"] == dpo_stats["loss"] and stats["loss"] == dpo.item()
    # ties dropped (the third pair): the pair term over the kept pairs, the bonus over all ỹ
    keep = torch.tensor([True, True, False])
    kept, _ = dpo_loss(chosen[:2], rejected[:2], 0.1)
    loss, stats = xpo_loss(chosen, rejected, ref_sample_logp, 0.1, 1e-2, keep=keep)
    assert loss.item() == pytest.approx(kept.item() + 1e-2 * (-15.0), rel=1e-6)
    assert stats["preference_loss"] == pytest.approx(kept.item())
    # every pair dropped: no preference signal, a zero pair term that reaches every input
    none = torch.zeros(3, dtype=torch.bool)
    loss, stats = xpo_loss(chosen, rejected, ref_sample_logp, 0.1, 1e-2, keep=none)
    assert loss.item() == pytest.approx(1e-2 * (-15.0), rel=1e-6)
    assert stats == {"preference_loss": 0.0, "xpo_bonus": -15.0, "loss": loss.item()}
    loss.backward()
    assert chosen.grad is not None and not chosen.grad.any()


# ----------------------------------------------------------------------------- online pairs


def test_preference_pairs_ties_go_to_the_policy_sample():
    rewards_a = torch.tensor([1.0, 0.0, 2.0, 2.0])
    rewards_b = torch.tensor([0.0, 1.0, 2.0, 3.0])
    pairs = preference_pairs(rewards_a, rewards_b, policy_sample="a")
    assert pairs.a_is_chosen.tolist() == [True, False, True, False]
    assert pairs.tie.tolist() == [False, False, True, False]
    pairs_b = preference_pairs(rewards_a, rewards_b, policy_sample="b")
    assert pairs_b.a_is_chosen.tolist() == [True, False, False, False]
    assert torch.equal(pairs_b.tie, pairs.tie)

    # order() routes per-pair values and per-token tensors alike
    h_a, h_b = torch.tensor([10.0, 11.0, 12.0, 13.0]), torch.tensor([20.0, 21.0, 22.0, 23.0])
    chosen, rejected = pairs.order(h_a, h_b)
    assert chosen.tolist() == [10.0, 21.0, 12.0, 23.0]
    assert rejected.tolist() == [20.0, 11.0, 22.0, 13.0]
    tokens_a = torch.arange(8).view(4, 2)
    tokens_b = -torch.arange(8).view(4, 2)
    chosen_tokens, _ = pairs.order(tokens_a, tokens_b)
    assert chosen_tokens.tolist() == [[0, 1], [-2, -3], [4, 5], [-6, -7]]


def test_preference_pairs_reject_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        preference_pairs(torch.tensor([float("nan")]), torch.tensor([0.0]), policy_sample="a")
    with pytest.raises(ValueError, match="policy_sample"):
        preference_pairs(torch.zeros(1), torch.zeros(1), policy_sample="both")
    with pytest.raises(ValueError, match="same shape"):
        preference_pairs(torch.zeros(2), torch.zeros(1), policy_sample="a")


# ----------------------------------------------------------------------------- Bradley–Terry


def test_bradley_terry_hand_computed_and_shift_invariant():
    s_w = torch.tensor([2.0, 0.0])
    s_l = torch.tensor([1.0, 1.0])
    loss, stats = bradley_terry_loss(s_w, s_l)
    # −log σ(1) = log(1 + e^{−1}) = 0.31326; −log σ(−1) = log(1 + e) = 1.31326
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.81326, abs=1e-5)
    assert stats["accuracy"] == 0.5
    assert stats["margin"] == 0.0
    shifted, _ = bradley_terry_loss(s_w + 5.0, s_l + 5.0)
    assert shifted.item() == pytest.approx(loss.item(), rel=1e-6)


# ----------------------------------------------------------------------------- DPO's optimum


def test_population_dpo_optimum_is_the_kl_rl_optimum():
    """On 4 outcomes with Bradley–Terry preferences P(i ≻ j) = σ(r_i − r_j), the expected DPO
    loss over all ordered pairs is minimised by π ∝ π_ref·exp(r/β): the KL-RL optimum of
    docs/methods.md §2 (β·h recovers r up to a constant)."""
    beta = 0.5
    r = torch.tensor([0.0, 1.0, -0.5, 2.0], dtype=torch.float64)
    log_ref = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64).log()
    prefer = torch.sigmoid(r[:, None] - r[None, :])  # P(i ≻ j)
    logits = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [logits],
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def expected_loss() -> torch.Tensor:
        opt.zero_grad()
        h = logits.log_softmax(-1) - log_ref
        # every ordered pair (i chosen over j), weighted by how often it is observed
        loss = sum(
            prefer[a, b] * dpo_loss(h[a : a + 1], h[b : b + 1], beta)[0]
            for a in range(4)
            for b in range(4)
            if a != b
        )
        loss.backward()
        return loss

    opt.step(expected_loss)
    optimum = (log_ref + r / beta).softmax(-1)
    assert torch.allclose(logits.softmax(-1), optimum, rtol=0, atol=1e-7)
