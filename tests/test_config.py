"""Recipe validation: every bad key, type or range gives one line naming the key."""

import pytest

from tether.config import RecipeError, dump_recipe, load_recipe


def _err(tmp_path, text=None, overrides=()):
    path = None
    if text is not None:
        path = tmp_path / "r.yaml"
        path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_defaults_validate_and_round_trip(tmp_path):
    r = load_recipe(None)
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(r))
    assert load_recipe(path) == r


def test_overrides_are_typed():
    r = load_recipe(
        None, ["train.steps=7", "optim.lr=3e-4", "eval.digits=[1, 2]", "model.init=foo"]
    )
    assert r.train.steps == 7 and r.optim.lr == 3e-4 and r.eval.digits == [1, 2]
    assert r.model.init == "foo"


def test_unknown_key_names_key_and_allowed(tmp_path):
    msg = _err(tmp_path, "train:\n  stepz: 3\n")
    assert "train.stepz: unknown key" in msg and "steps" in msg and "r.yaml" in msg


def test_unknown_top_level_key(tmp_path):
    assert "bogus: unknown key" in _err(tmp_path, "bogus: 1\n")


def test_wrong_type(tmp_path):
    msg = _err(tmp_path, overrides=["train.batch_size=many"])
    assert "train.batch_size" in msg and "integer" in msg


def test_out_of_range(tmp_path):
    msg = _err(tmp_path, overrides=["optim.lr=-1"])
    assert "optim.lr" in msg and "greater than 0" in msg
    assert "eval.digits" in _err(tmp_path, overrides=["eval.digits=[0, 30]"])


def test_cross_field_rule(tmp_path):
    assert "n_head" in _err(tmp_path, overrides=["model.n_embd=100", "model.n_head=3"])


def test_bad_yaml_and_missing_file(tmp_path):
    assert "not valid YAML" in _err(tmp_path, "train: [1, 2\n")
    assert "must be a mapping" in _err(tmp_path, "- 1\n- 2\n")
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")


def test_bad_override_syntax(tmp_path):
    assert "KEY=VALUE" in _err(tmp_path, overrides=["train.steps"])
    assert "not a section" in _err(tmp_path, overrides=["seed=1", "seed.x=2"])


def test_a_key_written_twice_is_refused_with_its_line(tmp_path):
    # plain YAML keeps the last one: this recipe would train 5 steps, not 2, without a word
    msg = _err(tmp_path, "train:\n  steps: 2\ntrain:\n  steps: 5\n")
    assert "key 'train' appears twice in one mapping, line 3" in msg
    msg = _err(tmp_path, "optim:\n  lr: 0.1\n  lr: 0.2\n")
    assert "key 'lr' appears twice" in msg


def test_an_empty_recipe_is_refused(tmp_path):
    assert "the recipe is empty" in _err(tmp_path, "")
    assert "the recipe is empty" in _err(tmp_path, "# only a comment\n")


@pytest.mark.parametrize("estimator", ["k2", "k3", "exact"])
def test_a_kl_in_the_reward_must_be_k1(tmp_path, estimator):
    """The shaped reward is detached: only k1 = log π/π_ref gives the sequence-KL penalty."""
    overrides = ["rl.kl_placement=reward", f"rl.kl_estimator={estimator}"]
    msg = _err(tmp_path, overrides=overrides)
    assert "kl_placement reward needs kl_estimator k1" in msg and estimator in msg
    assert "detached" in msg
    load_recipe(None, ["rl.kl_placement=reward", "rl.kl_estimator=k1"])


def test_k1_in_the_loss_is_refused_for_its_zero_gradient(tmp_path):
    msg = _err(tmp_path, overrides=["rl.kl_estimator=k1"])
    assert "kl_estimator k1 in the loss has zero expected gradient" in msg
    for estimator in ("k2", "k3", "exact"):  # the default placement is the loss
        assert load_recipe(None, [f"rl.kl_estimator={estimator}"]).rl.kl_placement == "loss"


def test_the_stage_is_one_of_the_registry_rows(tmp_path):
    from tether.stages.registry import STAGE_NAMES

    msg = _err(tmp_path, overrides=["train.stage=ppo"])
    assert msg.startswith("defaults: train.stage: Input should be")
    assert all(f"'{name}'" in msg for name in STAGE_NAMES)
