"""Exact mode (docs/methods.md §2, §5): the enumerated response space, its probabilities (against
step-by-step hand computation and the sampler), the exact quantities by hand, and the
identity J = E_π[r] − β·KL(π‖π_ref) = −β·KL(π‖p*) + β·log Z on a tiny language model."""

import math

import pytest
import torch

from tether.distributions.bayes import fit_moments, moment_log_target, snis_moments
from tether.distributions.exact import (
    entropy,
    enumerate_sequences,
    exact_distribution,
    expectation,
    jensen_shannon,
    kl,
    log_partition,
    normalize,
    response_logprobs,
    target_distribution,
    total_variation,
)
from tether.distributions.infalign import best_of_n_distribution
from tether.generation.sampler import sample
from tether.models.loading import build_model, char_tokenizer

# ----------------------------------------------------------------------------- enumeration


def test_enumerate_sequences_by_hand():
    assert enumerate_sequences([1, 5, 6], eos_id=1, max_len=2) == [
        (1,),
        (5, 1),
        (6, 1),
        (5, 5),  # truncated: two tokens, no EOS
        (5, 6),
        (6, 5),
        (6, 6),
    ]
    assert enumerate_sequences([5, 1, 6], 1, 2, include_truncated=False) == [(1,), (5, 1), (6, 1)]
    # m = 3 non-EOS tokens, L = 4: Σ_{k<4} 3^k = 40 terminated, 3^4 = 81 truncated
    seqs = enumerate_sequences([1, 5, 6, 7], 1, 4)
    assert len(seqs) == 40 + 81 and len(set(seqs)) == len(seqs)
    assert all(len(s) <= 4 for s in seqs)
    assert sum(s[-1] == 1 for s in seqs) == 40
    assert all(1 not in s[:-1] for s in seqs)  # EOS only ever last
    with pytest.raises(ValueError, match="eos_id"):
        enumerate_sequences([5, 6], 1, 2)
    with pytest.raises(ValueError, match="max_len"):
        enumerate_sequences([1, 5], 1, 0)


@pytest.fixture(scope="module")
def tiny():
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = build_model(tok, "llama", 1, 2, 16, 16).eval()
    return tok, model


def _vocab(tok, chars: str) -> list[int]:
    return [tok.eos_token_id, *tok.convert_tokens_to_ids(list(chars))]


@pytest.mark.parametrize("chars,max_len", [("ab", 4), ("abc", 3)])
def test_enumerated_distribution_sums_to_one(tiny, chars, max_len):
    tok, model = tiny
    dist = exact_distribution(model, tok("ab")["input_ids"], _vocab(tok, chars), 1, max_len)
    assert abs(dist.mass - 1.0) < 1e-5
    assert float(normalize(dist).exp().sum()) == pytest.approx(1.0, abs=1e-12)
    assert dist.log_probs.dtype == torch.float64 and not dist.log_probs.requires_grad
    # at another temperature too
    hot = exact_distribution(
        model, tok("b")["input_ids"], _vocab(tok, chars), 1, max_len, temperature=2.5
    )
    assert abs(hot.mass - 1.0) < 1e-5


def test_without_truncated_responses_the_mass_is_the_chance_of_stopping(tiny):
    tok, model = tiny
    prompt, vocab = tok("ab")["input_ids"], _vocab(tok, "ab")
    full = exact_distribution(model, prompt, vocab, 1, 3)
    stopped = exact_distribution(model, prompt, vocab, 1, 3, include_truncated=False)
    assert len(stopped) == 1 + 2 + 4 and bool(full.terminated.sum() == len(stopped))
    p_truncated = float(full.probs[~full.terminated].sum())
    assert 0 < p_truncated < 1
    assert stopped.mass == pytest.approx(1.0 - p_truncated, abs=1e-6)
    for seq, lp in zip(stopped.sequences, stopped.log_probs, strict=True):
        assert float(lp) == float(full.log_probs[full.index(seq)])


