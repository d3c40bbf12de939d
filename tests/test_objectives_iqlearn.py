"""IQLearn as TD-regularised MLE (docs/methods.md §4) against hand computations."""

import math

import pytest
import torch

from tether.batches import collate_pairs
from tether.models.loading import char_tokenizer
from tether.objectives import (
    entropy_from_log_softmax,
    iqlearn_loss,
    iqlearn_online_term,
    lambda_schedule,
    masked_mean,
    mle_entropy_loss,
    mle_loss,
    shifted_token_logprobs,
    soft_values,
    terminated_from_eos,
)


def _lse(row):
    return math.log(sum(math.exp(x) for x in row))


# A 3-token vocabulary (token 1 = EOS). One row: a prompt token, then the completion "0 2 EOS".
HAND_LOGITS = [
    [0.5, -1.0, 2.0],  # position 0: the state s_1 that predicts token 1 (= 0)
    [1.0, 0.0, -0.5],  # position 1: s_2, predicts token 2 (= 2)
    [-0.3, 0.7, 0.2],  # position 2: s_3, predicts token 3 (= EOS)
    [0.4, 1.5, -2.0],  # position 3: the state after EOS; used only if the row is truncated
]
HAND_IDS = [[2, 0, 2, 1]]
HAND_MASK = [[0.0, 1.0, 1.0, 1.0]]


def _hand_case(terminated: bool, gamma: float, lam: float):
    """Q, V, r̂ and the loss written out with math.log/exp."""
    v = [_lse(row) for row in HAND_LOGITS]  # V at each position
    q = [HAND_LOGITS[0][0], HAND_LOGITS[1][2], HAND_LOGITS[2][1]]  # 0.5, −0.5, 0.7
    v_s = [v[0], v[1], v[2]]
    v_next = [v[1], v[2], 0.0 if terminated else v[3]]
    r = [q[i] - gamma * v_next[i] for i in range(3)]
    logp = [q[i] - v_s[i] for i in range(3)]
    loss = sum(-logp[i] + lam * r[i] ** 2 for i in range(3)) / 3
    return q, v_s, v_next, r, logp, loss


@pytest.mark.parametrize(
    "terminated, expected_loss", [(True, 2.1610536238900493), (False, 2.223154220783053)]
)
def test_td_term_hand_computed(terminated, expected_loss):
    gamma, lam = 0.9, 0.5
    q, v_s, v_next, r, logp, loss_by_hand = _hand_case(terminated, gamma, lam)
    assert loss_by_hand == pytest.approx(expected_loss, abs=1e-12)
    # the written-out numbers: V = 2.2413, 1.4644, 1.3803 (and 1.8097 after EOS)
    assert v_s == pytest.approx([2.241311296657157, 1.464368784107945, 1.3802696706417346])
    if terminated:
        assert r == pytest.approx(
            [0.5 - 0.9 * 1.464368784107945, -0.5 - 0.9 * 1.3802696706417346, 0.7]
        )
    else:
        assert r[2] == pytest.approx(0.7 - 0.9 * 1.8097383841163124)

    logits = torch.tensor([HAND_LOGITS], dtype=torch.float64)
    ids = torch.tensor(HAND_IDS)
    mask = torch.tensor(HAND_MASK)
    term = torch.tensor([terminated])
    sv = soft_values(logits, ids, mask, term, gamma)
    assert sv.q[0, 1:].tolist() == pytest.approx(q, abs=1e-12)
    assert sv.v[0, 1:].tolist() == pytest.approx(v_s, abs=1e-12)
    assert sv.v_next[0, 1:].tolist() == pytest.approx(v_next, abs=1e-12)
    assert sv.reward[0, 1:].tolist() == pytest.approx(r, abs=1e-12)
    assert sv.logp[0, 1:].tolist() == pytest.approx(logp, abs=1e-12)

    loss, stats = iqlearn_loss(logits, ids, mask, term, lam=lam, gamma=gamma)
    assert loss.item() == pytest.approx(loss_by_hand, abs=1e-12)
    assert stats["loss"] == pytest.approx(loss_by_hand, abs=1e-12)
    assert stats["nll"] == pytest.approx(-sum(logp) / 3, abs=1e-12)
    assert stats["td"] == pytest.approx(sum(x * x for x in r) / 3, abs=1e-12)
    assert stats["reward_mean"] == pytest.approx(sum(r) / 3, abs=1e-12)
    assert stats["value_mean"] == pytest.approx(sum(v_s) / 3, abs=1e-12)
    assert stats["logp_mean"] == pytest.approx(sum(logp) / 3, abs=1e-12)
    assert stats["tokens"] == 3


