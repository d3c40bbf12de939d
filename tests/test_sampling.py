"""Tests for tether.generation.sampler: the fast GPT-2/Llama decode loops and the generic HF path
against ``model.generate`` and against one full forward pass of the HF model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tether.generation.sampler import SampleOutput, _retire, _StopChecker, inverse_cdf, sample
from tether.models.loading import build_model, char_tokenizer

ARCHS = ["gpt2", "llama"]
N_NEW = 40
# different lengths, so the batch is left-padded
PROMPTS = [
    "Input:\n12+3\nTarget:",
    "Hi",
    "Input:\n1234+56789\nTarget:",
    "abc xyz",
    "Input:\n9+9\nTarget:",
]
# A bias on the EOS logit that makes these seeded models end rows at mixed steps (1 to N_NEW
# and some never), which exercises retiring finished rows mid-batch. Asserted below.
EOS_BIAS = {"gpt2": 1.0, "llama": 1.5}


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def tiny(tok, arch: str, eos_bias: float | None = None):
    torch.manual_seed(0)
    model = build_model(tok, arch=arch, n_layer=2, n_head=2, n_embd=32).eval()
    with torch.no_grad():
        # default init (std 0.02) gives near-uniform logits and one repeated character;
        # larger weights give varied greedy text, a better test of positions and caching
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(10)
    if eos_bias is not None:
        head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
        head.weight = model.lm_head.weight  # still tied to the embedding
        with torch.no_grad():
            head.bias.zero_()
            head.bias[tok.eos_token_id] = eos_bias
        model.lm_head = head
    return model


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tok):
    return tiny(tok, request.param)


@pytest.fixture(scope="module", params=ARCHS)
def eos_model(request, tok):
    return tiny(tok, request.param, EOS_BIAS[request.param])


def rows(out: SampleOutput) -> list[list[int]]:
    return [
        ids[: int(n)]
        for ids, n in zip(out.completion_ids.tolist(), out.completion_mask.sum(1), strict=True)
    ]


def hf_greedy(model, tok, prompts, n_new) -> list[list[int]]:
    """``generate``'s greedy completions, each cut after its first EOS."""
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    out = model.generate(
        **enc, do_sample=False, max_new_tokens=n_new, pad_token_id=tok.pad_token_id
    )
    result = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id) + 1]
        result.append(row)
    return result


def reference_logprobs(model, tok, prompts, out: SampleOutput, temperature: float):
    """Per row: log_softmax(logits / T) of one unpadded forward over prompt + completion,
    at the completion tokens."""
    result = []
    for prompt, completion in zip(prompts, rows(out), strict=True):
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids + completion])).logits[0].float()
        steps = logits[len(ids) - 1 : len(ids) - 1 + len(completion)]
        logp = torch.log_softmax(steps / (temperature or 1.0), -1)
        result.append(logp.gather(1, torch.tensor(completion)[:, None])[:, 0])
    return result


def test_greedy_matches_generate(model, tok):
    out = sample(model, tok, PROMPTS, max_new_tokens=N_NEW)
    got = rows(out)
    assert got == hf_greedy(model, tok, PROMPTS, N_NEW)
    assert len({tuple(r) for r in got}) == len(PROMPTS)  # varied text, not one character
    # rows without EOS (most of them, for these models) are cut by max_new_tokens
    ended = [r[-1] == tok.eos_token_id for r in got]
    assert out.finished == ended and not all(ended)
    assert all(len(r) == N_NEW for r, e in zip(got, ended, strict=True) if not e)
    assert out.texts == tok.batch_decode(got, skip_special_tokens=True)