def test_restricted_vocabulary_log_prob_by_hand(tiny):
    # log π_V("a b EOS" | "ab") step by step: one forward pass per prefix, softmax over the
    # allowed columns {EOS, a, b}, the chosen token's share
    tok, model = tiny
    vocab = _vocab(tok, "ab")
    a, b = vocab[1], vocab[2]
    prompt = tok("ab")["input_ids"]
    by_hand = 0.0
    prefix = list(prompt)
    for token in (a, b, 1):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prefix])).logits[0, -1].double()
        allowed = logits[vocab].exp()
        by_hand += math.log(float(allowed[vocab.index(token)] / allowed.sum()))
        prefix.append(token)
    dist = exact_distribution(model, prompt, vocab, 1, 3)
    assert float(dist.log_probs[dist.index((a, b, 1))]) == pytest.approx(by_hand, abs=1e-5)
    # the same through response_logprobs, in small chunks
    with torch.no_grad():
        chunked = response_logprobs(model, prompt, dist.sequences, vocab, batch_size=4)
    assert torch.allclose(chunked, dist.log_probs, atol=1e-5)
    with pytest.raises(ValueError, match="outside vocab_ids"):
        response_logprobs(model, prompt, [(a, tok.convert_tokens_to_ids("z"), 1)], vocab)
    with pytest.raises(ValueError, match="at least one token"):
        response_logprobs(model, [], [(a,)], vocab)


def test_full_vocabulary_matches_the_sampler(tiny):
    # With the whole vocabulary the space is what sample(max_new_tokens=L) returns: EOS kept
    # in the response, a response cut at L tokens complete; its log-probs are the sampler's.
    tok, model = tiny
    vocab = list(range(len(tok)))
    dist = exact_distribution(model, tok("ab")["input_ids"], vocab, 1, 2, batch_size=2048)
    assert len(dist) == 1 + 98 + 98**2 and abs(dist.mass - 1.0) < 1e-5
    out = sample(
        model,
        tok,
        ["ab"] * 100,
        max_new_tokens=2,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    for i in range(100):
        seq = out.completion_ids[i][out.completion_mask[i] > 0].tolist()
        assert float(out.logprobs[i].sum()) == pytest.approx(
            float(dist.log_probs[dist.index(seq)]), abs=1e-4
        )
        assert out.finished[i] == bool(dist.terminated[dist.index(seq)])


def test_exact_gradient_matches_finite_differences():
    tok = char_tokenizer()
    torch.manual_seed(2)
    policy = build_model(tok, "llama", 1, 2, 16, 16).double().eval()
    torch.manual_seed(3)
    ref = build_model(tok, "llama", 1, 2, 16, 16).double().eval()
    prompt, vocab = tok("a")["input_ids"], _vocab(tok, "ab")
    ref_dist = exact_distribution(ref, prompt, vocab, 1, 3)

    def value() -> torch.Tensor:
        pi = exact_distribution(policy, prompt, vocab, 1, 3, requires_grad=True)
        return kl(pi, ref_dist)

    weight = policy.model.norm.weight  # after the fp32 RMSNorm: the loss is fp64-smooth in it
    (grad,) = torch.autograd.grad(value(), weight)
    eps = 1e-5
    with torch.no_grad():
        for i in (0, 7):
            weight[i] += eps
            up = float(value())
            weight[i] -= 2 * eps
            down = float(value())
            weight[i] += eps
            assert grad[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-9)


# ----------------------------------------------------------------------------- exact quantities

F64 = torch.float64
P3 = torch.tensor([0.5, 0.25, 0.25], dtype=F64).log()
Q3 = torch.tensor([0.25, 0.25, 0.5], dtype=F64).log()


def test_exact_quantities_by_hand():
    assert float(kl(P3, Q3)) == pytest.approx(0.25 * math.log(2), rel=1e-12)  # ½ln2 + ¼ln½
    assert float(kl(Q3, P3)) == pytest.approx(0.25 * math.log(2), rel=1e-12)
    assert float(kl(P3, P3)) == 0.0
    assert float(entropy(P3)) == pytest.approx(1.5 * math.log(2), rel=1e-12)
    assert float(total_variation(P3, Q3)) == pytest.approx(0.25, rel=1e-12)
    # m = [3/8, 1/4, 3/8]: JS = ½[½ln(4/3) + ¼ln(2/3)]·2 = ½ln(4/3) + ¼ln(2/3)
    js = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)
    assert float(jensen_shannon(P3, Q3)) == pytest.approx(js, rel=1e-12)
    f = torch.tensor([1.0, 2.0, 4.0])
    assert float(expectation(P3, f)) == pytest.approx(0.5 + 0.5 + 1.0)
    two = torch.stack([f, f**2], dim=1)
    assert expectation(P3, two).tolist() == pytest.approx([2.0, 0.5 + 1.0 + 4.0])
    assert float(normalize(torch.tensor([0.0, math.log(3.0)])).exp()[1]) == pytest.approx(0.75)


