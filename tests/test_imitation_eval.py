"""IQLearn evaluation: the temperature sweep, reward/score correlation, plots and seed tables."""

import math
import random
from dataclasses import dataclass

import pytest
import torch

from tether.batches import TokenBatch, collate_pairs
from tether.eval.imitation import (
    SEED_METRICS,
    SWEEP_KEYS,
    diversity_sweep,
    format_token_rewards,
    per_token_rewards,
    plot_reward_vs_score,
    plot_score_vs_diversity,
    reward_correlation,
    seeds_summary,
    seeds_table,
)
from tether.generation.sampler import sample
from tether.models.loading import build_model, char_tokenizer
from tether.rewards.implicit import model_returns
from tether.tasks import get_task
from tether.tasks.prompts import PromptFormat

BUDGET = 12  # new tokens per sample: short, so the file stays fast


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = char_tokenizer()
    model = build_model(tok, "llama", 1, 2, 32, 256)
    model.eval()
    task = get_task("multistep", 2)
    rng = random.Random(0)
    problems = [task.rl_problem(rng) for _ in range(4)]
    return tok, model, task, problems


@dataclass
class ScoredBy:
    """The multistep task with its graded score replaced by ``fn(completion)``."""

    base: object
    fn: object
    prompt_format: PromptFormat = PromptFormat()

    def is_correct(self, problem, completion):
        return self.base.is_correct(problem, completion)

    def score(self, problem, completion):
        return self.fn(completion)

    def max_new_tokens(self):
        return self.base.max_new_tokens()


def _row(prompt_ids, completion_ids):
    """One unpadded training row: prompt then completion."""
    ids = torch.tensor([prompt_ids + completion_ids])
    loss = torch.zeros_like(ids, dtype=torch.float32)
    loss[0, len(prompt_ids) :] = 1.0
    return TokenBatch(ids, torch.ones_like(ids), loss)


def _samples(tok, model, problems, k, temperature, seed):
    """What the evaluation functions sample: each prompt k times in a row, seeded generator."""
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    prompts = [p.prompt for p in problems for _ in range(k)]
    out = sample(model, tok, prompts, max_new_tokens=BUDGET, temperature=temperature, generator=gen)
    rows = []
    for i in range(len(prompts)):
        p = out.prompt_ids[i][out.prompt_mask[i].bool()].tolist()
        c = out.completion_ids[i][out.completion_mask[i].bool()].tolist()
        rows.append((p, c))
    return out, rows


# ----------------------------------------------------------------------------- sweep


def test_sweep_rows_keys_and_ranges(setup):
    tok, model, task, problems = setup
    rows = diversity_sweep(
        model, tok, task, problems, temperatures=[0.0, 2.0], k=3, seed=1, max_new_tokens=BUDGET
    )
    assert [r["temperature"] for r in rows] == [0.0, 2.0]
    vocab_entropy = math.log(len(tok))
    for r in rows:
        assert tuple(r) == SWEEP_KEYS
        assert 0.0 <= r["accuracy_ci_low"] <= r["accuracy"] <= r["accuracy_ci_high"] <= 1.0
        assert 0.0 <= r["score"] <= 1.0
        assert 0.0 <= r["self_bleu"] <= 100.0
        assert 0.0 <= r["distinct_1"] <= 1.0 and 0.0 <= r["distinct_2"] <= 1.0
        assert 0.0 < r["entropy"] <= vocab_entropy + 1e-4
        assert 0 < r["mean_length"] <= BUDGET
        assert 0 <= r["unfinished"] <= 12
        assert r["n_prompts"] == 4 and r["k"] == 3
    greedy, hot = rows
    # greedy: the k samples of a prompt are identical
    assert greedy["self_bleu"] == pytest.approx(100.0)
    assert hot["self_bleu"] < greedy["self_bleu"]
    assert hot["distinct_2"] > greedy["distinct_2"]
    # a random model is close to uniform: its entropy is close to log |V|
    assert hot["entropy"] > 0.9 * vocab_entropy


