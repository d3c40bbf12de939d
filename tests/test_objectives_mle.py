"""Token log-probs, batching and the MLE loss against hand computations."""

import math

import torch

from tether.batches import collate_pairs
from tether.models.loading import char_tokenizer
from tether.objectives import mle_loss, shifted_token_logprobs, token_logprobs


def test_token_logprobs_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = [1/4, 3/4]
    assert torch.allclose(token_logprobs(logits, torch.tensor([1])), torch.tensor([math.log(0.75)]))
    # temperature 2 halves the logits: p ∝ [1, sqrt(3)]
    expected = math.log(math.sqrt(3) / (1 + math.sqrt(3)))
    assert torch.allclose(
        token_logprobs(logits, torch.tensor([1]), temperature=2.0), torch.tensor([expected])
    )


def test_token_logprobs_are_fp32_from_bf16():
    logits = torch.randn(2, 5, 7).bfloat16()
    out = token_logprobs(logits, torch.zeros(2, 5, dtype=torch.long))
    assert out.dtype == torch.float32


def test_collate_masks_completion_and_eos_only():
    tok = char_tokenizer()
    b = collate_pairs(tok, ["ab", "c"], ["xy", "zzz"])
    assert b.input_ids.shape == (2, 5)  # "ab"+"xy"+eos and "c"+"zzz"+eos
    assert b.loss_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert b.attention_mask.tolist() == [[1] * 5, [1] * 5]
    b2 = collate_pairs(tok, ["abc", "c"], ["x", "z"])
    assert b2.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert b2.loss_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]]
    assert b.input_ids[0, 4].item() == tok.eos_token_id
    assert tok.decode(b.input_ids[1, :4]) == "czzz"


def test_mle_loss_equals_cross_entropy_on_completion_tokens():
    torch.manual_seed(0)
    tok = char_tokenizer()
    b = collate_pairs(tok, ["Input:\n1+2\nTarget:", "hi"], ["\n3", "there"])
    logits = torch.randn(*b.input_ids.shape, 99)
    loss, stats = mle_loss(shifted_token_logprobs(logits, b.input_ids), b.loss_mask)
    # by hand: cross-entropy of position t-1's logits against token t, over completion tokens
    terms = []
    for i in range(b.input_ids.shape[0]):
        for t in range(1, b.input_ids.shape[1]):
            if b.loss_mask[i, t]:
                terms.append(
                    torch.nn.functional.cross_entropy(
                        logits[i, t - 1][None], b.input_ids[i, t][None]
                    )
                )
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)
    assert stats["tokens"] == len(terms) == 3 + 6  # "\n3"+eos, "there"+eos


def test_mle_gradient_matches_finite_difference():
    torch.manual_seed(1)
    logits = torch.randn(1, 4, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    loss, _ = mle_loss(shifted_token_logprobs(logits, ids), mask)
    loss.backward()
    eps = 1e-6
    with torch.no_grad():
        for idx in [(0, 1, 3), (0, 2, 4), (0, 2, 0)]:
            plus, minus = logits.clone(), logits.clone()
            plus[idx] += eps
            minus[idx] -= eps
            fd = (
                mle_loss(shifted_token_logprobs(plus, ids), mask)[0]
                - mle_loss(shifted_token_logprobs(minus, ids), mask)[0]
            ) / (2 * eps)
            assert abs(fd.item() - logits.grad[idx].item()) < 1e-6
    assert logits.grad[0, 0].abs().sum() == 0  # position 0 predicts a prompt token: no loss
