"""Tests for tether.eval.addition: certainty, addition accuracy, critical certainty (the bootstrap
CI is tested with tether.eval.stats, tests/test_stats.py)."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from tether.eval import addition as evaluate
from tether.eval.addition import (
    FIGURE_KEYS,
    accuracy_table,
    addition_accuracy,
    certainty_table,
    critical_certainty,
    score_critical_certainty,
)
from tether.models.loading import build_model, char_tokenizer
from tether.objectives.common import certainty
from tether.tasks.addition import Problem, critical_positions, max_completion_tokens

PROMPT_RE = re.compile(r"Input:\n(\d+)\+(\d+)\nTarget:")


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return build_model(tokenizer, arch="llama", n_layer=1, n_head=2, n_embd=32).eval()


# ----------------------------------------------------------------------------- stubs


class OracleStub(torch.nn.Module):
    """A "model" that knows the answer: at every completion position its logits put ``strong``
    on the reference target's next character (then EOS), except at the critical positions of
    ``max_digits``, where the correct character gets only ``weak`` (still the argmax). It reads
    the problem back from the prompt, so it needs the whole sequence (no KV cache)."""

    def __init__(self, tokenizer, max_digits: int, strong: float = 100.0, weak: float = 1.0):
        super().__init__()
        self.tok, self.max_digits, self.strong, self.weak = tokenizer, max_digits, strong, weak
        self.vocab = len(tokenizer)
        self.id_to_char = {i: t for t, i in tokenizer.get_vocab().items()}

    def forward(self, input_ids, attention_mask=None, **kwargs):
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.vocab)
        for b in range(batch):
            cols = [c for c in range(length) if attention_mask is None or attention_mask[b, c]]
            text = "".join(self.id_to_char[int(input_ids[b, c])] for c in cols)
            m = PROMPT_RE.search(text)
            problem = Problem(int(m.group(1)), int(m.group(2)))
            target_ids = self.tok(problem.target, add_special_tokens=False)["input_ids"]
            target_ids = target_ids + [self.tok.eos_token_id]
            critical = set(critical_positions(problem, self.max_digits))
            last_prompt_col = cols[m.end() - 1]
            for j, token in enumerate(target_ids):  # token j is predicted at column start + j
                col = last_prompt_col + j
                if col >= length:
                    break
                logits[b, col, token] = self.weak if j in critical else self.strong
        return SimpleNamespace(logits=logits)


def oracle_sample(model, tokenizer, prompts, *, max_new_tokens, temperature=0.0, **kwargs):
    """A stand-in for tether.generation.sampler.sample that answers every prompt with its reference
    target and EOS, in the sampler's layout (prompts left-padded, completions right-padded)."""
    rows_p = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    rows_c = []
    for prompt in prompts:
        m = PROMPT_RE.search(prompt)
        target = Problem(int(m.group(1)), int(m.group(2))).target
        rows_c.append(tokenizer(target, add_special_tokens=False)["input_ids"])
    rows_c = [r[: max_new_tokens - 1] + [tokenizer.eos_token_id] for r in rows_c]
    P, T = max(map(len, rows_p)), max(map(len, rows_c))
    prompt_ids = torch.zeros(len(prompts), P, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_ids = torch.zeros(len(prompts), T, dtype=torch.long)
    completion_mask = torch.zeros_like(completion_ids)
    for i, (p, c) in enumerate(zip(rows_p, rows_c, strict=True)):
        prompt_ids[i, P - len(p) :], prompt_mask[i, P - len(p) :] = torch.tensor(p), 1
        completion_ids[i, : len(c)], completion_mask[i, : len(c)] = torch.tensor(c), 1
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in rows_c]
    return SimpleNamespace(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=torch.zeros(len(prompts), T),
        texts=texts,
        finished=[True] * len(prompts),
    )


# ----------------------------------------------------------------------------- certainty


@pytest.mark.parametrize("form", ["entropy", "max_prob"])
def test_certainty_one_hot_is_one_and_uniform_is_zero(form):
    peaked = torch.zeros(99)
    peaked[5] = 100.0
    assert certainty(peaked, form).item() == 1.0
    assert certainty(torch.zeros(99), form).item() == 0.0
    # constant logits other than zero are uniform too (up to fp32 rounding)
    assert certainty(torch.full((99,), 3.7), form).item() == pytest.approx(0.0, abs=1e-6)
    # masked-out tokens (-inf) carry no probability and produce no NaN
    masked = torch.tensor([0.0, -math.inf, -math.inf])
    assert certainty(masked, form).item() == 1.0


