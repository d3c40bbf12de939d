"""Moment-constraint targets P = π_ref·exp(λ·φ) in the DPG stage: features by hand, λ fitted by
SNIS on reference samples puts the exact target's feature means on their targets, DPG then
moves the policy's exact means there, and bad feature specs fail in one line."""

import json

import pytest
import torch

from test_dpg_stage import _recipe as dpg_recipe
from tether.config import RecipeError, load_recipe
from tether.distributions.exact import expectation
from tether.engine.loop import train
from tether.engine.setup import build_policy
from tether.stages.dpg import DPGStage
from tether.tasks.features import FeatureError, feature_function, feature_matrix

pytestmark = pytest.mark.usefixtures("one_thread")

MOMENTS = "dpg.moments={'contains:1': 0.6, 'length': 2.0}"


def _recipe(init, *overrides):
    return dpg_recipe(
        init,
        "dpg.target=moments",
        MOMENTS,
        "dpg.moment_samples=2048",
        "optim.lr=0.01",
        *overrides,
    )


def test_features_by_hand():
    texts = ["12", "", "3113", "21"]
    phi = feature_matrix(["contains:1", "length", "count:1", "startswith:2", "endswith:1"], texts)
    assert phi.tolist() == [
        [1, 2, 1, 0, 0],
        [0, 0, 0, 0, 0],
        [1, 4, 2, 0, 0],
        [1, 2, 1, 1, 1],
    ]
    for bad in ("contains:", "size", "has:1"):
        with pytest.raises(FeatureError, match="unknown feature"):
            feature_function(bad)


def test_snis_fitted_target_has_the_asked_means_exactly_enough(tiny_checkpoint):
    recipe = _recipe(tiny_checkpoint)
    model, tok = build_policy(recipe)
    stage = DPGStage(recipe, tok, model, torch.device("cpu"))
    assert stage.target is not None and stage.space is not None
    phi = feature_matrix(["contains:1", "length"], stage.space.texts)
    exact_means = [float(expectation(stage.target.log_target, phi[:, i])) for i in range(2)]
    ref_means = [float(expectation(stage.target.log_ref, phi[:, i])) for i in range(2)]
    # 2048 SNIS samples: the exact means of the fitted p* land within a few standard errors
    assert exact_means == pytest.approx([0.6, 2.0], abs=0.04), (exact_means, ref_means)
    assert abs(ref_means[0] - 0.6) > 0.15  # the constraint moves the reference (0.41 here)


def test_dpg_moves_the_policy_means_to_the_targets(tiny_checkpoint, tmp_path):
    train(_recipe(tiny_checkpoint, "train.steps=60", "train.eval_every=60"), tmp_path / "r", False)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], [r for r in rows if "exact/kl_target_policy" in r][-1]
    assert first["step"] == 0 and last["step"] == 60
    # measured: KL(p*‖π) 0.225 → 0.019; contains:1 0.41 → 0.59, length 2.39 → 1.98
    assert last["exact/kl_target_policy"] < 0.2 * first["exact/kl_target_policy"]
    assert last["exact/moment/contains:1"] == pytest.approx(0.6, abs=0.07)
    assert last["exact/moment/length"] == pytest.approx(2.0, abs=0.15)
    assert "exact/lambda/contains:1" in last


def test_moment_settings_fail_in_one_line(tiny_checkpoint):
    with pytest.raises(RecipeError, match="dpg.moments .* is required with dpg.target moments"):
        load_recipe(None, ["dpg.target=moments"])
    with pytest.raises(RecipeError, match="dpg.moments: unknown feature 'size'"):
        load_recipe(None, ["dpg.target=moments", "dpg.moments={'size': 1}"])
    recipe = _recipe(tiny_checkpoint, "dpg.moments={'contains:1': 1.5}")  # a 0/1 feature
    model, tok = build_policy(recipe)
    with pytest.raises(RecipeError, match="dpg.moments"):
        DPGStage(recipe, tok, model, torch.device("cpu"))


def test_rejection_acceptance_is_one_at_the_target_and_matches_qrs(tiny_checkpoint):
    from tether.distributions.enumeration import exact_figures
    from tether.distributions.exact import qrs_acceptance_rate

    recipe = _recipe(tiny_checkpoint)
    model, tok = build_policy(recipe)
    stage = DPGStage(recipe, tok, model, torch.device("cpu"))
    target, space = stage.target, stage.space
    assert exact_figures(target.log_target, space, target)["rejection_acceptance"] == pytest.approx(
        1.0
    )
    log_pi = space.distribution(model).log_probs
    ratio_max = float((target.log_target - log_pi).max().exp())
    expected = qrs_acceptance_rate(target.log_target, log_pi, ratio_max)
    got = exact_figures(log_pi, space, target)["rejection_acceptance"]
    assert got == pytest.approx(float(expected), rel=1e-9) and 0 < got < 1


def test_eval_exact_judges_a_moment_run_against_its_own_target(tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from tether.cli import app

    train(_recipe(tiny_checkpoint, "train.steps=20", "train.eval_every=20"), tmp_path / "r", False)
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "r"), "--exact", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{") :])
    assert out["target"] == "moments" and out["moments"] == {"contains:1": 0.6, "length": 2.0}
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "exact/kl_target_policy" in r][-1]["exact/kl_target_policy"]
    # the run's own target used SNIS λ from 2048 samples; the exact λ differs a little
    assert out["figures"]["policy"]["kl_target_policy"] == pytest.approx(logged, abs=0.05)
