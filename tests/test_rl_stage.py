"""The RL stage end to end on tiny models: the reward rises, and the prioritised path with all
weights 1 is the standard path."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tether.config import load_recipe
from tether.engine.loop import train


def _recipe(init, *overrides):
    return load_recipe(
        None,
        [
            "task.name=first-digit",
            f"model.init={init}",
            "train.stage=rl",
            "train.log_every=1",
            "train.eval_every=1000",
            "optim.warmup_steps=0",
            "optim.min_lr_ratio=1.0",
            "eval.n=16",
            *overrides,
        ],
    )


# 12 steps in which every algorithm raises the reward by more than 0.2
EASY = [
    "rl.group_size=4",
    "rl.prompts_per_step=16",
    "rl.temperature=1.0",
    "rl.kl_coef=0.01",
    "rl.reward_wrong=0.0",
    "optim.lr=0.03",
    "train.steps=12",
    "rl.ppo_epochs=2",
]


@pytest.mark.parametrize("algorithm", ["reinforce", "rloo", "a2c", "ppo"])
def test_reward_rises_on_an_easy_task(algorithm, tiny_checkpoint, tmp_path):
    recipe = _recipe(tiny_checkpoint, f"rl.algorithm={algorithm}", *EASY)
    train(recipe, tmp_path / "run", progress=False)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert len(rewards) == 12
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.2, rewards
    assert all(
        "kl_sampled" in r and "kl_exact" in r and "entropy" in r for r in rows if "reward" in r
    )


def test_prioritized_with_unit_weights_equals_standard_bit_for_bit(tiny_checkpoint, tmp_path):
    """certainty_exponent = 0 gives w = Ĵ^0 = 1 everywhere: the same run, bit for bit."""
    common = [
        "rl.algorithm=a2c",
        "rl.prompts_per_step=8",
        "train.steps=3",
        "rl.kl_coef=1.0",
        "optim.lr=0.01",
    ]
    train(_recipe(tiny_checkpoint, *common), tmp_path / "standard", progress=False)
    train(
        _recipe(tiny_checkpoint, *common, "rl.certainty_exponent=0"),
        tmp_path / "prioritized",
        progress=False,
    )

    def losses(run):
        rows = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(r)["loss"] for r in rows if '"loss"' in r]

    assert losses("standard") == losses("prioritized")
    a = load_file(tmp_path / "standard" / "model" / "model.safetensors")
    b = load_file(tmp_path / "prioritized" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rl_on_addition_runs_and_logs_the_probe(tiny_checkpoint, tmp_path):
    recipe = load_recipe(
        None,
        [
            "task.max_digits=1",
            f"model.init={tiny_checkpoint}",
            "train.stage=rl",
            "train.steps=1",
            "rl.prompts_per_step=2",
            "rl.max_new_tokens=8",
            "rl.certainty_exponent=150",
            "rl.kl_estimator=exact",
            "eval.digits=[1, 2]",
            "eval.n=2",
        ],
    )
    train(recipe, tmp_path / "run", progress=False)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert (
        rows[0]["step"] == 0 and "eval/acc_identical_2" in rows[0] and "eval/p_critical" in rows[0]
    )
    step = next(r for r in rows if "reward" in r)
    assert 0.0 <= step["kl_weight_mean"] <= 1.0 and "kl_exact" in step


def test_the_summary_gives_the_held_out_gain_paired_by_problem(tiny_checkpoint, tmp_path):
    """The first (step 0) and last evaluation judge the same held-out problems; the summary's
    gain is the mean of the per-problem differences, its interval that of a paired t-interval,
    and the stage's reward is logged beside the accuracy."""
    from tether.eval.stats import paired_difference_ci

    recipe = load_recipe(
        None,
        [
            "task.name=first-digit",
            f"model.init={tiny_checkpoint}",
            "train.stage=rl",
            "train.steps=2",
            "optim.lr=0.05",
            "rl.prompts_per_step=4",
            "rl.max_new_tokens=2",
            "eval.n=8",
            "eval.temperature=1.0",
        ],
    )
    summary = train(recipe, tmp_path / "run", progress=False)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    first = next(r for r in rows if r["step"] == 0)
    assert {"eval/acc_rl", "eval/reward"} <= set(first)
    gain = summary["eval/acc_rl"] - first["eval/acc_rl"]
    assert summary["eval/acc_rl_gain"] == pytest.approx(gain, abs=1e-12)
    low, high = summary["eval/acc_rl_gain_ci_low"], summary["eval/acc_rl_gain_ci_high"]
    assert low <= gain <= high
    # the reward (checker ±1) is an affine map of accuracy: its gain is twice the accuracy's
    assert summary["eval/reward_gain"] == pytest.approx(2 * gain, abs=1e-12)
    assert paired_difference_ci([0, 1, 1, 0], [1, 1, 0, 1])[0] == pytest.approx(0.25)