def _random_batch(seed=0, vocab=None):
    torch.manual_seed(seed)
    tok = char_tokenizer()
    b = collate_pairs(tok, ["Input:\n1+2\nTarget:", "hi", "abc"], ["\n3", "there", "x"])
    logits = torch.randn(*b.input_ids.shape, vocab or len(tok))
    return tok, b, logits


def test_lambda_zero_is_exactly_mle():
    tok, b, logits = _random_batch()
    terminated = terminated_from_eos(b.input_ids, b.loss_mask, tok.eos_token_id)
    assert terminated.tolist() == [True, True, True]
    a = logits.clone().requires_grad_(True)
    loss, stats = iqlearn_loss(a, b.input_ids, b.loss_mask, terminated, lam=0.0)
    m = logits.clone().requires_grad_(True)
    mle, mle_stats = mle_loss(shifted_token_logprobs(m, b.input_ids), b.loss_mask)
    assert torch.equal(loss, mle)
    loss.backward()
    mle.backward()
    assert torch.equal(a.grad, m.grad)
    assert stats["nll"] == stats["loss"] == mle_stats["loss"]
    assert stats["tokens"] == mle_stats["tokens"] == 3 + 6 + 2
    # truncated rows change nothing at λ = 0 either
    loss_trunc, _ = iqlearn_loss(logits, b.input_ids, b.loss_mask, False, lam=0.0)
    assert torch.equal(loss_trunc, mle.detach())


def test_bf16_logits_are_computed_in_fp32():
    tok, b, logits = _random_batch()
    loss, _ = iqlearn_loss(logits.bfloat16(), b.input_ids, b.loss_mask, True, lam=0.3)
    assert loss.dtype == torch.float32
    loss32, _ = iqlearn_loss(logits.bfloat16().float(), b.input_ids, b.loss_mask, True, lam=0.3)
    assert torch.equal(loss, loss32)


def test_padding_and_rows_are_independent():
    tok, b, logits = _random_batch(1)
    lam, gamma = 0.7, 0.95
    pad = b.attention_mask == 0
    assert pad.any()
    # whatever the logits hold at padding and at positions after the last state, loss unchanged
    noisy = logits.clone()
    noisy[pad] = 1e4 * torch.randn_like(noisy[pad])
    loss, stats = iqlearn_loss(logits, b.input_ids, b.loss_mask, True, lam=lam, gamma=gamma)
    loss_noisy, _ = iqlearn_loss(noisy, b.input_ids, b.loss_mask, True, lam=lam, gamma=gamma)
    assert torch.allclose(loss, loss_noisy, atol=1e-6)
    # the batch loss is the token-weighted mean of the per-row losses
    per_row, weights = [], []
    for i in range(3):
        row_loss, row_stats = iqlearn_loss(
            logits[i : i + 1],
            b.input_ids[i : i + 1],
            b.loss_mask[i : i + 1],
            True,
            lam=lam,
            gamma=gamma,
        )
        per_row.append(row_loss.item() * row_stats["tokens"])
        weights.append(row_stats["tokens"])
    assert loss.item() == pytest.approx(sum(per_row) / sum(weights), rel=1e-5)


def test_gradient_flows_through_next_state_value():
    """Logits at the state after a truncated row's last token enter only through γ·V(s′)."""
    torch.manual_seed(2)
    ids = torch.tensor([[2, 0, 2, 0, 0], [2, 0, 2, 1, 0]])
    mask = torch.tensor([[0.0, 1, 1, 0, 0], [0.0, 1, 1, 1, 0]])
    terminated = torch.tensor([False, True])

    def grads(lam):
        logits = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(3))
        logits.requires_grad_(True)
        loss, _ = iqlearn_loss(logits, ids, mask, terminated, lam=lam, gamma=0.9)
        loss.backward()
        return logits.grad

    g0, g1 = grads(0.0), grads(1.0)
    # row 0 (truncated after position 2): logits[0, 2] are V(s′) of the last action
    assert g0[0, 2].abs().sum() == 0
    assert g1[0, 2].abs().sum() > 1e-4
    # row 1 ends with EOS at position 3: V = 0 after it, so logits[1, 3] never matter
    assert g0[1, 3].abs().sum() == 0 and g1[1, 3].abs().sum() == 0
    # padding never matters
    assert g1[0, 3:].abs().sum() == 0 and g1[1, 4].abs().sum() == 0
    # interior states get V(s′) gradient too: λ changes the gradient there
    assert not torch.allclose(g0[0, 1], g1[0, 1])


