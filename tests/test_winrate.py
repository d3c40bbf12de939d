"""`tether winrate`: InfAlign's inference-time win rate, its aggregation, KL and CLI."""

import itertools
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from tether.cli import app
from tether.distributions.infalign import pick_of_n, win_scores
from tether.eval.winrate import (
    across_prompts,
    check_ns,
    evaluate_winrate,
    plot_winrate,
    win_rate_curve,
)
from tether.models.loading import load_model_and_tokenizer
from tether.rewards.functions import GradedReward, PythonReward
from tether.tasks import get_task

torch.set_num_threads(1)
runner = CliRunner()

# a reward with many distinct values, so that "exactly ½" is not just a pile of ties
REWARD_MODULE = """
def spread(prompt, completion):
    return sum(ord(c) * (i + 1) for i, c in enumerate(completion)) % 997 + 0.001 * len(completion)
"""


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "my_reward.py"
    path.write_text(REWARD_MODULE)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model_and_tokenizer(str(tiny_checkpoint))


# ----------------------------------------------------------------------------- aggregation


def _brute_force(policy_row, ref_row, n, mode):
    """Every N-tuple (with replacement) of the policy's samples against every N-tuple of the
    reference's, decoded by max/min, ties ½: the plug-in win rate by enumeration."""
    pick = max if mode == "best" else min
    total, count = 0.0, 0
    for a in itertools.product(policy_row, repeat=n):
        for b in itertools.product(ref_row, repeat=n):
            x, y = pick(a), pick(b)
            total += 1.0 if x > y else 0.5 if x == y else 0.0
            count += 1
    return total / count