def test_exact_quantities_at_the_edges_of_the_support():
    zero_mass = torch.tensor([0.5, 0.5, 0.0], dtype=F64).log()
    assert float(kl(zero_mass, P3)) == pytest.approx(0.5 * math.log(1.0) + 0.5 * math.log(2.0))
    assert math.isinf(float(kl(P3, zero_mass)))  # q = 0 < p
    assert float(entropy(zero_mass)) == pytest.approx(math.log(2))
    leaf = zero_mass.clone().requires_grad_(True)
    (kl(leaf, P3) + entropy(leaf) + jensen_shannon(leaf, P3)).backward()
    assert torch.isfinite(leaf.grad).all()
    disjoint = torch.tensor([0.0, 0.0, 1.0], dtype=F64).log()
    assert float(jensen_shannon(zero_mass, disjoint)) == pytest.approx(math.log(2))
    assert float(total_variation(zero_mass, disjoint)) == pytest.approx(1.0)
    assert float(expectation(zero_mass, torch.tensor([1.0, 1.0, math.inf]))) == 1.0


def test_best_of_n_distribution_by_hand():
    """The best-of-n distribution (tether.distributions.infalign) of the pick
    tether.distributions.bayes.best_of_n makes among n draws from q."""
    q = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    r = torch.tensor([0.0, 1.0, 1.0])  # a tie at the top
    # P(best reward is 1) = 1 − 0.5² = 0.75, shared 0.3 : 0.2 by the first draw to reach it
    assert best_of_n_distribution(q, r, 2).tolist() == pytest.approx([0.25, 0.45, 0.30])
    assert torch.allclose(best_of_n_distribution(q, r, 1), q)
    r3 = torch.tensor([2.0, 0.0, 1.0])
    # n = 3, distinct rewards: F(r)^3 − F⁻(r)^3 with F = [1, 0.3, 0.5]
    expected = [1 - 0.5**3, 0.3**3, 0.5**3 - 0.3**3]
    assert best_of_n_distribution(q, r3, 3).tolist() == pytest.approx(expected)


# ----------------------------------------------------------------------------- the Bayesian view


@pytest.fixture(scope="module")
def pair():
    """π and π_ref: two tiny Llamas, exact over {a, b, EOS}^≤4 (31 responses), and a reward."""
    tok = char_tokenizer()
    torch.manual_seed(4)
    policy = build_model(tok, "llama", 1, 2, 16, 16).eval()
    torch.manual_seed(5)
    ref = build_model(tok, "llama", 1, 2, 16, 16).eval()
    prompt, vocab = tok("ba")["input_ids"], _vocab(tok, "ab")
    pi = exact_distribution(policy, prompt, vocab, 1, 4)
    ref_dist = exact_distribution(ref, prompt, vocab, 1, 4)
    a = vocab[1]
    reward = torch.tensor([s.count(a) - 0.5 * (s[-1] != 1) for s in pi.sequences], dtype=F64)
    return pi, ref_dist, reward, a


