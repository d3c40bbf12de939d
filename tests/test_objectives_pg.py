"""Returns, advantages (GAE, RLOO) and the policy-gradient losses against hand computations
(docs/methods.md §2). No model: every tensor is written out."""

import math

import pytest
import torch

from tether.objectives.common import entropy_from_log_softmax, masked_mean
from tether.objectives.policy_gradient import (
    discounted_returns,
    gae,
    ppo_clip_loss,
    reinforce_loss,
    rloo_baseline,
    shape_rewards_with_kl,
    terminal_rewards,
    value_loss,
)

# two episodes: row 0 has 3 real tokens, row 1 has 2 then padding (holding junk on purpose)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
REWARDS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
VALUES = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, 9.9]])


# ----------------------------------------------------------------------------- masked mean


def test_masked_mean_is_a_token_mean_over_the_batch():
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, math.nan, math.inf]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # (1 + 2 + 3 + 10) / 4, not the mean of the row means (2 + 10) / 2
    assert masked_mean(values, mask).item() == pytest.approx(4.0)
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


# ----------------------------------------------------------------------------- rewards


def test_terminal_rewards_on_the_last_real_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]).float()
    rewards = terminal_rewards(torch.tensor([1.0, 2.0, 3.0, 4.0]), mask)
    expected = torch.tensor(
        [[0.0, 0.0, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]]
    )
    assert torch.equal(rewards, expected)
    assert rewards.dtype == torch.float32


def test_shape_rewards_with_kl():
    token_rewards = torch.tensor([[0.0, 0.0, 1.0]])
    kl = torch.tensor([[0.1, -0.2, 0.4]], requires_grad=True)
    shaped = shape_rewards_with_kl(token_rewards, kl, kl_coef=0.5)
    # r − 0.5·kl = [−0.05, 0.1, 0.8]
    assert torch.allclose(shaped, torch.tensor([[-0.05, 0.1, 0.8]]))
    assert not shaped.requires_grad


# ----------------------------------------------------------------------------- returns and GAE


def test_discounted_returns_hand_computed():
    returns = discounted_returns(REWARDS, MASK, gamma=0.9)
    # row 0: G_2 = 1, G_1 = 0.9·1 = 0.9, G_0 = 0.9·0.9 = 0.81
    # row 1: G_1 = 2 (the 5 at padding is ignored), G_0 = 0.9·2 = 1.8, padding 0
    assert torch.allclose(returns, torch.tensor([[0.81, 0.9, 1.0], [1.8, 2.0, 0.0]]))


def test_gae_hand_worked_episodes():
    gamma, lam = 0.9, 0.8  # γλ = 0.72
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma, lam)
    # Row 0 (3 steps, V = [0.5, 0.6, 0.7], terminal after t = 2):
    #   δ_2 = 1 + 0.9·0   − 0.7 = 0.3
    #   δ_1 = 0 + 0.9·0.7 − 0.6 = 0.03
    #   δ_0 = 0 + 0.9·0.6 − 0.5 = 0.04
    #   A_2 = 0.3
    #   A_1 = 0.03 + 0.72·0.3   = 0.246
    #   A_0 = 0.04 + 0.72·0.246 = 0.21712
    #   R = A + V = [0.71712, 0.846, 1.0]
    # Row 1 (2 steps, V = [1.0, 0.5], terminal after t = 1; the 9.9 and 5 at padding are junk):
    #   δ_1 = 2 + 0.9·0   − 0.5 = 1.5
    #   δ_0 = 0 + 0.9·0.5 − 1.0 = −0.55
    #   A_1 = 1.5
    #   A_0 = −0.55 + 0.72·1.5 = 0.53
    #   R = [1.53, 2.0, 0]
    assert torch.allclose(advantages, torch.tensor([[0.21712, 0.246, 0.3], [0.53, 1.5, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[0.71712, 0.846, 1.0], [1.53, 2.0, 0.0]]))


def test_gae_with_lambda_one_is_returns_minus_values():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 7, generator=g, dtype=torch.float64)
    values = torch.randn(4, 7, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 5, 1, 3])
    mask = (torch.arange(7) < lengths[:, None]).double()
    advantages, returns = gae(rewards, values, mask, gamma=0.95, lam=1.0)
    discounted = discounted_returns(rewards, mask, gamma=0.95)
    assert torch.allclose(advantages, (discounted - values) * mask, atol=1e-12)
    assert torch.allclose(returns, discounted, atol=1e-12)
    # λ = 0: the one-step TD error
    advantages0, _ = gae(rewards, values, mask, gamma=0.95, lam=0.0)
    next_values = torch.nn.functional.pad(values * mask, (0, 1))[:, 1:]
    assert torch.allclose(advantages0, (rewards + 0.95 * next_values - values) * mask, atol=1e-12)