def test_sweep_row_independent_of_other_temperatures(setup):
    tok, model, task, problems = setup
    kw = dict(k=2, seed=3, max_new_tokens=BUDGET)
    both = diversity_sweep(model, tok, task, problems, temperatures=[0.0, 1.0], **kw)
    alone = diversity_sweep(model, tok, task, problems, temperatures=[1.0], **kw)
    assert alone[0] == both[1]


def test_sweep_entropy_is_teacher_forced_at_temperature_one(setup):
    tok, model, task, problems = setup
    kw = dict(temperatures=[0.0], k=2, seed=0, max_new_tokens=BUDGET)
    chunked = diversity_sweep(model, tok, task, problems, batch_size=3, **kw)[0]
    whole = diversity_sweep(model, tok, task, problems, **kw)[0]
    _, rows = _samples(tok, model, problems, 2, 0.0, 0)
    total, count = 0.0, 0
    with torch.no_grad():
        for p, c in rows:
            logits = model(torch.tensor([p + c])).logits[0].double()
            logp = torch.log_softmax(logits[len(p) - 1 : len(p) + len(c) - 1], -1)
            total += float(-(logp.exp() * logp).sum())
            count += len(c)
    assert whole["entropy"] == pytest.approx(total / count, rel=1e-5)
    assert chunked["entropy"] == pytest.approx(whole["entropy"], rel=1e-5)


def test_sweep_rejects_bad_arguments(setup):
    tok, model, task, problems = setup
    with pytest.raises(ValueError, match="k must be >= 2"):
        diversity_sweep(model, tok, task, problems, temperatures=[1.0], k=1, seed=0)
    with pytest.raises(ValueError, match="temperatures"):
        diversity_sweep(model, tok, task, problems, temperatures=[-1.0], k=2, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        diversity_sweep(model, tok, task, problems, temperatures=[], k=2, seed=0)
    with pytest.raises(ValueError, match="problem"):
        diversity_sweep(model, tok, task, [], temperatures=[1.0], k=2, seed=0)


# ----------------------------------------------------------------------------- rewards


def test_reward_correlation_matches_model_returns(setup):
    tok, model, task, problems = setup
    res = reward_correlation(
        model, tok, task, problems, k=3, temperature=1.0, seed=5, gamma=0.9, max_new_tokens=BUDGET
    )
    n = 12
    assert res["n"] == n and res["n_prompts"] == 4 and res["k"] == 3
    for key in ("returns", "scores", "completions", "finished", "prompt_index"):
        assert len(res[key]) == n
    assert res["prompt_index"] == [i for i in range(4) for _ in range(3)]
    assert all(0.0 <= s <= 1.0 for s in res["scores"])
    assert math.isnan(res["spearman_rho"]) or -1.0 <= res["spearman_rho"] <= 1.0
    assert res["mean_return"] == pytest.approx(sum(res["returns"]) / n)
    assert res["mean_score"] == pytest.approx(sum(res["scores"]) / n)

    # the same draws, each row scored alone (no padding) by model_returns
    out, rows = _samples(tok, model, problems, 3, 1.0, 5)
    assert out.texts == res["completions"] and out.finished == res["finished"]
    for i in range(n):
        p, c = rows[i]
        alone = model_returns(model, _row(p, c), torch.tensor([out.finished[i]]), gamma=0.9)
        assert res["returns"][i] == pytest.approx(float(alone[0]), abs=1e-4)


def test_per_token_rewards_sum_to_the_return(setup):
    tok, model, task, problems = setup
    prompt, completion = problems[0].prompt, problems[0].target
    for add_eos in (True, False):
        pairs = per_token_rewards(model, tok, prompt, completion, PromptFormat(), add_eos=add_eos)
        assert [t for t, _ in pairs] == list(completion) + (["<eos>"] if add_eos else [])
        batch = collate_pairs(tok, [prompt], [completion], add_eos=add_eos)
        ret = model_returns(model, batch, torch.tensor([add_eos]))
        assert sum(r for _, r in pairs) == pytest.approx(float(ret[0]), abs=1e-4)
    line = format_token_rewards(per_token_rewards(model, tok, "Sum 1 2:", "1 2\n", PromptFormat()))
    assert line.startswith("1[") and "' '[" in line and "'\\n'[" in line and "<eos>[" in line


def test_reward_correlation_constant_score_is_nan(setup):
    tok, model, task, problems = setup
    flat = ScoredBy(task, lambda completion: 0.5)
    res = reward_correlation(
        model, tok, flat, problems, k=2, temperature=1.0, seed=0, max_new_tokens=BUDGET
    )
    assert math.isnan(res["spearman_rho"]) and math.isnan(res["p_value"])
    assert math.isnan(res["spearman_rho_within"])
    assert res["mean_score"] == 0.5


def test_reward_correlation_invariant_to_problem_order(setup):
    tok, model, task, problems = setup
    kw = dict(k=2, temperature=0.0, seed=0, max_new_tokens=BUDGET)  # greedy: draws don't move
    fwd = reward_correlation(model, tok, task, problems, **kw)
    rev = reward_correlation(model, tok, task, problems[::-1], **kw)

    def per_problem(res, probs):
        cols = zip(
            res["prompt_index"], res["returns"], res["scores"], res["completions"], strict=True
        )
        out = {}
        for i, r, s, t in cols:
            out.setdefault(probs[i].prompt, []).append((r, s, t))
        return out

    a, b = per_problem(fwd, problems), per_problem(rev, problems[::-1])
    assert a.keys() == b.keys()
    for prompt, samples in a.items():
        for (r0, s0, t0), (r1, s1, t1) in zip(samples, b[prompt], strict=True):
            assert (s0, t0) == (s1, t1) and r0 == pytest.approx(r1, abs=1e-4)
    for key in ("spearman_rho", "mean_return", "mean_score"):
        a, b = fwd[key], rev[key]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6)


