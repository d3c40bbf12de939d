"""GRPO and Dr. GRPO (docs/methods.md §2, "GRPO") against hand computations: the
group-normalised advantages, the clipped loss with k3 inside it under each of TRL's reductions,
its gradient by finite differences, and the RL stage's whole loss with ``algorithm: grpo``.
No model: every tensor is written out."""

import math

import pytest
import torch

from tether.objectives import RLLossSettings, rl_loss
from tether.objectives.common import entropy_from_log_softmax
from tether.objectives.kl import kl_penalty
from tether.objectives.policy_gradient import (
    aggregate_token_losses,
    grpo_advantages,
    grpo_loss,
    reinforce_loss,
)

EPS = 1e-4  # TRL's ε of (r − mean) / (std + ε)


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_hand_computed():
    # group 1: rewards 1, 0, 0: mean 1/3, std with Bessel's correction
    #   √(((2/3)² + 2·(1/3)²) / 2) = √(1/3); group 2: all equal, std 0, advantages 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])
    a = grpo_advantages(rewards, 3, "group")
    s = math.sqrt(1 / 3)
    expected = [2 / 3 / (s + EPS), -1 / 3 / (s + EPS), -1 / 3 / (s + EPS), 0.0, 0.0, 0.0]
    assert a.tolist() == pytest.approx(expected, rel=1e-6)
    assert a[:3].sum().item() == pytest.approx(0.0, abs=1e-6)  # a group's advantages sum to 0


def test_batch_scale_and_dr_grpo_unscaled_advantages():
    rewards = torch.tensor([1.0, 0.0, 3.0, 5.0])
    # centred within each group of 2: ±0.5, ∓1
    centred = [0.5, -0.5, -1.0, 1.0]
    assert grpo_advantages(rewards, 2, "none").tolist() == pytest.approx(centred)
    # batch: the std of all four rewards (mean 2.25), Bessel's correction
    std = math.sqrt(sum((r - 2.25) ** 2 for r in (1, 0, 3, 5)) / 3)
    batch = grpo_advantages(rewards, 2, "batch")
    assert batch.tolist() == pytest.approx([c / (std + EPS) for c in centred], rel=1e-6)
    # a std from every process replaces this batch's
    given = grpo_advantages(rewards, 2, "batch", batch_std=torch.tensor(2.0))
    assert given.tolist() == pytest.approx([c / (2.0 + EPS) for c in centred], rel=1e-6)
    assert not grpo_advantages(rewards.requires_grad_(True), 2).requires_grad


def test_advantages_refuse_ragged_groups():
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        grpo_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="unknown reward scale"):
        grpo_advantages(torch.zeros(4), 2, "rank")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the loss

