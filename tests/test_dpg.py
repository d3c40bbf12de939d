"""DPG, GDC++ and f-DPG (docs/methods.md §5): pseudo-rewards by hand; every gradient estimator,
averaged over many samples, against the exact gradient of its divergence on an enumerable
space (within 4 standard errors); reverse-KL f-DPG is KL-RL, sample by sample and exactly."""

import math

import pytest
import torch

from tether.distributions.exact import (
    exact_distribution,
    expectation,
    jensen_shannon,
    kl,
    log_partition,
    target_distribution,
    total_variation,
)
from tether.models.loading import build_model, char_tokenizer
from tether.objectives.dpg import (
    dpg_loss,
    f_dpg_loss,
    f_dpg_pseudo_reward,
    kl_adaptive_proposal_update,
)
from tether.objectives.policy_gradient import reinforce_loss, rloo_baseline


def kl_regularized_objective(pi, ref, reward, beta):
    """J(π) = E_π[r] − β·KL(π‖π_ref) (docs/methods.md §2)."""
    return expectation(pi, reward) - beta * kl(pi, ref)


# ----------------------------------------------------------------------------- hand computations


def test_pseudo_rewards_hand_computed():
    # t = π/p = Z·π/P; pick log Z = 0, log P = 0, so t = π: t = 1/2, 1, 2
    log_pi = torch.tensor([math.log(0.5), 0.0, math.log(2.0)], dtype=torch.float64)
    log_P = torch.zeros(3, dtype=torch.float64)
    fwd = f_dpg_pseudo_reward(log_pi, log_P, 0.0, "forward_kl")
    assert fwd.tolist() == pytest.approx([2.0, 1.0, 0.5], rel=1e-12)  # 1/t
    rev = f_dpg_pseudo_reward(log_pi, log_P, 0.0, "reverse_kl")
    assert rev.tolist() == pytest.approx([math.log(2) - 1, -1.0, -math.log(2) - 1], rel=1e-12)
    js = f_dpg_pseudo_reward(log_pi, log_P, 0.0, "jensen_shannon")
    # ½·log((1 + t)/(2t)): t = ½ → ½·log(1.5); t = 1 → 0; t = 2 → ½·log(0.75)
    assert js.tolist() == pytest.approx([0.5 * math.log(1.5), 0.0, 0.5 * math.log(0.75)], abs=1e-12)
    tv = f_dpg_pseudo_reward(log_pi, log_P, 0.0, "total_variation")
    assert tv.tolist() == [0.5, 0.0, -0.5]  # −½·sign(t − 1)
    # log Z shifts t: log Z = log 2 doubles t, so forward KL's 1/t halves
    assert f_dpg_pseudo_reward(log_pi, log_P, math.log(2), "forward_kl").tolist() == pytest.approx(
        [1.0, 0.5, 0.25], rel=1e-12
    )
    assert not f_dpg_pseudo_reward(
        log_pi.requires_grad_(), log_P, 0.0, "jensen_shannon"
    ).requires_grad


def test_pseudo_rewards_where_the_target_has_no_mass():
    log_pi, log_P = torch.tensor([-1.0]), torch.tensor([-math.inf])  # t = ∞
    assert f_dpg_pseudo_reward(log_pi, log_P, 0.0, "forward_kl").item() == 0.0
    assert f_dpg_pseudo_reward(log_pi, log_P, 0.0, "jensen_shannon").item() == pytest.approx(
        -0.5 * math.log(2)
    )
    assert f_dpg_pseudo_reward(log_pi, log_P, 0.0, "total_variation").item() == -0.5
    with pytest.raises(ValueError, match="infinite"):
        f_dpg_pseudo_reward(log_pi, log_P, 0.0, "reverse_kl")
    with pytest.raises(ValueError, match="unknown f-divergence"):
        f_dpg_pseudo_reward(log_pi, log_P, 0.0, "hellinger")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="baseline"):
        f_dpg_loss(log_pi, log_pi, log_P, 0.0, baseline="median")  # type: ignore[arg-type]