def test_reward_correlation_planted():
    """A near-uniform model with a large EOS logit: every non-EOS token costs about
    log |V| of return, so the return falls with the completion's length. With a score that also
    falls with length (shorter = better), the rank correlation must be strongly positive."""
    torch.manual_seed(1)
    tok = char_tokenizer()
    model = build_model(tok, "llama", 1, 2, 32, 256)
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 3.5  # p(EOS) ~ 0.25 per step: lengths spread over 0..BUDGET
    bias[tok.pad_token_id] = bias[tok.unk_token_id] = -30.0  # every token shows in the text
    model.lm_head.bias = torch.nn.Parameter(bias)
    model.eval()
    task = ScoredBy(get_task("multistep", 2), lambda completion: 1.0 / (1.0 + len(completion)))
    problems = [task.base.rl_problem(random.Random(i)) for i in range(4)]
    res = reward_correlation(
        model, tok, task, problems, k=8, temperature=1.0, seed=0, max_new_tokens=BUDGET
    )
    assert len(set(res["scores"])) >= 4  # lengths do vary
    assert res["spearman_rho"] > 0.9 and res["p_value"] < 1e-6
    assert res["spearman_rho_within"] > 0.8
    # the opposite score reverses the sign
    longer = ScoredBy(task.base, lambda completion: len(completion) / BUDGET)
    res2 = reward_correlation(
        model, tok, longer, problems, k=8, temperature=1.0, seed=0, max_new_tokens=BUDGET
    )
    assert res2["spearman_rho"] == pytest.approx(-res["spearman_rho"])


# ----------------------------------------------------------------------------- seeds, plots


def _fake_rows(acc, bleu):
    return [
        {"temperature": t, "accuracy": a, "score": a, "self_bleu": b, "distinct_1": 0.5,
         "distinct_2": 0.6, "entropy": 1.0}
        for t, a, b in zip((0.0, 1.0), acc, bleu, strict=True)
    ]  # fmt: skip