def test_gradient_matches_finite_differences():
    torch.manual_seed(4)
    ids = torch.tensor([[2, 0, 2, 1, 0], [2, 2, 0, 0, 2], [0, 1, 2, 1, 0]])
    mask = torch.tensor([[0.0, 1, 1, 1, 0], [0.0, 0, 1, 1, 1], [0.0, 1, 1, 1, 0]])
    terminated = torch.tensor([True, False, True])
    is_expert = torch.tensor([True, True, False])
    logits = torch.randn(3, 5, 3, dtype=torch.float64, requires_grad=True)

    def offline(x):
        return iqlearn_loss(x, ids, mask, terminated, lam=0.7, gamma=0.9)[0]

    def online(x):
        return iqlearn_loss(
            x, ids, mask, terminated, lam=0.7, gamma=0.9, is_expert=is_expert, alpha_mix=0.3
        )[0]

    assert torch.autograd.gradcheck(offline, (logits,))
    assert torch.autograd.gradcheck(online, (logits,))


def test_mask_gap_uses_the_next_decision_state():
    """With environment tokens between two completion segments, V(s′) of the action before the
    gap is the V of the state that predicts the next completion token, so sums telescope."""
    torch.manual_seed(5)
    ids = torch.tensor([[2, 0, 2, 2, 2, 0, 1]])
    mask = torch.tensor([[0.0, 1, 1, 0, 0, 1, 1]])
    logits = torch.randn(1, 7, 3, dtype=torch.float64)
    sv = soft_values(logits, ids, mask, True, gamma=1.0)
    lse = torch.logsumexp(logits[0], dim=-1)
    assert sv.v_next[0, 1] == lse[1]
    assert sv.v_next[0, 2] == lse[4]  # skips the environment tokens at 3 and 4
    assert sv.v_next[0, 5] == lse[5]
    assert sv.v_next[0, 6] == 0.0
    real = sv.mask[0] > 0
    assert torch.equal(sv.v_next[0, real][:-1], sv.v[0, real][1:])


def test_terminated_from_eos():
    tok = char_tokenizer()
    b = collate_pairs(tok, ["ab", "c"], ["x", "yz"], add_eos=False)
    assert terminated_from_eos(b.input_ids, b.loss_mask, tok.eos_token_id).tolist() == [
        False,
        False,
    ]
    b = collate_pairs(tok, ["ab", "c"], ["x", "yz"])
    assert terminated_from_eos(b.input_ids, b.loss_mask, tok.eos_token_id).tolist() == [True, True]
    empty = torch.zeros_like(b.loss_mask)
    assert terminated_from_eos(b.input_ids, empty, tok.eos_token_id).tolist() == [False, False]


def _state_values(logits, positions):
    return torch.logsumexp(logits[positions], dim=-1)


@pytest.mark.parametrize("gamma", [0.9, 1.0])
def test_online_term_sign(gamma):
    """A gradient step on the online term lowers V on policy states and raises it on expert
    states (γ = 1: the sum over a terminated row telescopes to V(s_1), so only s_1 moves)."""
    torch.manual_seed(6)
    ids = torch.tensor([[2, 0, 2, 1, 0], [2, 2, 0, 1, 0]])
    mask = torch.tensor([[0.0, 1, 1, 1, 0], [0.0, 1, 1, 1, 0]])
    is_expert = torch.tensor([True, False])
    logits = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    sv = soft_values(logits, ids, mask, True, gamma)
    term, stats = iqlearn_online_term(
        sv.v, sv.v_next, sv.mask, is_expert, alpha_mix=0.1, gamma=gamma
    )
    assert stats["policy_tokens"] == 3 and stats["expert_tokens"] == 3
    gap = sv.v - gamma * sv.v_next
    by_hand = 0.1 * (gap[1, 1:4].mean() - gap[0, 1:4].mean())
    assert term.item() == pytest.approx(by_hand.item(), abs=1e-12)
    term.backward()
    with torch.no_grad():
        stepped = logits - 1.0 * logits.grad
        states = [0, 1, 2] if gamma < 1 else [0]  # the states s_1..s_3 (positions 0..2)
        for p in states:
            assert _state_values(stepped, (1, p)) < _state_values(logits, (1, p))  # policy
            assert _state_values(stepped, (0, p)) > _state_values(logits, (0, p))  # expert
        if gamma == 1:
            assert logits.grad[:, 1:].abs().max() < 1e-12
        new_sv = soft_values(stepped, ids, mask, True, gamma)
        new_term, _ = iqlearn_online_term(
            new_sv.v, new_sv.v_next, new_sv.mask, is_expert, alpha_mix=0.1, gamma=gamma
        )
        assert new_term < term


