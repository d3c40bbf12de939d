"""Recipes: YAML files validated into typed configs (pydantic).

A recipe is data. Every key is known, typed and range-checked before anything is written;
a bad recipe raises :class:`RecipeError` whose message is one line naming the key and what
is allowed. :mod:`~tether.config.sections` holds one model per section,
:mod:`~tether.config.recipe` the whole recipe and the rules across sections,
:mod:`~tether.config.loading` reading YAML and ``--set`` overrides.
"""

from tether.config.loading import (
    PACKAGED_RECIPES,
    RecipeError,
    apply_overrides,
    dump_recipe,
    first_line,
    load_recipe,
    packaged_recipes,
    parse_override,
)
from tether.config.recipe import Recipe
from tether.config.sections import (
    DPGConfig,
    EvalConfig,
    ImitationConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PreferenceConfig,
    RewardConfig,
    RLConfig,
    TaskConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "PACKAGED_RECIPES",
    "DPGConfig",
    "EvalConfig",
    "ImitationConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "PreferenceConfig",
    "Recipe",
    "RecipeError",
    "RewardConfig",
    "RLConfig",
    "TaskConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "dump_recipe",
    "first_line",
    "load_recipe",
    "packaged_recipes",
    "parse_override",
]