def test_gae_outputs_are_detached():
    values = VALUES.clone().requires_grad_(True)
    advantages, returns = gae(REWARDS, values, MASK, 1.0, 0.95)
    assert not advantages.requires_grad and not returns.requires_grad


def test_a_row_cut_at_max_new_tokens_gets_no_bootstrap():
    """A row that fills every column (cut at max_new_tokens, no EOS) ends its episode at the
    cut, as an EOS-terminated row does: its reward is judged on the cut completion and nothing
    continues it, so its last advantage is r_T − V_T, with no γ·V of a next state."""
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 3.0], [0.5, 3.0, 7.0]])  # row 1: junk after its EOS
    cut = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 0 is cut, row 1 ended
    advantages, returns = gae(rewards, values, cut, gamma, lam)
    assert advantages[0, 2].item() == pytest.approx(1.0 - 3.0)  # r_T − V_T
    assert advantages[1, 1].item() == pytest.approx(1.0 - 3.0)  # the same at an EOS
    assert returns[0, 2].item() == pytest.approx(1.0)  # the value target is the reward alone
    # the earlier steps bootstrap from the values inside the row only
    delta_1 = 0.0 + gamma * 3.0 - 0.6
    assert advantages[0, 1].item() == pytest.approx(delta_1 + gamma * lam * (1.0 - 3.0))


# ----------------------------------------------------------------------------- RLOO


def test_rloo_hand_computed_and_zero_sum():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, k = 3 each
    advantages = rloo_baseline(rewards, group_size=3)
    # prompt 1: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 → A = [−3, −1.5, 4.5]
    # prompt 2: baselines (0+3)/2 = 1.5, 1.5, (0+0)/2 = 0          → A = [−1.5, −1.5, 3]
    assert torch.allclose(advantages, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    assert torch.allclose(advantages.view(2, 3).sum(1), torch.zeros(2))
    # the same as k/(k−1)·(r − group mean)
    groups = rewards.view(2, 3)
    assert torch.allclose(advantages, (1.5 * (groups - groups.mean(1, keepdim=True))).view(-1))


def test_rloo_rejects_bad_groups():
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        rloo_baseline(torch.zeros(5), group_size=3)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_baseline(torch.zeros(4), group_size=1)


# ----------------------------------------------------------------------------- REINFORCE


def test_reinforce_loss_value_and_broadcast():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    seq_advantages = torch.tensor([2.0, -1.0])
    loss, stats = reinforce_loss(logp, seq_advantages, mask)
    # −(2·(−1 − 2 − 0.5) + (−1)·(−0.1)) / 4 = −(−7 + 0.1) / 4 = 1.725
    assert loss.item() == pytest.approx(1.725)
    token_advantages = seq_advantages[:, None].expand(2, 3)
    assert torch.equal(reinforce_loss(logp, token_advantages, mask)[0], loss)
    assert stats["pg_loss"] == pytest.approx(1.725)


def test_reinforce_gradient_by_finite_differences():
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    advantages = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float64)
    loss, _ = reinforce_loss(logp, advantages, mask)
    loss.backward()
    assert advantages.grad is None  # advantages are detached
    h = 1e-6
    numeric = torch.zeros_like(logp)
    for i in range(3):
        for j in range(4):
            bump = torch.zeros_like(logp)
            bump[i, j] = h
            up = reinforce_loss(logp.detach() + bump, advantages.detach(), mask)[0]
            down = reinforce_loss(logp.detach() - bump, advantages.detach(), mask)[0]
            numeric[i, j] = (up - down) / (2 * h)
    assert torch.allclose(logp.grad, numeric, atol=1e-8)
    # and in closed form: −m·A / Σm
    assert torch.allclose(logp.grad, -mask * advantages.detach() / mask.sum())