def test_dpg_loss_hand_computed():
    # two samples from q; P/q = [2, 0.5]·e^0; log Z = log 1.25 → weights p/q = [1.6, 0.4]
    f64 = torch.float64
    policy_logp = torch.tensor([math.log(0.5), math.log(0.25)], dtype=f64, requires_grad=True)
    proposal_logp = torch.tensor([math.log(0.25), math.log(0.5)], dtype=f64)
    log_P = torch.tensor([math.log(0.5), math.log(0.25)], dtype=f64)
    loss, stats = dpg_loss(policy_logp, proposal_logp, log_P, math.log(1.25))
    loss.backward()
    assert policy_logp.grad.tolist() == pytest.approx([-0.8, -0.2], rel=1e-6)  # −w/B
    assert stats["importance_weight_mean"] == pytest.approx(1.0, rel=1e-6)
    assert stats["policy_proposal_ratio_mean"] == pytest.approx((2 + 0.5) / 2, rel=1e-6)
    # GDC++: A = p/q − π/q = [1.6 − 2, 0.4 − 0.5]
    policy_logp.grad = None
    loss, _ = dpg_loss(policy_logp, proposal_logp, log_P, math.log(1.25), baseline=True)
    loss.backward()
    assert policy_logp.grad.tolist() == pytest.approx([0.2, 0.05], rel=1e-6)
    # log Z from the batch: mean P/q = (2 + 0.5)/2 = 1.25, the same here
    _, stats = dpg_loss(policy_logp, proposal_logp, log_P)
    assert stats["log_z"] == pytest.approx(math.log(1.25), rel=1e-12)


# ----------------------------------------------------------------------------- categorical toy

K = 6
THETA = torch.tensor([0.3, -0.2, 0.9, -1.1, 0.1, 0.5], dtype=torch.float64)
LOG_REF = torch.tensor([1.0, 0.5, -0.3, 0.2, -0.8, 0.0], dtype=torch.float64).log_softmax(0)
REWARD = torch.tensor([1.0, -0.5, 0.2, 2.0, 0.0, -1.0], dtype=torch.float64)
BETA = 0.8
LOG_Q = torch.tensor([0.1, 0.4, -0.2, 0.6, 0.3, -0.1], dtype=torch.float64).log_softmax(0)
SATISFIED = torch.tensor([1, 0, 1, 1, 0, 1])

TARGETS = {
    "reward": LOG_REF + REWARD / BETA,
    "constraint": torch.where(SATISFIED > 0, LOG_REF, torch.tensor(-math.inf, dtype=torch.float64)),
}