def test_certainty_matches_hand_computation():
    logits = torch.tensor([2.0, 1.0, 0.0])
    # paper: p = softmax(ℓ), Ĵ = (log 3 − H(p)) / log 3
    z = [math.exp(v) for v in (2.0, 1.0, 0.0)]
    p = [v / sum(z) for v in z]
    entropy = -sum(q * math.log(q) for q in p)
    expected_entropy = (math.log(3) - entropy) / math.log(3)
    assert certainty(logits, "entropy").item() == pytest.approx(expected_entropy, rel=1e-6)
    # released code: p = softmax(ℓ / 4), Ĵ = 1 + log max p / log 3
    z4 = [math.exp(v / 4) for v in (2.0, 1.0, 0.0)]
    expected_max = 1 + math.log(z4[0] / sum(z4)) / math.log(3)
    assert certainty(logits, "max_prob").item() == pytest.approx(expected_max, rel=1e-6)
    # an explicit temperature overrides the form's default
    z1 = [math.exp(v) for v in (2.0, 1.0, 0.0)]
    expected_t1 = 1 + math.log(z1[0] / sum(z1)) / math.log(3)
    assert certainty(logits, "max_prob", temperature=1.0).item() == pytest.approx(expected_t1)


def test_certainty_shape_range_dtype_and_errors():
    logits = torch.randn(2, 5, 11, dtype=torch.float64) * 3
    for form in ("entropy", "max_prob"):
        c = certainty(logits, form)
        assert c.shape == (2, 5) and c.dtype == torch.float32
        assert torch.all((c >= 0) & (c <= 1))
    # sharper distributions are more certain
    assert certainty(logits * 10, "entropy").mean() > certainty(logits, "entropy").mean()
    with pytest.raises(ValueError, match="unknown certainty form"):
        certainty(logits, "gini")
    with pytest.raises(ValueError, match="temperature"):
        certainty(logits, "max_prob", temperature=0.0)


# ----------------------------------------------------------------------------- accuracy


def test_max_completion_tokens_covers_every_problem():
    rng = __import__("random").Random(0)
    for d in (1, 3, 5):
        budget = max_completion_tokens(d)
        for _ in range(200):
            p = evaluate.varying_length_problem(rng, d)
            assert len(p.target) + 1 <= budget  # + EOS
            p = evaluate.equal_length_problem(rng, d)
            assert len(p.target) + 1 <= budget


def test_addition_accuracy_structure_on_random_model(tokenizer, tiny_model):
    result = addition_accuracy(
        tiny_model, tokenizer, digits=range(1, 3), n=3, batch_size=2, max_new_tokens=8
    )
    assert result["temperature"] == 0.0 and result["n"] == 3
    for kind in ("identical", "varying"):
        assert set(result[kind]) == {"1", "2"}
        for cell in result[kind].values():
            assert 0.0 <= cell["ci_low"] <= cell["accuracy"] <= cell["ci_high"] <= 1.0
            assert cell["n"] == 3
    json.dumps(result)  # JSON-serialisable
    assert tiny_model.training is False


def test_addition_accuracy_sampled_is_seeded(tokenizer, tiny_model):
    kwargs = dict(digits=[2], n=3, temperature=1.0, seed=5, max_new_tokens=10)
    first = addition_accuracy(tiny_model, tokenizer, **kwargs)
    assert first == addition_accuracy(tiny_model, tokenizer, **kwargs)
    assert first["temperature"] == 1.0