# ----------------------------------------------------------------------------- PPO


def _logp_for_ratios(ratios: list[float], old_logp: torch.Tensor) -> torch.Tensor:
    return (old_logp + torch.tensor([ratios]).log()).detach().requires_grad_(True)


def test_ppo_gradient_is_zero_when_clipped_and_unclipped_inside_the_band():
    eps = 0.2
    old_logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    # positive advantage, ratio 1.5 > 1 + ε: clipped, no gradient
    logp = _logp_for_ratios([1.5, 1.5], old_logp)
    loss, _ = ppo_clip_loss(logp, old_logp, torch.tensor([1.0]), mask, eps)
    loss.backward()
    assert torch.all(logp.grad == 0)
    # negative advantage, ratio 0.5 < 1 − ε: clipped too
    logp = _logp_for_ratios([0.5, 0.5], old_logp)
    ppo_clip_loss(logp, old_logp, torch.tensor([-1.0]), mask, eps)[0].backward()
    assert torch.all(logp.grad == 0)
    # inside the band: the gradient of the unclipped surrogate −mean(ρ·A)
    advantages = torch.tensor([[0.7, -1.3]])
    logp = _logp_for_ratios([1.1, 0.9], old_logp)
    ppo_clip_loss(logp, old_logp, advantages, mask, eps)[0].backward()
    reference = logp.detach().clone().requires_grad_(True)
    (-(torch.exp(reference - old_logp) * advantages).mean()).backward()
    assert torch.allclose(logp.grad, reference.grad, rtol=1e-6)
    # d/dlogp of −ρ·A/N is −ρ·A/N
    assert torch.allclose(logp.grad, -torch.tensor([[1.1 * 0.7, 0.9 * -1.3]]) / 2, rtol=1e-6)