def _exact_divergence(divergence: str, log_pi: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    if divergence == "forward_kl":
        return kl(log_p, log_pi)
    if divergence == "reverse_kl":
        return kl(log_pi, log_p)
    if divergence == "jensen_shannon":
        return jensen_shannon(log_pi, log_p)
    return total_variation(log_pi, log_p)


def _exact_gradient(divergence: str, target: str) -> torch.Tensor:
    theta = THETA.clone().requires_grad_(True)
    log_p = TARGETS[target] - torch.logsumexp(TARGETS[target], 0)
    (grad,) = torch.autograd.grad(_exact_divergence(divergence, theta.log_softmax(0), log_p), theta)
    return grad


def _score(idx: torch.Tensor) -> torch.Tensor:
    """∇_θ log π_θ(y) = e_y − π_θ for the softmax policy, one row per sample: [n, K]."""
    return torch.nn.functional.one_hot(idx, K).double() - THETA.softmax(0)


def _per_sample_gradients(loss_fn, target: str, on_policy: bool, n: int, seed: int):
    """Draw n samples (from π_θ on-policy, from q otherwise), evaluate the loss on them as one
    batch with the exact log Z, and return each sample's gradient with respect to θ: [n, K]
    (the loss's gradient with respect to log π(y_i), chained through ∇_θ log π(y_i))."""
    g = torch.Generator().manual_seed(seed)
    log_pi = THETA.log_softmax(0)
    idx = torch.multinomial(
        (log_pi if on_policy else LOG_Q).exp(), n, replacement=True, generator=g
    )
    logp = log_pi[idx].requires_grad_(True)
    proposal_logp = logp.detach() if on_policy else LOG_Q[idx]
    log_P = TARGETS[target][idx]
    loss, _ = loss_fn(logp, proposal_logp, log_P, torch.logsumexp(TARGETS[target], 0))
    (d_logp,) = torch.autograd.grad(loss, logp)
    return n * d_logp[:, None] * _score(idx)  # loss = mean over samples: n·∂L/∂log π_i


def _assert_unbiased(per_sample: torch.Tensor, exact: torch.Tensor) -> None:
    mean = per_sample.mean(0)
    standard_error = per_sample.std(0) / math.sqrt(per_sample.shape[0])
    assert torch.all((mean - exact).abs() <= 4 * standard_error + 1e-12), (
        mean,
        exact,
        standard_error,
    )


@pytest.mark.parametrize("target", ["reward", "constraint"])
@pytest.mark.parametrize("on_policy", [True, False])
@pytest.mark.parametrize("baseline", [False, True])
def test_dpg_gradient_is_unbiased_for_the_forward_kl(target, on_policy, baseline):
    def loss_fn(logp, proposal, log_P, log_z):
        return dpg_loss(logp, proposal, log_P, log_z, baseline=baseline)

    per_sample = _per_sample_gradients(loss_fn, target, on_policy, 20_000, seed=1)
    _assert_unbiased(per_sample, _exact_gradient("forward_kl", target))


@pytest.mark.parametrize(
    "divergence,target",
    [
        ("forward_kl", "reward"),
        ("reverse_kl", "reward"),
        ("jensen_shannon", "reward"),
        ("total_variation", "reward"),
        ("forward_kl", "constraint"),
        ("jensen_shannon", "constraint"),
        ("total_variation", "constraint"),
    ],
)
@pytest.mark.parametrize("on_policy", [True, False])
def test_f_dpg_gradient_is_unbiased(divergence, target, on_policy):
    def loss_fn(logp, proposal, log_P, log_z):
        return f_dpg_loss(logp, proposal, log_P, log_z, divergence=divergence)

    per_sample = _per_sample_gradients(loss_fn, target, on_policy, 20_000, seed=2)
    _assert_unbiased(per_sample, _exact_gradient(divergence, target))


@pytest.mark.parametrize(
    "divergence", ["forward_kl", "reverse_kl", "jensen_shannon", "total_variation"]
)
def test_f_dpg_expected_gradient_is_exact(divergence):
    # The whole support as the batch, drawn from the uniform proposal u = 1/K: the off-policy
    # estimator's batch mean Σ_y u·(π/u)·R·∇log π is then its expectation, term by term.
    theta = THETA.clone().requires_grad_(True)
    logp = theta.log_softmax(0)
    uniform = torch.full((K,), -math.log(K), dtype=torch.float64)
    log_z = torch.logsumexp(TARGETS["reward"], 0)
    loss, _ = f_dpg_loss(logp, uniform, TARGETS["reward"], log_z, divergence=divergence)
    (grad,) = torch.autograd.grad(loss, theta)
    assert torch.allclose(grad, _exact_gradient(divergence, "reward"), rtol=1e-10, atol=1e-12)


def test_leave_one_out_baseline_keeps_f_dpg_unbiased():
    # The baseline depends on the other samples of the batch: average the gradient of many
    # independent batches of 8 and compare with the exact gradient.
    batches, size = 2000, 8
    pi = THETA.softmax(0)
    g = torch.Generator().manual_seed(8)
    idx = torch.multinomial(pi, batches * size, replacement=True, generator=g).view(batches, size)
    log_z = torch.logsumexp(TARGETS["reward"], 0)
    grads = torch.empty(batches, K, dtype=torch.float64)
    for b in range(batches):
        logp = pi.log()[idx[b]].requires_grad_(True)
        loss, _ = f_dpg_loss(
            logp, logp.detach(), TARGETS["reward"][idx[b]], log_z, "jensen_shannon", baseline="loo"
        )
        (d_logp,) = torch.autograd.grad(loss, logp)
        grads[b] = d_logp @ _score(idx[b])
    _assert_unbiased(grads, _exact_gradient("jensen_shannon", "reward"))


def test_gdc_baseline_removes_all_variance_at_the_target():
    # π_θ = p exactly: on-policy, P/(Z·π) = 1 and the GDC++ advantage is 0 for every sample
    log_p = TARGETS["reward"] - torch.logsumexp(TARGETS["reward"], 0)
    logp = log_p[torch.tensor([0, 3, 3, 5])].clone().requires_grad_(True)
    log_z = torch.logsumexp(TARGETS["reward"], 0)
    loss, _ = dpg_loss(logp, logp.detach(), TARGETS["reward"][[0, 3, 3, 5]], log_z, baseline=True)
    loss.backward()
    assert torch.allclose(logp.grad, torch.zeros(4, dtype=torch.float64), atol=1e-12)


def test_forward_kl_f_dpg_is_dpg_sample_by_sample():
    g = torch.Generator().manual_seed(3)
    idx = torch.multinomial(LOG_Q.exp(), 64, replacement=True, generator=g)
    grads = []
    for fn in (
        lambda lp: dpg_loss(lp, LOG_Q[idx], TARGETS["reward"][idx]),
        lambda lp: f_dpg_loss(lp, LOG_Q[idx], TARGETS["reward"][idx], divergence="forward_kl"),
    ):
        theta = THETA.clone().requires_grad_(True)
        loss, _ = fn(theta.log_softmax(0)[idx])
        grads.append(torch.autograd.grad(loss, theta)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def test_kl_adaptive_proposal_update():
    log_p = TARGETS["reward"] - torch.logsumexp(TARGETS["reward"], 0)
    near = 0.9 * log_p.exp() + 0.1 * LOG_Q.exp()  # a policy much closer to p than q
    g = torch.Generator().manual_seed(4)
    idx = torch.multinomial(LOG_Q.exp(), 20_000, replacement=True, generator=g)
    update, stats = kl_adaptive_proposal_update(TARGETS["reward"][idx], LOG_Q[idx], near.log()[idx])
    assert update and stats["proposal_updated"] == 1.0
    assert stats["kl_target_policy"] == pytest.approx(float(kl(log_p, near.log())), abs=0.01)
    assert stats["kl_target_proposal"] == pytest.approx(float(kl(log_p, LOG_Q)), abs=0.02)
    far = THETA.log_softmax(0) * 3  # unnormalised is fine for the comparison's sign
    far = far.log_softmax(0)
    update, stats = kl_adaptive_proposal_update(TARGETS["reward"][idx], LOG_Q[idx], far[idx])
    assert not update and stats["kl_target_policy"] > stats["kl_target_proposal"]


# ----------------------------------------------------------------------------- tiny language model

MAX_LEN = 3
# The models run in fp64, but HF's LlamaRMSNorm computes in fp32 (it casts its input to fp32):
# values keep fp64 accuracy (each next-token distribution is normalised in fp64), gradients
# through the norm carry fp32 rounding, about 1e-7 of their size.
GRAD_ATOL = 1e-6


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=GRAD_ATOL)


@pytest.fixture(scope="module")
def lm():
    """Policy and reference: two tiny Llamas in fp64, exact over {a, b, EOS}^≤3 (15 responses)."""
    tok = char_tokenizer()
    torch.manual_seed(0)
    policy = build_model(tok, "llama", 1, 2, 16, 16).double().eval()
    torch.manual_seed(1)
    ref = build_model(tok, "llama", 1, 2, 16, 16).double().eval()
    vocab = [tok.eos_token_id, *tok.convert_tokens_to_ids(["a", "b"])]
    prompt = tok("ab")["input_ids"]
    ref_dist = exact_distribution(ref, prompt, vocab, tok.eos_token_id, MAX_LEN)
    a = tok.convert_tokens_to_ids("a")
    # reward: number of "a" in the response, plus 1 for stopping with EOS
    reward = torch.tensor(
        [s.count(a) + (s[-1] == tok.eos_token_id) for s in ref_dist.sequences], dtype=torch.float64
    )
    return policy, ref_dist, reward, (prompt, vocab, tok.eos_token_id)


def _policy_dist(lm):
    policy, _, _, (prompt, vocab, eos) = lm
    return exact_distribution(policy, prompt, vocab, eos, MAX_LEN, requires_grad=True)


def test_reverse_kl_f_dpg_is_kl_rl_exactly_on_the_lm(lm):
    policy, ref_dist, reward, _ = lm
    beta = 0.5
    params = [p for p in policy.parameters() if p.requires_grad]
    log_P = ref_dist.log_probs + reward / beta
    log_z = log_partition(ref_dist, reward, beta)

    # ∇KL(π‖p*) and −(1/β)·∇J, both exact
    pi = _policy_dist(lm)
    g_kl = torch.autograd.grad(kl(pi, target_distribution(ref_dist, reward, beta)), params)
    pi = _policy_dist(lm)
    g_j = torch.autograd.grad(kl_regularized_objective(pi, ref_dist, reward, beta), params)
    # the f-DPG estimator's expectation: the whole support under the uniform proposal
    pi = _policy_dist(lm)
    uniform = torch.full((len(pi),), -math.log(len(pi)), dtype=torch.float64)
    loss, _ = f_dpg_loss(pi.log_probs, uniform, log_P, log_z, divergence="reverse_kl")
    g_fdpg = torch.autograd.grad(loss, params)
    for a, b, c in zip(g_kl, g_j, g_fdpg, strict=True):
        assert _close(a, -b / beta)
        assert _close(c, a)


def test_reverse_kl_f_dpg_is_rloo_with_the_k1_shaped_reward_sample_by_sample(lm):
    policy, ref_dist, reward, _ = lm
    beta, n = 0.5, 32
    params = [p for p in policy.parameters() if p.requires_grad]
    log_P = ref_dist.log_probs + reward / beta
    idx = ref_dist.sample(n, torch.Generator().manual_seed(5))  # any samples will do

    pi = _policy_dist(lm)
    logp = pi.log_probs[idx]
    loss, _ = f_dpg_loss(logp, logp.detach(), log_P[idx], 0.0, "reverse_kl", baseline="loo")
    g_fdpg = torch.autograd.grad(beta * loss, params)

    pi = _policy_dist(lm)
    logp = pi.log_probs[idx]
    shaped = reward[idx] - beta * (logp.detach() - ref_dist.log_probs[idx])  # r − β·k1
    advantages = rloo_baseline(shaped, group_size=n)
    loss, _ = reinforce_loss(logp[:, None], advantages, torch.ones(n, 1))
    g_rl = torch.autograd.grad(loss, params)
    for a, b in zip(g_fdpg, g_rl, strict=True):
        assert _close(a, b)


def test_dpg_on_the_lm_agrees_with_the_exact_gradient(lm):
    policy, ref_dist, reward, _ = lm
    beta, n = 1.0, 4000
    params = [p for p in policy.parameters() if p.requires_grad]
    log_P = ref_dist.log_probs + reward / beta
    log_z = log_partition(ref_dist, reward, beta)
    log_p = target_distribution(ref_dist, reward, beta)

    pi = _policy_dist(lm)
    exact = torch.autograd.grad(kl(log_p, pi), params)
    # Jacobian of the 15 sequence log-probs (one batched backward): per-sample gradients are
    # a weight times one of its rows
    pi = _policy_dist(lm)
    eye = torch.eye(len(pi), dtype=torch.float64)
    rows = torch.autograd.grad(pi.log_probs, params, grad_outputs=eye, is_grads_batched=True)
    jac = torch.cat([g.reshape(len(pi), -1) for g in rows], dim=1)
    directions = torch.randn(
        4, jac.shape[1], generator=torch.Generator().manual_seed(6), dtype=torch.float64
    )
    exact_flat = torch.cat([g.reshape(-1) for g in exact])
    directions = torch.cat([directions, exact_flat[None] / exact_flat.norm()])

    for on_policy in (True, False):
        gen = torch.Generator().manual_seed(7)
        pi = _policy_dist(lm)
        proposal = pi.log_probs.detach() if on_policy else ref_dist.log_probs
        idx = torch.multinomial(proposal.exp(), n, replacement=True, generator=gen)
        loss, _ = dpg_loss(pi.log_probs[idx], proposal[idx], log_P[idx], log_z, baseline=True)
        estimate = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        # the same estimate from per-sample gradients, for the standard error
        w = torch.exp(log_P[idx] - proposal[idx] - log_z) - torch.exp(
            pi.log_probs.detach()[idx] - proposal[idx]
        )
        per_sample = -w[:, None] * (jac @ directions.T)[idx]  # [n, 5], projected
        assert _close(per_sample.mean(0), directions @ estimate)
        _assert_unbiased(per_sample, directions @ exact_flat)
