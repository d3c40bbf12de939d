"""The stage registry is the one list of stages: each row names a Stage subclass, and the
recipe's ``train.stage`` and every stage property come from it."""

import importlib

import pytest

from tether.config import TrainConfig, load_recipe
from tether.stages.base import Stage
from tether.stages.registry import STAGE_NAMES, STAGES


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_every_row_names_a_stage_class(name):
    module, _, cls = STAGES[name].stage_class.partition(":")
    stage_class = getattr(importlib.import_module(module), cls)
    assert issubclass(stage_class, Stage)
    assert STAGES[name].summary


def test_train_stage_accepts_exactly_the_registry_rows():
    assert TrainConfig.model_fields["stage"].annotation.__args__ == STAGE_NAMES


def _recipe(stage, *overrides):
    pairs = ["task.name=multistep-prefs"] if STAGES[stage].needs_preference_task else []
    return load_recipe(None, [f"train.stage={stage}", "model.init=x", *pairs, *overrides])


def test_properties_that_depend_on_the_recipe():
    sampling = {n for n in STAGE_NAMES if _recipe(n).samples_from_policy}
    assert sampling == {"rl", "online-dpo", "xpo", "dpg"}
    online = _recipe("iqlearn", "imitation.online_fraction=0.25")
    assert (
        online.samples_from_policy
        and not _recipe("mle", "imitation.online_fraction=0.25").samples_from_policy
    )
    reads = {n for n in STAGE_NAMES if _recipe(n).reads_sampler_logprobs}
    assert reads == {"dpg"}  # rl reads its sampler's log-probs with PPO only
    assert _recipe("rl", "rl.algorithm=ppo").reads_sampler_logprobs