def test_ppo_loss_and_stats_hand_computed():
    eps = 0.2
    old_logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    ratios = [1.5, 1.1, 0.7, 1.0, 3.0]  # the last token is padding
    logp = _logp_for_ratios(ratios, old_logp)
    advantages = torch.tensor([[1.0, 1.0, 1.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = ppo_clip_loss(logp, old_logp, advantages, mask, eps)
    # min(ρA, clip(ρ)A): 1.5 → min(1.5, 1.2) = 1.2; 1.1 → 1.1; 0.7 → min(0.7, 0.8) = 0.7;
    # 1.0 with A = −1 → −1.0.   loss = −(1.2 + 1.1 + 0.7 − 1.0)/4 = −0.5
    assert loss.item() == pytest.approx(-0.5, rel=1e-6)
    # outside [0.8, 1.2]: ρ = 1.5 and 0.7 → 2/4; the clip wins (zero gradient) only at 1.5 → 1/4
    assert stats["clip_fraction"] == pytest.approx(0.5)
    assert stats["clip_active_fraction"] == pytest.approx(0.25)
    # approx KL(π_old‖π_θ) = mean(ρ − 1 − log ρ) over real tokens
    expected_kl = sum(r - 1 - math.log(r) for r in ratios[:4]) / 4
    assert stats["approx_kl"] == pytest.approx(expected_kl, rel=1e-5)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 1.1 + 0.7 + 1.0) / 4, rel=1e-6)


def test_ppo_on_policy_equals_reinforce_gradient():
    g = torch.Generator().manual_seed(2)
    old_logp = torch.randn(2, 5, generator=g)
    advantages = torch.randn(2, 5, generator=g)
    mask = torch.tensor([[1.0] * 5, [1.0] * 2 + [0.0] * 3])
    logp = old_logp.clone().requires_grad_(True)
    loss, stats = ppo_clip_loss(logp, old_logp, advantages, mask, 0.2)
    loss.backward()
    reference = old_logp.clone().requires_grad_(True)
    reinforce_loss(reference, advantages, mask)[0].backward()
    # at ρ = 1, ∇ρ = ρ·∇log π = ∇log π
    assert torch.allclose(logp.grad, reference.grad, atol=1e-7)
    assert stats["clip_fraction"] == 0.0 and stats["approx_kl"] == 0.0


# ----------------------------------------------------------------------------- value loss, entropy


def test_value_loss_hand_computed_and_clipped():
    values = torch.tensor([[1.0, 2.0, 7.0]], requires_grad=True)
    returns = torch.tensor([[0.0, 2.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, returns, mask)
    # ½·(1² + 0.5²)/2 = 0.3125
    assert loss.item() == pytest.approx(0.3125)
    assert stats["value_loss"] == pytest.approx(0.3125)
    # clipped around old values [0.5, 2.0] with c = 0.2: V^clip = [0.7, 2.0]
    # max((1 − 0)², (0.7 − 0)²) = 1; max(0.25, 0.25) = 0.25 → same loss, no clip active
    old_values = torch.tensor([[0.5, 2.0, 0.0]])
    clipped_loss, clipped_stats = value_loss(values, returns, mask, old_values, clip=0.2)
    assert clipped_loss.item() == pytest.approx(0.3125)
    assert clipped_stats["value_clip_fraction"] == 0.0
    # returns above: old 0.5, new 1.0, return 3 → V^clip = 0.7, errors 4 vs 5.29: clip wins
    clipped_loss, clipped_stats = value_loss(
        values, torch.tensor([[3.0, 2.5, 0.0]]), mask, old_values, clip=0.2
    )
    # ½·(5.29 + 0.25)/2 = 1.385
    assert clipped_loss.item() == pytest.approx(1.385)
    assert clipped_stats["value_clip_fraction"] == pytest.approx(0.5)
    clipped_loss.backward()
    assert values.grad[0, 0] == 0  # the clipped branch does not depend on V there
    with pytest.raises(ValueError, match="old_values"):
        value_loss(values, returns, mask, clip=0.2)


def entropy_bonus(logits, mask, temperature=1.0):
    """The RL loss's entropy term: the masked mean of H(softmax(ℓ/T)) over real tokens."""
    return masked_mean(entropy_from_log_softmax(torch.log_softmax(logits / temperature, -1)), mask)


def test_entropy_bonus_hand_computed():
    logits = torch.zeros(2, 3, 4)
    logits[1, 0] = torch.tensor([0.0, math.log(3.0), -math.inf, -math.inf])  # p = [¼, ¾, 0, 0]
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    entropy_mixed = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.5623351
    # real tokens: two uniform rows (log 4 each) and the mixed one
    expected = (2 * math.log(4) + entropy_mixed) / 3
    logits.requires_grad_(True)
    bonus = entropy_bonus(logits, mask)
    assert bonus.item() == pytest.approx(expected, rel=1e-6)
    bonus.backward()
    assert torch.isfinite(logits.grad).all()
    # temperature: a uniform distribution stays uniform; T = 2 on [0, log 3] gives p ∝ [1, √3]
    s = 1 + math.sqrt(3)
    entropy_t2 = -sum(p * math.log(p) for p in (1 / s, math.sqrt(3) / s))
    expected_t2 = (2 * math.log(4) + entropy_t2) / 3
    assert entropy_bonus(logits.detach(), mask, temperature=2.0).item() == pytest.approx(
        expected_t2, rel=1e-6
    )
