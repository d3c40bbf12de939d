"""`tether study ctrl` and `tether study xpo` end to end at toy sizes (every arm trains a step or
two and is evaluated), and the matched-KL interpolation by hand."""

import json

import pytest
from typer.testing import CliRunner

from tether.cli import app
from tether.studies.preferences import CTRL_ARMS, matched_kl

TINY_RL = [
    "rl.prompt_pool=2",
    "rl.prompts_per_step=2",
    "rl.group_size=2",
    "rl.max_new_tokens=48",
    "reward.reference_samples=2",
    "eval.n=2",
    "train.threads=1",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _sets(overrides):
    return [a for kv in overrides for a in ("--set", kv)]


def test_study_ctrl_end_to_end(tmp_path):
    out = tmp_path / "ctrl"
    args = ["study", "ctrl", "--out", str(out), "--kl-coefs", "1", "--steps", "1"]
    args += ["--prompts", "2", "--samples", "2", "--quiet", *_sets(TINY_RL)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert all(arm in report for arm in CTRL_ARMS) and (out / "ctrl_winrate_vs_kl.png").is_file()
    results = json.loads((out / "results.json").read_text())
    for runs in results.values():
        (run,) = runs
        assert run["kl_coef"] == 1.0 and [p["n"] for p in run["win_rate"]] == [1, 2, 4, 8]
    # a second call reuses every run and evaluation
    cached = {p: p.stat().st_mtime for p in out.glob("*/winrate.json")}
    assert len(cached) == 3
    assert CliRunner().invoke(app, args).exit_code == 0
    assert {p: p.stat().st_mtime for p in out.glob("*/winrate.json")} == cached


def test_study_xpo_end_to_end(tmp_path):
    out = tmp_path / "xpo"
    sets = ["train.batch_size=2", "preference.max_new_tokens=48", "eval.n=2", "train.threads=1"]
    args = ["study", "xpo", "--out", str(out), "--alphas", "0.01", "--seeds", "1"]
    args += ["--steps", "2", "--quiet", *_sets(sets)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"online DPO", "XPO α=0.01"}
    assert all(len(r[0]["accuracy"]) == 2 for r in results.values())
    assert (out / "xpo_accuracy.png").is_file()


def test_study_options_are_checked():
    result = CliRunner().invoke(app, ["study", "ctrl", "--kl-coefs", "a,b"])
    assert result.exit_code == 2 and "--kl-coefs 'a,b'" in result.output
    result = CliRunner().invoke(app, ["study", "xpo", "--alphas", "-1"])
    assert result.exit_code == 2 and "non-negative" in result.output


def test_matched_kl_interpolates_each_arm_from_the_reference():
    def run(coef, kl, win4):
        return {
            "kl_coef": coef,
            "kl": {"mean": kl},
            "win_rate": [{"n": 4, "cdf": {"rate": win4, "stderr": 0.0}}],
        }

    results = {
        "a": [run(1.0, 2.0, 0.7), run(0.1, 6.0, 0.9)],
        "b": [run(1.0, 3.0, 0.6)],  # b's largest KL (3) bounds the comparison
    }
    rows = matched_kl(results, 4)
    assert [r["kl"] for r in rows] == pytest.approx([1.0, 2.0, 3.0])
    # a: (0, 0.5) → (2, 0.7) → (6, 0.9); b: (0, 0.5) → (3, 0.6)
    assert [r["a"] for r in rows] == pytest.approx([0.6, 0.7, 0.75])
    assert [r["b"] for r in rows] == pytest.approx([0.5 + 0.1 / 3, 0.5 + 0.2 / 3, 0.6])
