"""Reward extraction: per-token r̂, sequence returns, the telescoping identity, Spearman."""

import math
import warnings

import pytest
import torch

from tether.batches import collate_pairs
from tether.models.loading import build_model, char_tokenizer
from tether.objectives import shifted_token_logprobs, soft_values
from tether.rewards.implicit import model_returns, sequence_returns, spearman, token_rewards


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = char_tokenizer()
    model = build_model(tok, "llama", 1, 2, 16, 64, 0.0)
    # three rows, the second without EOS (truncated), different lengths (padding)
    done = collate_pairs(tok, ["1+2=", "abc=", "7="], ["3", "xyz", "42"])
    cut = collate_pairs(tok, ["1+2=", "abc=", "7="], ["3", "xyz", "42"], add_eos=False)
    ids, attn, mask = done.input_ids.clone(), done.attention_mask.clone(), done.loss_mask.clone()
    ids[1], attn[1], mask[1] = 0, 0, 0.0
    n = int(cut.attention_mask[1].sum())
    ids[1, :n], attn[1, :n], mask[1, :n] = (
        cut.input_ids[1, :n],
        cut.attention_mask[1, :n],
        cut.loss_mask[1, :n],
    )
    batch = type(done)(ids, attn, mask)
    return tok, model, batch


def test_token_rewards_are_masked_soft_values(tiny):
    tok, model, batch = tiny
    model.train()
    terminated = torch.tensor([True, False, True])
    r = token_rewards(model, batch, terminated, gamma=0.9)
    assert model.training  # mode restored
    assert not r.requires_grad and r.dtype == torch.float32 and r.shape == batch.input_ids.shape
    assert (r[batch.loss_mask == 0] == 0).all()
    with torch.no_grad():
        model.eval()
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    sv = soft_values(logits, batch.input_ids, batch.loss_mask, terminated, 0.9)
    real = batch.loss_mask > 0
    assert torch.allclose(r[real], sv.reward[real])
    # terminated=None infers it from EOS: same rows here
    assert torch.equal(token_rewards(model, batch, None, gamma=0.9), r)


def test_sequence_returns_by_hand():
    rewards = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0], [9.0, 9.0, 4.0, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1, 1, 1, 0], [0.0, 0, 1, 0, 0]])
    returns = sequence_returns(rewards, mask, gamma=0.5)
    assert returns.tolist() == [1.0 + 0.5 * 2.0 + 0.25 * 3.0, 4.0]
    assert sequence_returns(rewards, mask).tolist() == [6.0, 4.0]


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_return_telescopes_to_first_value_plus_discounted_logprobs(tiny, gamma):
    """R = V(s_1) + Σ_t γ^(t−1) log π_t − γ^T V(s_{T+1}), the last term 0 for terminated rows."""
    tok, model, batch = tiny
    terminated = torch.tensor([True, False, True])
    returns = model_returns(model, batch, terminated, gamma)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = shifted_token_logprobs(logits, batch.input_ids)
    for b in range(3):
        positions = batch.loss_mask[b].nonzero().flatten().tolist()
        first, last, count = positions[0], positions[-1], len(positions)
        v_first = torch.logsumexp(logits[b, first - 1], dim=-1).item()
        discounted_logp = sum(gamma**k * logp[b, p].item() for k, p in enumerate(positions))
        boundary = 0.0 if terminated[b] else torch.logsumexp(logits[b, last], dim=-1).item()
        expected = v_first + discounted_logp - gamma**count * boundary
        assert returns[b].item() == pytest.approx(expected, abs=1e-4)
    # truncation is not terminal: treating row 1 as terminated changes its return
    as_done = model_returns(model, batch, True, gamma)
    assert torch.allclose(as_done[[0, 2]], returns[[0, 2]])
    assert not torch.isclose(as_done[1], returns[1])


def test_spearman_monotone_and_degenerate():
    x = torch.tensor([0.1, 0.5, 0.2, 3.0, -1.0])
    rho, p = spearman(x, torch.exp(x))
    assert rho == pytest.approx(1.0) and p < 0.05
    rho, _ = spearman(x.tolist(), [-(v**3) for v in x.tolist()])
    assert rho == pytest.approx(-1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rho, p = spearman(x, [1.0] * 5)
        assert math.isnan(rho) and math.isnan(p)
        rho, p = spearman([1.0], [2.0])
        assert math.isnan(rho) and math.isnan(p)
    with pytest.raises(ValueError):
        spearman([1.0, 2.0], [1.0, 2.0, 3.0])