def test_greedy_with_eos_matches_generate(eos_model, tok):
    out = sample(eos_model, tok, PROMPTS, max_new_tokens=N_NEW)
    got = rows(out)
    lengths = [len(r) for r in got]
    assert min(lengths) < N_NEW and len(set(lengths)) >= 3  # rows retire at different steps
    assert got == hf_greedy(eos_model, tok, PROMPTS, N_NEW)
    for r, done in zip(got, out.finished, strict=True):
        assert done == (r[-1] == tok.eos_token_id)  # EOS kept in the completion
        assert tok.eos_token_id not in r[:-1]
    pad = out.completion_mask == 0
    assert bool((out.completion_ids[pad] == tok.pad_token_id).all())
    assert bool((out.logprobs[pad] == 0).all())
    assert all("<eos>" not in t for t in out.texts)  # special tokens skipped


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_logprobs_match_full_forward(eos_model, tok, temperature):
    gen = torch.Generator().manual_seed(1)
    out = sample(
        eos_model, tok, PROMPTS, max_new_tokens=N_NEW, temperature=temperature, generator=gen
    )
    assert out.logprobs.dtype == torch.float32
    refs = reference_logprobs(eos_model, tok, PROMPTS, out, temperature)
    for i, ref in enumerate(refs):
        got = out.logprobs[i, : len(ref)]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    if temperature == 0.7:
        # and the scaling matters: at T = 1 these would be different numbers
        plain = reference_logprobs(eos_model, tok, PROMPTS, out, 1.0)
        assert not torch.allclose(torch.cat(refs), torch.cat(plain), atol=1e-3)


def test_seeded_sampling_is_reproducible(model, tok):
    def draw(seed: int) -> SampleOutput:
        gen = torch.Generator().manual_seed(seed)
        return sample(model, tok, PROMPTS, max_new_tokens=N_NEW, temperature=1.0, generator=gen)

    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_inverse_cdf_draws_by_hand_and_at_the_right_frequencies():
    """The first token whose running sum exceeds u × the total: by hand on p = (0.5, 0, 0.3,
    0.2) (the zero-probability token is never drawn, unnormalised rows are normalised), and
    200,000 draws of a random row of 49,152 (a chat vocabulary) fall on its three likeliest
    tokens and its tail at their probabilities (within 4 standard errors)."""
    p = torch.tensor([[0.5, 0.0, 0.3, 0.2]])
    cases = [(0.0, 0), (0.4999, 0), (0.5001, 2), (0.7999, 2), (0.8001, 3), (0.99999, 3)]
    for u, token in cases:
        assert int(inverse_cdf(p, torch.tensor([[u]], dtype=torch.float64))) == token
        assert int(inverse_cdf(p * 7, torch.tensor([[u]], dtype=torch.float64))) == token
    # u = 0 (torch.rand can return it) with a zero-probability first token: not drawn
    zero_first = torch.tensor([[0.0, 0.5, 0.5]])
    assert int(inverse_cdf(zero_first, torch.zeros(1, 1, dtype=torch.float64))) == 1
    half = torch.full((1, 1), 0.5, dtype=torch.float64)
    for bad in ([[0.5, float("nan")]], [[float("inf"), 1.0]], [[0.0, 0.0]]):
        with pytest.raises(ValueError, match="not finite and positive"):
            inverse_cdf(torch.tensor(bad), half)
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(1, 49152, generator=g) * 3, -1)
    n = 200_000
    u = torch.rand(1, n, generator=g, dtype=torch.float64)
    drawn = inverse_cdf(probs, u)[0]  # one row, n uniforms: n draws from it
    top = probs[0].topk(3).indices
    for expected, hits in [
        *((probs[0, i], (drawn == i).sum()) for i in top),
        (1 - probs[0, top].sum(), (~torch.isin(drawn, top)).sum()),
    ]:
        q = float(expected)
        assert abs(int(hits) / n - q) <= 4 * (q * (1 - q) / n) ** 0.5


def test_stop_string_cuts_text_and_finishes(model, tok):
    full = sample(model, tok, PROMPTS, max_new_tokens=N_NEW)
    stop = full.texts[0][5:7]  # a string row 0 is known to produce
    out = sample(model, tok, PROMPTS, max_new_tokens=N_NEW, stop=[stop])
    assert out.finished[0]
    for i, text in enumerate(full.texts):
        at = text.find(stop)
        if at < 0:
            assert out.texts[i] == text and out.finished[i] == full.finished[i]
            assert rows(out)[i] == rows(full)[i]
        else:
            end = at + len(stop)
            assert out.texts[i] == text[:end] and out.finished[i]
            # one token per character: the row stops right after the stop string's last token
            assert rows(out)[i] == rows(full)[i][:end]