def test_seeds_summary_and_table():
    by_method = {
        "mle": [_fake_rows((0.5, 0.4), (90.0, 60.0)), _fake_rows((0.7, 0.6), (80.0, 50.0))],
        "iqlearn": [_fake_rows((0.6, 0.5), (70.0, 40.0))],
    }
    summary = seeds_summary(by_method)
    mle0 = summary["mle"][0]
    assert mle0["temperature"] == 0.0 and mle0["n_seeds"] == 2
    assert mle0["accuracy"] == pytest.approx(0.6) and mle0["self_bleu"] == pytest.approx(85.0)
    assert mle0["accuracy_ci_low"] < 0.6 < mle0["accuracy_ci_high"]
    assert all(f"{k}_ci_low" in mle0 for k in SEED_METRICS)
    one = summary["iqlearn"][1]
    assert one["n_seeds"] == 1 and one["accuracy_ci_low"] == one["accuracy_ci_high"] == 0.5

    table = seeds_table(by_method)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 4
    # 0.5 and 0.7 over two seeds: the t-interval (0.6 ± 1.27) is cut to [0, 1]; Self-BLEU's
    # (85 ± 63.5) to [21.5, 100]; distinct-2, the same on both seeds, reads as mean ± 0
    assert any(line.startswith("| mle | 0 | 2 | 0.600 [0.000, 1.000] |") for line in lines)
    assert any("| 85.0 [21.5, 100.0] | 0.600 ± 0.000 |" in line for line in lines)
    assert "| iqlearn | 1 | 1 | 0.500 | 0.500 | 40.0 |" in table
    assert "mle" in table and "iqlearn" in table


def test_plots_write_pngs(setup, tmp_path):
    tok, model, task, problems = setup
    rows = diversity_sweep(
        model, tok, task, problems[:3], temperatures=[0.0, 1.0], k=2, seed=0, max_new_tokens=8
    )
    summary = seeds_summary(
        {"b": [_fake_rows((0.5, 0.4), (90, 60)), _fake_rows((0.6, 0.3), (85, 50))]}
    )
    png = plot_score_vs_diversity({"a": rows, "b": summary["b"]}, tmp_path / "sub" / "div.png")
    assert png.is_file() and png.stat().st_size > 1000
    png = plot_score_vs_diversity({"a": rows}, tmp_path / "score.png", metric="score")
    assert png.stat().st_size > 1000

    res = reward_correlation(
        model, tok, task, problems[:3], k=2, temperature=1.0, seed=0, max_new_tokens=8
    )
    flat = dict(res, scores=[0.5] * res["n"], spearman_rho=math.nan)
    png = plot_reward_vs_score({"a": res, "flat": flat}, tmp_path / "reward.png")
    assert png.is_file() and png.stat().st_size > 1000
    with pytest.raises(ValueError):
        plot_reward_vs_score({}, tmp_path / "none.png")


def test_seeds_intervals_stay_in_each_figures_range():
    """Two seeds at 0.9 and 1.0 accuracy: the t-interval (0.95 ± 0.635) is cut to [0, 1], and
    the table shows the cut interval as [low, high] instead of a symmetric ± that reads 1.585."""
    by_method = {"mle": [_fake_rows((0.9, 0.5), (5.0, 1.0)), _fake_rows((1.0, 0.5), (1.0, 0.0))]}
    row = seeds_summary(by_method)["mle"][0]
    half = 12.7062047361747 * (0.1 / math.sqrt(2)) / math.sqrt(2)  # t(0.975, 1)·sd/√n
    assert row["accuracy_ci_high"] == 1.0
    assert row["accuracy_ci_low"] == pytest.approx(0.95 - half)
    assert row["self_bleu_ci_low"] == 0.0  # Self-BLEU's range starts at 0
    assert "| mle | 0 | 2 | 0.950 [0.315, 1.000] |" in seeds_table(by_method)