def test_online_loss_decomposes():
    """Mixed batch = offline loss on the expert rows + α_mix·(policy gap − expert gap)."""
    tok, b, logits = _random_batch(7)
    is_expert = torch.tensor([True, False, True])
    terminated = torch.tensor([True, False, True])
    lam, gamma, alpha = 0.4, 0.95, 0.1
    loss, stats = iqlearn_loss(
        logits,
        b.input_ids,
        b.loss_mask,
        terminated,
        lam=lam,
        gamma=gamma,
        is_expert=is_expert,
        alpha_mix=alpha,
    )
    rows = [0, 2]
    offline, offline_stats = iqlearn_loss(
        logits[rows], b.input_ids[rows], b.loss_mask[rows], True, lam=lam, gamma=gamma
    )
    assert stats["tokens"] == offline_stats["tokens"] == 5
    assert stats["nll"] == pytest.approx(offline_stats["nll"], rel=1e-6)
    assert stats["td"] == pytest.approx(offline_stats["td"], rel=1e-6)
    expected = offline + alpha * (stats["value_gap_policy"] - stats["value_gap_expert"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats["online_term"] == pytest.approx(
        alpha * (stats["value_gap_policy"] - stats["value_gap_expert"]), rel=1e-6
    )
    # an all-expert batch has no online term: the offline loss
    all_expert, s = iqlearn_loss(
        logits, b.input_ids, b.loss_mask, True, lam=lam, is_expert=torch.ones(3, dtype=torch.bool)
    )
    plain, _ = iqlearn_loss(logits, b.input_ids, b.loss_mask, True, lam=lam)
    assert torch.equal(all_expert, plain) and s["online_term"] == 0.0


def test_lambda_schedule():
    assert lambda_schedule(0, 0.5, 100) == 0.0
    assert lambda_schedule(50, 0.5, 100) == pytest.approx(0.25)
    assert lambda_schedule(100, 0.5, 100) == 0.5
    assert lambda_schedule(1000, 0.5, 100) == 0.5
    assert lambda_schedule(0, 0.5, 0) == 0.5


def test_mle_entropy_loss_at_zero_is_mle():
    tok, b, logits = _random_batch(8)
    loss, stats = mle_entropy_loss(logits, b.input_ids, b.loss_mask, 0.0)
    mle, _ = mle_loss(shifted_token_logprobs(logits, b.input_ids), b.loss_mask)
    assert torch.equal(loss, mle)
    # entropy of the predicting states of the completion tokens
    expected_h = masked_mean(
        entropy_from_log_softmax(torch.log_softmax(logits[:, :-1], -1)), b.loss_mask[:, 1:]
    )
    assert stats["entropy"] == pytest.approx(expected_h.item(), rel=1e-5)
    coef = 0.1
    loss_c, stats_c = mle_entropy_loss(logits, b.input_ids, b.loss_mask, coef)
    assert loss_c.item() == pytest.approx(mle.item() - coef * expected_h.item(), rel=1e-5)
    assert stats_c["nll"] == stats["nll"]


def test_mle_entropy_bonus_raises_entropy():
    tok, b, logits = _random_batch(9)
    logits = (3.0 * logits).requires_grad_(True)  # peaked: plenty of entropy to gain
    _, s0 = mle_entropy_loss(logits, b.input_ids, b.loss_mask, 1.0)
    # the entropy part of the gradient alone: loss(coef) − loss(0)
    loss_c, _ = mle_entropy_loss(logits, b.input_ids, b.loss_mask, 1.0)
    loss_0, _ = mle_entropy_loss(logits, b.input_ids, b.loss_mask, 0.0)
    (loss_c - loss_0).backward()
    with torch.no_grad():
        _, s1 = mle_entropy_loss(logits - 0.5 * logits.grad, b.input_ids, b.loss_mask, 1.0)
    assert s1["entropy"] > s0["entropy"]


def test_entropy_handles_masked_out_logits():
    logits = torch.tensor([[[0.0, float("-inf"), 0.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    ids = torch.tensor([[0, 2]])
    mask = torch.tensor([[0.0, 1.0]])
    loss, stats = mle_entropy_loss(logits, ids, mask, 0.5)
    assert stats["entropy"] == pytest.approx(math.log(2))
    loss.backward()
    assert torch.isfinite(logits.grad).all()