@pytest.mark.parametrize("mode", ["best", "worst"])
def test_curve_matches_enumeration_and_hand_computed_games(mode):
    policy = torch.tensor([[3.0, 1.0, 2.0, 2.0], [0.0, 5.0, 1.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    ref = torch.tensor([[2.0, 2.0, 0.0, 4.0], [1.0, 1.0, 3.0, 0.0], [1.0, 0.0, 2.0, 1.0]])
    points = win_rate_curve(policy, ref, [3, 1, 2, 2], mode)
    assert [p.n for p in points] == [1, 2, 3]
    for p in points:
        per_prompt = torch.tensor(
            [_brute_force(policy[i].tolist(), ref[i].tolist(), p.n, mode) for i in range(3)],
            dtype=torch.float64,
        )
        assert p.cdf.mean == pytest.approx(float(per_prompt.mean()), abs=1e-12)
        assert p.cdf.stderr == pytest.approx(float(per_prompt.std() / 3**0.5), abs=1e-12)

    # N = 2 by hand: games (samples 0,1) and (2,3) of each prompt
    pick = max if mode == "best" else min
    scores = []
    for i in range(3):
        for g in range(2):
            x = pick(policy[i, 2 * g : 2 * g + 2].tolist())
            y = pick(ref[i, 2 * g : 2 * g + 2].tolist())
            scores.append(1.0 if x > y else 0.5 if x == y else 0.0)
    two = points[1].mc
    assert two.games == 6
    assert two.rate == pytest.approx(sum(scores) / 6, abs=1e-12)
    per_prompt = torch.tensor(scores, dtype=torch.float64).reshape(3, 2).mean(1)
    assert two.stderr == pytest.approx(float(per_prompt.std() / 3**0.5), abs=1e-12)
    # N = 3: one game per prompt from samples 0..2, the 4th sits out
    three = points[2].mc
    assert three.games == 3
    assert three.rate == pytest.approx(
        float(win_scores(pick_of_n(policy[:, :3], mode), pick_of_n(ref[:, :3], mode)).mean()),
        abs=1e-12,
    )


def test_hand_computed_numbers():
    # one prompt is not enough for an error bar, so two; prompt 2 mirrors prompt 1
    policy = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    ref = torch.tensor([[2.0, 2.0], [1.0, 1.0]])
    one, two = win_rate_curve(policy, ref, [1, 2], "best")
    # prompt 1: each policy sample beats/loses to 2 → ½; prompt 2: policy always loses → 0
    assert one.cdf.mean == pytest.approx(0.25)
    assert one.cdf.stderr == pytest.approx(0.25)  # sd of (½, 0) = √(1/8), /√2
    # best-of-2 from the CDFs, prompt 1: the max of two draws from {1, 3} is 3 w.p. ¾
    # and beats 2; prompt 2: 0
    assert two.cdf.mean == pytest.approx(0.375)
    # Monte Carlo: one game per prompt, max(1, 3) = 3 > 2 wins, max(0, 0) < 1 loses
    assert (two.mc.rate, two.mc.games) == (0.5, 2)
    # worst-of-2, prompt 1: min of two draws from {1, 3} is 3 w.p. ¼
    worst = win_rate_curve(policy, ref, [2], "worst")[0]
    assert worst.cdf.mean == pytest.approx(0.125)
    assert across_prompts(torch.tensor([0.5, 0.0])).mean == 0.25


def test_monte_carlo_is_skipped_when_n_exceeds_the_samples():
    r = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    (point,) = win_rate_curve(r, r.flip(1), [8], "best")
    assert point.mc is None and 0 <= point.cdf.mean <= 1


@pytest.mark.parametrize("bad", [[0], [2, -1], [1.5], []])
def test_bad_ns_are_refused(bad):
    with pytest.raises(ValueError):
        check_ns(bad)


# ----------------------------------------------------------------------------- evaluation


def test_identical_models_give_exactly_one_half_and_zero_kl(tiny, reward_file):
    """The same model on both sides with common random numbers: the two sides' samples are
    identical, so every decoded game is a tie and every CDF comparison is symmetric. A biased
    estimator, or a KL that scored the wrong samples, would not come out exact."""
    model, tok = tiny
    task = get_task("addition", 2)
    reward = PythonReward(f"{reward_file}:spread")
    report = evaluate_winrate(
        model, model, tok, task, reward, ns=(1, 2, 4), prompts=3, samples=8,
        max_new_tokens=24, coupled=True, seed=5,
    )  # fmt: skip
    assert torch.equal(report.policy_rewards, report.reference_rewards)
    assert len(report.policy_rewards.unique()) > 10  # real spread, not ties
    for p in report.points:
        assert p.cdf.mean == pytest.approx(0.5, abs=1e-12)
        assert (p.mc.rate, p.mc.stderr) == (0.5, 0.0)
    assert report.kl.mean == 0.0 and report.kl.stderr == 0.0
    assert report.standard.mean == pytest.approx(0.5, abs=1e-12)
    assert report.reward_policy == report.reward_reference
    assert not model.training  # it was in eval mode and stays so


def test_independent_samples_of_one_model_are_near_one_half(tiny, reward_file):
    model, tok = tiny
    model.train()  # evaluate_winrate switches to eval mode and restores the mode after
    task = get_task("addition", 2)
    report = evaluate_winrate(
        model, model, tok, task, PythonReward(f"{reward_file}:spread"), ns=(1, 2),
        prompts=4, samples=16, max_new_tokens=16,
    )  # fmt: skip
    assert model.training
    model.eval()
    assert not torch.equal(report.policy_rewards, report.reference_rewards)
    for p in report.points:
        assert abs(p.cdf.mean - 0.5) < 4 * p.cdf.stderr + 1e-9
    assert report.kl.mean == 0.0  # KL scores the policy's samples under two copies of itself


def test_trained_model_beats_a_random_one(tiny_checkpoint):
    """A planted advantage: addition-n3 (trained) against a random 1-layer model, judged by
    the graded answer score. The random model scores ~0, so the trained one wins, and more so
    the more samples best-of-N may choose from; worst-of-N still wins (its minimum is ≥ 0)."""
    policy, tok = load_model_and_tokenizer("addition-n3")
    reference, _ = load_model_and_tokenizer(str(tiny_checkpoint))
    task = get_task("addition", 3)
    best = evaluate_winrate(
        policy, reference, tok, task, GradedReward(task), ns=(1, 2, 4), prompts=6,
        samples=12, seed=1,
    )  # fmt: skip
    rates = [p.cdf.mean for p in best.points]
    assert all(r > 0.5 for r in rates)
    assert rates[0] < rates[1] < rates[2]
    for p in best.points:  # the two estimators agree within 4 combined standard errors
        assert abs(p.cdf.mean - p.mc.rate) < 4 * (p.cdf.stderr**2 + p.mc.stderr**2) ** 0.5 + 1e-9
    assert best.reward_policy.mean > best.reward_reference.mean
    assert best.accuracy_policy.mean > best.accuracy_reference.mean == 0.0
    assert best.kl.mean > 100  # a trained model is far from a random one

    worst = win_rate_curve(best.policy_rewards, best.reference_rewards, (1, 2, 4), "worst")
    assert all(p.cdf.mean > 0.5 for p in worst)
    assert worst[0].cdf.mean == pytest.approx(rates[0])  # N = 1 is the same game


def test_plot_writes_a_png(tmp_path, tiny, reward_file):
    model, tok = tiny
    report = evaluate_winrate(
        model, model, tok, get_task("first-digit", 1), PythonReward(f"{reward_file}:spread"),
        ns=(1, 2), prompts=2, samples=4,
    )  # fmt: skip
    report.label = "tiny"
    out = plot_winrate([report, report], tmp_path / "sub" / "w.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    # a name without a suffix: matplotlib writes NAME.png, and that is the path returned
    bare = plot_winrate(report, tmp_path / "bare")
    assert bare == tmp_path / "bare.png" and bare.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def trained_like(tiny_checkpoint, reward_file, tmp_path_factory):
    """A copy of the tiny model with the tether.json a trained policy carries: its init (the
    reference), task and reward section."""
    d = tmp_path_factory.mktemp("policy") / "model"
    shutil.copytree(tiny_checkpoint, d)
    meta = {
        "task": {"name": "first-digit", "max_digits": 3},
        "init": str(tiny_checkpoint),
        "reward": {"kind": "python", "function": f"{reward_file}:spread", "calibrate": True},
    }
    (d / "tether.json").write_text(json.dumps(meta))
    return d


def test_cli_json_and_plot_take_defaults_from_the_checkpoint(
    trained_like, tiny_checkpoint, tmp_path
):
    plot = tmp_path / "winrate.png"
    args = ["winrate", str(trained_like), "--prompts", "4", "--samples", "4", "--n", "2,1"]
    result = runner.invoke(app, [*args, "--json", "--plot", str(plot), "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["reference"] == str(tiny_checkpoint)
    assert report["task"]["name"] == "first-digit"
    assert report["reward"]["kind"] == "python" and report["reward"]["model"] is None
    assert report["reward"]["function"].endswith("my_reward.py:spread")
    assert [p["n"] for p in report["win_rate"]] == [1, 2]
    assert [p["mc"]["games"] for p in report["win_rate"]] == [16, 8]
    assert report["prompts"] == 4 and report["samples"] == 4 and report["mode"] == "best"
    assert 0 <= report["win_rate"][0]["cdf"]["rate"] <= 1
    assert report["kl"]["mean"] == 0.0  # the policy is a copy of its init
    assert plot.read_bytes()[:4] == b"\x89PNG" and report["plot"] == str(plot)


def test_cli_table_with_overrides(trained_like):
    args = ["winrate", str(trained_like), "--prompts", "2", "--samples", "2", "--n", "1,4"]
    result = runner.invoke(app, [*args, "--mode", "worst", "--reward", "checker", "--threads", "1"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "worst-of-N" in out and "reward checker" in out
    assert "KL(policy || reference)" in out and "accuracy" in out
    row4 = next(line for line in out.splitlines() if line.strip("│ ").startswith("4 "))
    assert "-" in row4  # 2 samples: no Monte-Carlo game of 4


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--n", "0"], "--n '0'"),
        (["--n", "1,a"], "--n '1,a'"),
        (["--mode", "middle"], "--mode 'middle'"),
        (["--temperature", "0"], "--temperature"),
        (["--reward", "model"], "--reward-model"),
        (["--reward", "graded", "--reward-function", "x.py:f"], "--reward python"),
        (["--reward-function", "missing.py:f"], "no such file"),
        (["--task", "nope"], "--task 'nope'"),
    ],
)
def test_cli_bad_options_are_one_line_errors(extra, needle, trained_like):
    result = runner.invoke(app, ["winrate", str(trained_like), *extra])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_cli_without_a_reference_says_to_pass_one(tiny_checkpoint):
    result = runner.invoke(app, ["winrate", str(tiny_checkpoint), "--prompts", "2"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "pass --reference" in result.stderr
    assert result.stderr.count("\n") == 1


def test_cli_recorded_reference_that_is_gone(trained_like, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(trained_like, d)
    meta = json.loads((d / "tether.json").read_text())
    (d / "tether.json").write_text(json.dumps({**meta, "init": str(tmp_path / "gone")}))
    result = runner.invoke(app, ["winrate", str(d)])
    assert result.exit_code == 2 and "pass --reference" in result.stderr


def test_cli_reference_must_share_the_tokenizer(trained_like, tmp_path):
    other = tmp_path / "other"
    model, tok = load_model_and_tokenizer(str(trained_like))
    tok.add_tokens(["<extra>"])
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(other)
    tok.save_pretrained(other)
    result = runner.invoke(app, ["winrate", str(trained_like), "--reference", str(other)])
    assert result.exit_code == 2 and "different tokenizer" in result.stderr