def test_several_stop_strings_cut_at_the_first(model, tok):
    full = sample(model, tok, PROMPTS[:1], max_new_tokens=N_NEW)
    text = full.texts[0]
    early, late = text[8:10], text[3:5]
    assert text.find(early) > text.find(late)
    out = sample(model, tok, PROMPTS[:1], max_new_tokens=N_NEW, stop=[early, late])
    assert out.texts[0] == text[: text.find(late) + len(late)]


def test_max_new_tokens_truncates(eos_model, tok):
    out = sample(eos_model, tok, PROMPTS, max_new_tokens=3)
    lengths = out.completion_mask.sum(1).tolist()
    assert out.completion_ids.shape[1] == 3
    for n, done, r in zip(lengths, out.finished, rows(out), strict=True):
        assert done == (r[-1] == tok.eos_token_id)
        assert n == 3 or done
    assert not all(out.finished)


def test_ignore_eos_runs_every_row_to_the_end(eos_model, tok):
    out = sample(eos_model, tok, PROMPTS, max_new_tokens=N_NEW, ignore_eos=True)
    assert bool(out.completion_mask.all()) and out.finished == [False] * len(PROMPTS)


def test_batch_size_chunks_give_the_same_result(eos_model, tok):
    whole = sample(eos_model, tok, PROMPTS, max_new_tokens=N_NEW)
    chunked = sample(eos_model, tok, PROMPTS, max_new_tokens=N_NEW, batch_size=2)
    assert rows(chunked) == rows(whole)
    assert chunked.texts == whole.texts and chunked.finished == whole.finished
    assert torch.equal(chunked.prompt_ids, whole.prompt_ids)
    assert torch.equal(chunked.completion_ids, whole.completion_ids)
    torch.testing.assert_close(chunked.logprobs, whole.logprobs, atol=1e-5, rtol=0)


def test_generic_path_matches_fast_path(eos_model, tok):
    fast = sample(eos_model, tok, PROMPTS, max_new_tokens=N_NEW)
    slow = sample(eos_model, tok, PROMPTS, max_new_tokens=N_NEW, fast=False)
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    assert fast.texts == slow.texts and fast.finished == slow.finished
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)


def test_llama_grouped_query_attention(tok):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # nonzero biases and varied text
    fast = sample(model, tok, PROMPTS, max_new_tokens=20)
    slow = sample(model, tok, PROMPTS, max_new_tokens=20, fast=False)
    assert rows(fast) == rows(slow) == hf_greedy(model, tok, PROMPTS, 20)
    for i, ref in enumerate(reference_logprobs(model, tok, PROMPTS, fast, 1.0)):
        torch.testing.assert_close(fast.logprobs[i, : len(ref)], ref, atol=1e-4, rtol=0)


def test_output_layout(model, tok):
    out = sample(model, tok, PROMPTS, max_new_tokens=5)
    lengths = [len(tok(p)["input_ids"]) for p in PROMPTS]
    P = max(lengths)
    assert out.prompt_ids.shape == out.prompt_mask.shape == (len(PROMPTS), P)
    for i, n in enumerate(lengths):
        assert out.prompt_mask[i].tolist() == [0] * (P - n) + [1] * n  # left-padded
        assert out.prompt_ids[i, P - n :].tolist() == tok(PROMPTS[i])["input_ids"]
        assert set(out.prompt_ids[i, : P - n].tolist()) <= {tok.pad_token_id}
    # ordinary tensors, usable in a training forward/backward afterwards
    for t in (out.prompt_ids, out.completion_ids, out.completion_mask, out.logprobs):
        assert not t.is_inference()