def test_addition_accuracy_oracle_is_perfect_and_problems_are_fixed(tokenizer, monkeypatch):
    seen: list[str] = []

    def recording_sample(model, tokenizer, prompts, **kwargs):
        seen.extend(prompts)
        return oracle_sample(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(evaluate, "sample", recording_sample)
    stub = OracleStub(tokenizer, max_digits=3)
    result = addition_accuracy(stub, tokenizer, digits=[2, 3], n=5, batch_size=2)
    for kind in ("identical", "varying"):
        for cell in result[kind].values():
            assert (cell["accuracy"], cell["ci_low"], cell["ci_high"]) == (1.0, 1.0, 1.0)
            assert cell["unfinished"] == 0
    # the problems at a length do not depend on which other lengths are evaluated
    with_2_and_3 = list(seen)
    seen.clear()
    addition_accuracy(stub, tokenizer, digits=[3], n=5)
    # order is kind-major, length-minor: identical 2, identical 3, varying 2, varying 3
    assert seen == with_2_and_3[5:10] + with_2_and_3[15:20]
    assert all(max(map(len, PROMPT_RE.search(p).groups())) == 3 for p in seen)


def test_accuracy_table_layout():
    result = {
        "temperature": 0.0,
        "n": 1000,
        "identical": {
            "8": {"accuracy": 0.488, "ci_low": 0.457, "ci_high": 0.519, "n": 1000},
            "10": {"accuracy": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 1000},
            "7": {"accuracy": 0.989, "ci_low": 0.978, "ci_high": 0.996, "n": 1000},
        },
        "varying": {"7": {"accuracy": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 1000}},
    }
    assert accuracy_table(result) == (
        "| operands | 7 digits | 8 digits | 10 digits |\n"
        "|---|---|---|---|\n"
        "| identical | 98.9 [97.8, 99.6] | 48.8 [45.7, 51.9] | 0.0 [0.0, 0.0] |\n"
        "| varying | 100.0 [100.0, 100.0] | – | – |\n"
    )


# ----------------------------------------------------------------------------- Table 1


def _expected_delta(form, vocab, weak=1.0):
    row = torch.zeros(vocab)
    row[7] = weak
    return certainty(row, form).item() - 1.0


def test_score_critical_certainty_on_reference_completions(tokenizer):
    max_digits = 3
    problems = [Problem(1234, 56), Problem(4321, 9876), Problem(57, 8080)]
    stub = OracleStub(tokenizer, max_digits)
    result = score_critical_certainty(
        stub, tokenizer, problems, [p.target for p in problems], max_digits, batch_size=2
    )
    n_crit = sum(len(critical_positions(p, max_digits)) for p in problems)
    assert result["n"] == 3 and result["accuracy"] == 1.0
    # per scratchpad line 1-3, two characters per operand of N+1 digits: 1234 (3 lines × 2),
    # 4321 and 9876 (3 × 4), 8080 (3 × 2)
    assert result["n_critical"] == result["n_critical_usable"] == n_crit == 6 + 12 + 6
    for form in ("entropy", "max_prob"):
        stats = result["forms"][form]
        assert stats["n_prompts"] == 3
        assert stats["certainty_other"] == pytest.approx(1.0, abs=1e-6)
        assert stats["delta_mean"] == pytest.approx(_expected_delta(form, len(tokenizer)), abs=1e-6)
        assert stats["delta_std"] == pytest.approx(0.0, abs=1e-6)
        assert stats["delta_ci_low"] <= stats["delta_mean"] <= stats["delta_ci_high"]
        # control: other − all > 0 but small (a few critical tokens among ~100)
        assert 0 < stats["control_mean"] < 0.05
    json.dumps(result)


def test_score_critical_certainty_uses_only_positions_with_matching_prefix(tokenizer):
    max_digits = 3
    problem = Problem(1234, 56)
    first, second = critical_positions(problem, max_digits)[:2]  # line 1's comma and digit
    target = problem.target
    diverged = target[:first] + "]" + target[first + 1 :]  # wrong at the first critical token
    short = target[:first]  # stops before any critical position
    stub = OracleStub(tokenizer, max_digits)
    result = score_critical_certainty(
        stub, tokenizer, [problem] * 3, [target, diverged, short], max_digits, add_eos=False
    )
    # 6 critical positions a completion (2 on each of lines 1-3). reference: all 6;
    # diverged: only the first (its prefix still matches); short: none
    assert result["n_critical"] == 3 * 6
    assert result["n_critical_usable"] == 6 + 1
    assert result["forms"]["entropy"]["n_prompts"] == 2
    # accuracy judges only the answer line, which the diverged completion still has right
    assert result["accuracy"] == pytest.approx(2 / 3)


def test_critical_certainty_end_to_end_with_oracle(tokenizer, monkeypatch):
    monkeypatch.setattr(evaluate, "sample", oracle_sample)
    result = critical_certainty(
        OracleStub(tokenizer, 3), tokenizer, max_digits=3, n=6, batch_size=4
    )
    assert result["temperature"] == 0.0 and result["max_digits"] == 3
    assert result["accuracy"] == 1.0
    assert result["n_critical_usable"] == result["n_critical"] > 0
    for form in ("entropy", "max_prob"):
        stats = result["forms"][form]
        assert stats["n_prompts"] == 6
        assert stats["delta_mean"] == pytest.approx(_expected_delta(form, len(tokenizer)), abs=1e-6)


def test_certainty_table(tokenizer, monkeypatch):
    monkeypatch.setattr(evaluate, "sample", oracle_sample)
    result = critical_certainty(OracleStub(tokenizer, 3), tokenizer, max_digits=3, n=4)
    delta = _expected_delta("entropy", len(tokenizer))
    table = certainty_table([result, result])
    lines = table.splitlines()
    assert len(lines) == 2 + 2 * 2  # header, rule, 2 results x 2 forms
    assert lines[2].startswith(f"| 3 | entropy (T=1) | {delta:+.3f} | 0.000 | ")
    assert lines[3].startswith("| 3 | max_prob (T=4) | ")
    assert lines[2].endswith(f" | 4/4 | {result['n_critical']}/{result['n_critical']} |")
    empty = {**result, "forms": {"entropy": {"n_prompts": 0, **dict.fromkeys(FIGURE_KEYS)}}}
    assert "| – | – | – | – |" in certainty_table(empty)


def test_critical_certainty_runs_on_random_model(tokenizer, tiny_model):
    result = critical_certainty(tiny_model, tokenizer, max_digits=2, n=2, max_new_tokens=8)
    assert result["n"] == 2 and 0.0 <= result["accuracy"] <= 1.0
    # a random model never copies the scratchpad far enough to reach a critical token
    assert result["n_critical_usable"] <= result["n_critical"]
    assert set(result["forms"]) == {"entropy", "max_prob"}
    for stats in result["forms"].values():
        assert set(stats) == {"n_prompts", *FIGURE_KEYS}
    json.dumps(result, allow_nan=False)