def kl_regularized_objective(pi, ref, reward, beta):
    """J(π) = E_π[r] − β·KL(π‖π_ref) (docs/methods.md §2)."""
    return expectation(pi, reward) - beta * kl(pi, ref)


@pytest.mark.parametrize("beta", [0.1, 1.0, 10.0])
def test_kl_rl_objective_is_reverse_kl_to_the_posterior(pair, beta):
    pi, ref, reward, _ = pair
    j = kl_regularized_objective(pi, ref, reward, beta)  # E_π[r] − β·KL(π‖π_ref)
    log_p_star = target_distribution(ref, reward, beta)
    log_z = log_partition(ref, reward, beta)
    assert float(j) == pytest.approx(float(-beta * kl(pi, log_p_star) + beta * log_z), abs=1e-6)
    # p* is the maximiser: J(p*) = β·log Z ≥ J(π)
    assert float(kl_regularized_objective(log_p_star, ref, reward, beta)) == pytest.approx(
        float(beta * log_z), abs=1e-6
    )
    assert float(j) <= float(beta * log_z)


def test_target_limits_in_beta(pair):
    _, ref, reward, _ = pair
    # β → ∞: p* → π_ref; β → 0: p* collapses onto argmax r
    assert float(kl(target_distribution(ref, reward, 1e6), ref)) < 1e-10
    collapsed = target_distribution(ref, reward, 1e-3).exp()
    assert float(collapsed[reward == reward.max()].sum()) == pytest.approx(1.0, abs=1e-9)


def test_hard_constraint_target_is_the_conditioned_reference(pair):
    pi, ref, _, a = pair
    satisfied = torch.tensor([a in s for s in pi.sequences])  # "the response holds an a"
    log_p = target_distribution(ref, constraint=satisfied)
    log_z = log_partition(ref, constraint=satisfied)
    assert float(log_z.exp()) == pytest.approx(float(ref.probs[satisfied].sum()), rel=1e-12)
    assert torch.all(log_p[~satisfied] == -math.inf)
    assert torch.allclose(log_p[satisfied], ref.log_probs[satisfied] - log_z)
    assert float(kl(log_p, ref)) == pytest.approx(float(-log_z), abs=1e-9)  # KL(p‖π_ref) = −log Z
    with pytest.raises(ValueError, match="either a reward"):
        target_distribution(ref, torch.zeros(len(ref)), 1.0, constraint=satisfied)
    with pytest.raises(ValueError, match="needs beta"):
        log_partition(ref, torch.zeros(len(ref)))


def test_moment_constraints_on_the_lm(pair):
    # P ∝ π_ref·exp(λ·φ) with φ = (share of "a" tokens, stopped with EOS): λ fitted exactly on
    # the whole support, and by SNIS from samples of π_ref
    pi, ref, _, a = pair
    phi = torch.tensor([[s.count(a) / len(s), float(s[-1] == 1)] for s in pi.sequences], dtype=F64)
    targets = torch.tensor([0.6, 0.5], dtype=F64)
    exact_fit = fit_moments(phi, targets, log_weights=ref.log_probs)
    assert exact_fit.converged and exact_fit.max_error < 1e-9
    log_p = normalize(moment_log_target(ref.log_probs, phi, exact_fit.lam))
    assert torch.allclose(expectation(log_p, phi), targets, atol=1e-9)

    idx = ref.sample(20_000, torch.Generator().manual_seed(0))
    fit = fit_moments(phi[idx], targets)
    assert fit.converged and fit.max_error < 1e-9
    assert torch.allclose(snis_moments(phi[idx], phi[idx] @ fit.lam), targets, atol=1e-9)
    assert 0 < fit.effective_sample_size < 20_000
    # the sample fit is close to the exact one, and so are the exact moments it implies
    assert torch.allclose(fit.lam, exact_fit.lam, atol=0.15)
    implied = expectation(normalize(moment_log_target(ref.log_probs, phi, fit.lam)), phi)
    assert torch.allclose(implied, targets, atol=0.02)