def test_edge_cases(model, tok):
    empty = sample(model, tok, [], max_new_tokens=5)
    assert empty.completion_ids.shape == (0, 0) and empty.texts == []
    zero = sample(model, tok, PROMPTS[:2], max_new_tokens=0)
    assert zero.completion_ids.shape == (2, 0) and zero.texts == ["", ""]
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            sample(model, tok, PROMPTS, max_new_tokens=5)
    finally:
        model.eval()
    with pytest.raises(ValueError, match="no tokens"):
        sample(model, tok, ["", "x"], max_new_tokens=5)


def test_gpt2_position_limit(tok):
    model = build_model(tok, arch="gpt2", n_layer=1, n_head=2, n_embd=16, max_positions=32).eval()
    with pytest.raises(ValueError, match="positions"):
        sample(model, tok, ["0123456789"], max_new_tokens=30)
    out = sample(model, tok, ["0123456789"], max_new_tokens=23)  # exactly fits
    assert out.completion_mask.sum() <= 23


def test_stop_checker_filter(tok):
    checker = _StopChecker(tok, ["ab"])
    assert checker.may_end is not None
    ids = tok("xxab")["input_ids"]
    assert checker.hit(ids) and not checker.hit(ids[:-1])
    # only tokens whose text holds a 'b' can complete "ab"
    assert checker.may_end[tok.convert_tokens_to_ids("b")]
    assert not checker.may_end[tok.convert_tokens_to_ids("a")]
    # a stop string ending in whitespace checks every token
    assert _StopChecker(tok, ["a "]).may_end is None