# two completions: row 0 three real tokens, row 1 one real token then padding (junk in it)
OLD = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
RATIOS = torch.tensor([[1.5, 1.1, 0.7], [0.9, 7.0, 7.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
ADV = torch.tensor([1.0, -2.0])
REF = torch.tensor([[-1.2, -0.8, -1.0], [-2.5, 0.0, 0.0]])
L_MAX = 5  # max_completion_length of dr_grpo


def _hand(aggregation, beta):
    """ℓ_t = −min(ρA, clip(ρ, 0.8, 1.2)A) + β·k3_t, k3 = exp(−d) − 1 + d, d = log π − log π_ref,
    reduced by hand."""
    logp = OLD + RATIOS.log()
    rows = []
    for b in range(2):
        n = int(MASK[b].sum())
        terms = []
        for t in range(n):
            rho, a = RATIOS[b, t].item(), ADV[b].item()
            clipped = min(max(rho, 0.8), 1.2)
            d = logp[b, t].item() - REF[b, t].item()
            terms.append(-min(rho * a, clipped * a) + beta * (math.exp(-d) - 1 + d))
        rows.append(terms)
    if aggregation == "grpo":
        return sum(sum(r) / len(r) for r in rows) / 2
    if aggregation == "dr_grpo":
        return sum(sum(r) for r in rows) / (2 * L_MAX)
    return sum(sum(r) for r in rows) / 4  # dapo: 4 real tokens


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_grpo_loss_hand_computed(aggregation, beta):
    logp = (OLD + RATIOS.log()).requires_grad_(True)
    kl = kl_penalty(logp, REF, MASK, "k3")
    loss, stats = grpo_loss(logp, OLD, ADV, MASK, 0.2, kl, beta, aggregation, L_MAX)
    assert loss.item() == pytest.approx(_hand(aggregation, beta), rel=1e-5)
    # the clipped term alone is pg_loss; the PPO diagnostics are token means:
    # outside [0.8, 1.2]: ρ = 1.5 and 0.7 (2 of 4); the clip wins at 1.5 (A > 0) only
    assert stats["pg_loss"] == pytest.approx(_hand(aggregation, 0.0), rel=1e-5)
    assert stats["clip_fraction"] == pytest.approx(0.5)
    assert stats["clip_active_fraction"] == pytest.approx(0.25)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 1.1 + 0.7 + 0.9) / 4, rel=1e-6)


def test_the_three_reductions_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    assert aggregate_token_losses(per_token, MASK, "grpo").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_token_losses(per_token, MASK, "dr_grpo", 5).item() == pytest.approx(10 / 10)
    assert aggregate_token_losses(per_token, MASK, "dapo").item() == pytest.approx(10 / 4)
    # dapo's N across processes: the count passed in replaces this batch's
    count = torch.tensor(8.0)
    assert aggregate_token_losses(per_token, MASK, "dapo", token_count=count).item() == 10 / 8
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_token_losses(per_token, MASK, "dr_grpo")


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
def test_grpo_gradient_by_finite_differences(aggregation):
    g = torch.Generator().manual_seed(3)
    old = torch.randn(3, 4, generator=g, dtype=torch.float64) - 1.0
    # ratios spread over both sides of the band [0.8, 1.2], away from its edges
    ratios = torch.tensor(
        [[1.5, 1.1, 0.7, 0.95], [0.5, 1.05, 1.3, 2.0], [0.85, 1.15, 3.0, 3.0]], dtype=torch.float64
    )
    ref = torch.randn(3, 4, generator=g, dtype=torch.float64) - 1.0
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    adv = torch.tensor([0.8, -1.1, 0.4], dtype=torch.float64)

    def loss_of(logp):
        kl = kl_penalty(logp, ref, mask, "k3")
        return grpo_loss(logp, old, adv, mask, 0.2, kl, 0.1, aggregation, 6)[0]

    logp = (old + ratios.log()).requires_grad_(True)
    loss_of(logp).backward()
    h = 1e-6
    numeric = torch.zeros_like(logp)
    for i in range(3):
        for j in range(4):
            bump = torch.zeros_like(logp)
            bump[i, j] = h
            up, down = loss_of(logp.detach() + bump), loss_of(logp.detach() - bump)
            numeric[i, j] = (up - down) / (2 * h)
    assert torch.allclose(logp.grad, numeric, atol=1e-8)
    assert torch.all(logp.grad[mask == 0] == 0)
    # where the clip wins the policy term is flat: only β·∂k3 = β·(1 − exp(−d)) / denominator
    # remains (row 0 token 0: ρ = 1.5 > 1.2 with A > 0)
    d = (logp[0, 0] - ref[0, 0]).item()
    denominator = {"grpo": 3 * 4, "dr_grpo": 3 * 6, "dapo": 9}[aggregation]
    assert logp.grad[0, 0].item() == pytest.approx(0.1 * (1 - math.exp(-d)) / denominator)


def test_on_policy_grpo_is_reinforce_with_group_advantages():
    """At ρ = 1 (the first of ``num_iterations`` updates) and β = 0, dapo's gradient is the
    token-mean REINFORCE gradient with the group-normalised advantages."""
    g = torch.Generator().manual_seed(4)
    old = torch.randn(4, 5, generator=g)
    mask = torch.tensor([[1.0] * 5, [1.0] * 2 + [0.0] * 3, [1.0] * 4 + [0.0], [1.0] * 5])
    adv = grpo_advantages(torch.tensor([1.0, -1.0, -1.0, -1.0]), 2)
    logp = old.clone().requires_grad_(True)
    loss, stats = grpo_loss(logp, old, adv, mask, 0.2)
    loss.backward()
    reference = old.clone().requires_grad_(True)
    reinforce_loss(reference, adv, mask)[0].backward()
    assert torch.allclose(logp.grad, reference.grad, atol=1e-7)
    assert stats["clip_fraction"] == 0.0 and stats["approx_kl"] == 0.0


# ----------------------------------------------------------------------------- rl_loss


def test_rl_loss_with_grpo_puts_the_kl_in_the_per_token_loss_once():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 3, 7, generator=g)
    ref_logits = torch.randn(4, 3, 7, generator=g)
    tokens = torch.randint(0, 7, (4, 3), generator=g)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    log_p = torch.log_softmax(logits, -1).requires_grad_(True)
    logp = log_p.gather(-1, tokens[..., None]).squeeze(-1)
    ref_log_softmax = torch.log_softmax(ref_logits, -1)
    ref_logp = ref_log_softmax.gather(-1, tokens[..., None]).squeeze(-1)
    rewards = torch.tensor([1.0, -1.0, 1.0, 1.0])
    old = logp.detach() - 0.1  # ρ = e^0.1 ≈ 1.105: inside the band
    settings = RLLossSettings(
        algorithm="grpo",
        kl_coef=0.3,
        kl_estimator="k3",
        entropy_coef=0.02,
        group_size=2,
        grpo_loss="grpo",
        reward_scale="none",
        max_completion_length=3,
    )
    loss, stats = rl_loss(
        log_p, logp, ref_logp, ref_log_softmax, mask, rewards, settings, old_logp=old
    )
    # Dr. GRPO's unscaled advantages: group 1 (1, −1) → ±1, group 2 (1, 1) → 0
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0])
    kl = kl_penalty(logp, ref_logp, mask, "k3")
    per_token = -math.exp(0.1) * adv[:, None] + 0.3 * kl
    by_hand = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    entropy = (entropy_from_log_softmax(log_p) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx((by_hand - 0.02 * entropy).item(), rel=1e-5)
    assert stats["kl_penalty"] == pytest.approx(((kl * mask).sum() / mask.sum()).item(), rel=1e-5)
    # advantages computed once over the whole rollout are taken as given
    given = torch.tensor([2.0, 0.0, 0.0, 0.0])
    loss2, _ = rl_loss(
        log_p,
        logp,
        ref_logp,
        ref_log_softmax,
        mask,
        rewards,
        settings,
        old_logp=old,
        advantages=given,
    )
    per_token2 = -math.exp(0.1) * given[:, None] + 0.3 * kl
    by_hand2 = ((per_token2 * mask).sum(1) / mask.sum(1)).mean() - 0.02 * entropy
    assert loss2.item() == pytest.approx(by_hand2.item(), rel=1e-5)


def test_grpo_settings_refuse_the_kl_in_the_reward():
    with pytest.raises(ValueError, match="kl_placement loss"):
        RLLossSettings(algorithm="grpo", kl_estimator="k1", kl_placement="reward")