def test_retire_moves_only_survivors_into_holes():
    # rows 1 and 3 of 6 finish: survivors 4 and 5 fill the holes, 0 and 2 stay put
    order, moves = _retire(6, {1, 3})
    assert order == [0, 4, 2, 5] and moves == [(4, 1), (5, 3)]
    # finished rows at the end leave nothing to move
    assert _retire(5, {3, 4}) == ([0, 1, 2], [])
    assert _retire(3, {0, 1, 2}) == ([], [])
    order, moves = _retire(4, {0, 3})
    assert order == [2, 1] and moves == [(2, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_is_the_same_product_for_any_row_count(dtype):
    """The runner's Linear: with oneDNN (every x86 CPU build of torch) the weight is reordered
    once for a row count and then multiplies any number of rows (rows retire, the prefill has
    many) to F.linear's product; with packing off it is F.linear itself."""
    from tether.generation import weights

    torch.manual_seed(0)
    w, b = torch.randn(576, 512).to(dtype), torch.randn(576).to(dtype)  # large enough to pack
    lin = weights.Linear(w, rows=16)
    if torch.backends.mkldnn.is_available():
        assert lin.packed is not None  # the packed path is the one tested below
    assert weights.Linear(w[:64, :64], rows=16).packed is None  # too small to earn it
    tol = {"atol": 1e-3, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1.0, "rtol": 0.02}
    for n in (1, 7, 16, 300):
        x = torch.randn(n, 512).to(dtype)
        torch.testing.assert_close(lin(x), F.linear(x, w), **tol)
        torch.testing.assert_close(lin(x, b), F.linear(x, w, b), **tol)
    off = weights.PACK_WEIGHTS
    weights.PACK_WEIGHTS = False
    try:
        plain = weights.Linear(w, rows=16)
    finally:
        weights.PACK_WEIGHTS = off
    assert plain.packed is None
    x = torch.randn(5, 512).to(dtype)
    assert torch.equal(plain(x, b), F.linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_gate_up_is_silu_of_the_gate_times_the_up_projection(dtype, bias):
    """The Llama runner's GateUp: with both halves packed, the activation and the product
    run as oneDNN post-ops of the two GEMMs; either way it is silu(x Wg^T + bg) * (x Wu^T +
    bu) for the stacked weight [Wg; Wu], for any row count (fp32 reference)."""
    from tether.generation import weights

    torch.manual_seed(0)
    inter, width = 640, 512  # each half large enough to pack
    w = (torch.randn(2 * inter, width) * 0.05).to(dtype)
    b = torch.randn(2 * inter).to(dtype) if bias else None
    gate_up = weights.GateUp(w, b, rows=16)
    if torch.backends.mkldnn.is_available():
        assert gate_up.packed is not None  # the fused path is the one tested below
    w32 = w.float()
    b32 = (None, None) if b is None else (b[:inter].float(), b[inter:].float())
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    for n in (1, 7, 16, 300):
        x = torch.randn(n, width).to(dtype)
        ref = F.silu(F.linear(x.float(), w32[:inter], b32[0])) * F.linear(
            x.float(), w32[inter:], b32[1]
        )
        out = gate_up(x)
        assert out.dtype == dtype and out.shape == (n, inter)
        torch.testing.assert_close(out.float(), ref, **tol)
    small = weights.GateUp(w[:, :64].contiguous(), None, rows=16)  # too small to pack
    assert small.packed is None
    x = torch.randn(3, 64).to(dtype)
    gu = F.linear(x, w[:, :64])
    assert torch.equal(small(x), F.silu(gu[:, :inter]) * gu[:, inter:])


def test_packed_weights_sample_what_plain_weights_sample(eos_model, tok, monkeypatch):
    """Greedy completions with the runner's packed weights are those of plain F.linear, and
    their log-probs agree to fp32 rounding (the packed GEMM sums in another order)."""
    from tether.generation import weights

    monkeypatch.setattr(weights, "PACK_MIN_NUMEL", 0)  # pack even this tiny model's weights
    packed = sample(eos_model, tok, PROMPTS, max_new_tokens=N_NEW)
    monkeypatch.setattr(weights, "PACK_WEIGHTS", False)
    plain = sample(eos_model, tok, PROMPTS, max_new_tokens=N_NEW)
    assert torch.equal(packed.completion_ids, plain.completion_ids)
    torch.testing.assert_close(packed.logprobs, plain.logprobs, atol=1e-5, rtol=0)


def test_the_kv_cache_storage_is_reused_only_by_a_runner_that_follows(eos_model, tok):
    """A fast runner's KV cache reuses the storage of the previous runner's once that runner
    is gone and the storage is large enough; while it lives, or when it is too small, a new
    one; a reused (dirty) storage samples exactly what a fresh one does."""
    from tether.generation import weights

    shape, bf16, cpu = (2, 3, 4), torch.bfloat16, torch.device("cpu")
    first = weights.kv_buffer(shape, bf16, cpu)
    while_alive = weights.kv_buffer(shape, bf16, cpu)
    assert while_alive.data_ptr() != first.data_ptr()
    pointer = first.data_ptr()
    del first, while_alive
    again = weights.kv_buffer((3, 4), bf16, cpu)  # smaller: a view of the same storage
    assert again.data_ptr() == pointer and again.shape == (3, 4)
    del again
    larger = weights.kv_buffer((5, 6, 7), bf16, cpu)
    assert larger.numel() == 210 and larger.data_ptr() != pointer
    del larger
    sample(eos_model, tok, PROMPTS, max_new_tokens=N_NEW)  # leaves its cache's storage
    storage = weights._KV_BUFFER["storage"]
    with torch.inference_mode():  # sample's mode, in which the storage was made
        storage.fill_(float("nan"))  # whatever the last run left there
    reused = sample(eos_model, tok, PROMPTS, max_new_tokens=N_NEW)
    assert weights._KV_BUFFER["storage"] is storage
    del storage
    weights._KV_BUFFER.update(storage=None, view=None)
    fresh = sample(eos_model, tok, PROMPTS, max_new_tokens=N_NEW)
    assert torch.equal(reused.completion_ids, fresh.completion_ids)
    assert torch.equal(reused.logprobs, fresh.logprobs)


def _prepared() -> dict:
    """The prepared values the last Llama runner kept, by tag (layer, matrix, settings)."""
    from tether.generation import weights

    return {tag: entry[2] for tag, entry in weights._PREPARED.items()}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_prepared_weights_are_reused_only_from_the_same_unchanged_tensors(tok, dtype):
    """A second call on the same frozen model reuses every prepared (folded, cast, packed)
    matrix of the first; an in-place update of one weight re-prepares the matrices made from
    it and only those, and samples what freshly prepared weights sample; another model with
    equal values but other tensors reuses nothing."""
    import copy

    from tether.generation import weights

    model = tiny(tok, "llama").requires_grad_(False)
    weights.release()
    first = sample(model, tok, PROMPTS, max_new_tokens=N_NEW, dtype=dtype)
    kept = _prepared()
    # per layer [q|k|v], gate-up, o and down, and the LM head
    assert len(kept) == 4 * model.config.num_hidden_layers + 1
    again = sample(model, tok, PROMPTS, max_new_tokens=N_NEW, dtype=dtype)
    assert all(_prepared()[tag] is value for tag, value in kept.items())
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert torch.equal(first.logprobs, again.logprobs)

    with torch.no_grad():  # one optimizer-like step on layer 0's key projection
        model.model.layers[0].self_attn.k_proj.weight.add_(0.5)
    changed = sample(model, tok, PROMPTS, max_new_tokens=N_NEW, dtype=dtype)
    now = _prepared()
    for tag, value in kept.items():
        assert (now[tag] is value) == (tag[:2] != ("qkv", 0)), tag
    weights.release()
    fresh = sample(model, tok, PROMPTS, max_new_tokens=N_NEW, dtype=dtype)
    assert torch.equal(changed.completion_ids, fresh.completion_ids)
    assert torch.equal(changed.logprobs, fresh.logprobs)
    assert not torch.equal(changed.logprobs, first.logprobs)

    twin = copy.deepcopy(model)
    kept = _prepared()
    sample(twin, tok, PROMPTS, max_new_tokens=N_NEW, dtype=dtype)
    assert not any(_prepared()[tag] is value for tag, value in kept.items())
    weights.release()
    assert weights._PREPARED == {} and weights._KV_BUFFER["storage"] is None


def test_weights_that_train_are_prepared_afresh_at_every_call(tok):
    """Trainable weights are never reused, so an update that bypasses the version counter
    (``.data``, as DeepSpeed's ZeRO updates the weights) is sampled with; of a LoRA-like
    model, the frozen matrices are kept and the trainable ones not."""
    from tether.generation import weights

    model = tiny(tok, "llama")
    weights.release()
    before = sample(model, tok, PROMPTS, max_new_tokens=N_NEW)
    assert _prepared() == {}  # nothing kept: every weight trains
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.data.add_(0.5)  # no version bump
    after = sample(model, tok, PROMPTS, max_new_tokens=N_NEW)
    weights.release()
    fresh = sample(model, tok, PROMPTS, max_new_tokens=N_NEW)
    assert torch.equal(after.logprobs, fresh.logprobs)
    assert not torch.equal(after.logprobs, before.logprobs)

    for name, p in model.named_parameters():  # the block linears train, the rest is frozen
        p.requires_grad_("layers" in name and "proj" in name)
    sample(model, tok, PROMPTS, max_new_tokens=N_NEW)
    assert [tag[0] for tag in _prepared()] == ["head"]
    weights.release()


def test_prepared_weights_are_kept_only_on_the_cpu():
    """Off the CPU nothing is kept between calls (device allocators reuse memory already)."""
    from tether.generation import weights

    w = torch.ones(2, 2)
    for device, kept in ((torch.device("cpu"), 1), (torch.device("meta"), 0)):
        weights.release()
        prep = weights.Preparation(device)
        assert prep(("w",), [w], lambda: w * 2).sum() == 8
        prep.keep()
        assert len(weights._PREPARED) == kept
    weights.release()


def test_prepared_values_need_the_very_same_source_tensor():
    """Reuse needs the source tensor itself, alive: another tensor at the same address with
    the same version (a freed model's address taken by a new one) does not match."""
    from tether.generation import weights

    w = torch.ones(2, 2)
    alias = w.detach()  # the same storage and version counter, another tensor
    builds = []

    def build(source):
        builds.append(source)
        return source * 2

    weights.release()
    for source, built in ((w, 1), (w, 1), (alias, 2), (alias, 2)):
        prep = weights.Preparation(torch.device("cpu"))
        prep(("w",), [source], lambda source=source: build(source))
        prep.keep()
        assert len(builds) == built
    weights.release()


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_is_softmax_attention_by_hand(heads, kv_heads, masked):
    """The CPU decode step's attention, against softmax(q·k * scale + mask) v written out per
    query head in float64, query head h reading kv head h // (heads / kv_heads) as HF's
    grouped-query attention does; masked positions get no weight."""
    from tether.generation.runners import _decode_attention

    torch.manual_seed(0)
    n, T, D, scale = 3, 7, 8, 0.3
    q = torch.randn(n, heads, 1, D)
    k, v = torch.randn(n, kv_heads, T, D), torch.randn(n, kv_heads, T, D)
    mask = None
    if masked:
        mask = torch.zeros(n, 1, 1, T)
        mask[0, 0, 0, :2] = float("-inf")  # row 0's first two positions are prompt pads
        mask[2, 0, 0, 3] = float("-inf")
    got = _decode_attention(q, k, v, mask, scale)
    assert got.shape == (n, heads, 1, D)
    group = heads // kv_heads
    for i in range(n):
        for h in range(heads):
            kh, vh = k[i, h // group].double(), v[i, h // group].double()
            s = [float(q[i, h, 0].double() @ kh[t]) * scale for t in range(T)]
            if mask is not None:
                s = [x + float(mask[i, 0, 0, t]) for t, x in enumerate(s)]
            w = torch.tensor(s, dtype=torch.float64).softmax(0)
            if mask is not None:
                assert float(w[mask[i, 0, 0] == float("-inf")].sum()) == 0.0
            torch.testing.assert_close(got[i, h, 0].double(), w @ vh, atol=1e-6, rtol=1e-6)


def test_a_padded_prefill_multiplies_only_the_real_positions(tok, monkeypatch):
    """Left-padded prompts: the Llama runner's prefill GEMMs take one row per real prompt
    token, not one per padded position; the completions are still generate's."""
    from tether.generation import weights

    model = tiny(tok, "llama")
    seen: list[int] = []
    call = weights.Linear.__call__

    def spy(self, x, bias=None):
        seen.append(x.shape[0])
        return call(self, x, bias)

    monkeypatch.setattr(weights.Linear, "__call__", spy)
    out = sample(model, tok, PROMPTS, max_new_tokens=3)
    real = sum(len(tok(p)["input_ids"]) for p in PROMPTS)
    padded = len(PROMPTS) * max(len(tok(p)["input_ids"]) for p in PROMPTS)
    assert real < padded
    assert seen[0] == real  # the first layer's q/k/v projection, in the prefill
    assert padded not in seen
    assert rows(out) == hf_greedy(model, tok, PROMPTS, 3)


def test_bf16_sampling_on_the_cpu_attends_in_fp32(tok):
    """In bf16 on the CPU the matmuls run in bf16 and the KV cache and attention in fp32
    (faster there at decode shapes); the completions stay close to fp32's."""
    from tether.generation.runners import LlamaRunner, make_runner

    model = tiny(tok, "llama")
    mask = torch.ones(2, 4, dtype=torch.long)
    with torch.inference_mode():
        runner = make_runner(model, True, mask, [4, 4], 5, torch.bfloat16)
    assert isinstance(runner, LlamaRunner)
    assert runner.cache.dtype == torch.float32 and runner.dtype == torch.bfloat16
    fp32 = sample(model, tok, PROMPTS, max_new_tokens=N_NEW)
    bf16 = sample(model, tok, PROMPTS, max_new_tokens=N_NEW, dtype=torch.bfloat16)
    assert (bf16.completion_ids[:, :5] == fp32.completion_ids[:, :5]).float().mean() > 0.8
