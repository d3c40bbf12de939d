"""tether: KL-tethered fine-tuning of language models.

The Python API mirrors the command line::

    import tether

    recipe = tether.load_recipe("critical-tokens", ["train.steps=20"])  # `tether train RECIPE`
    summary = tether.train(recipe, "runs/ct")                           # the run's summary.json
    figures = tether.evaluate("runs/ct")                                # `tether eval RUN --json`
    texts = tether.sample("runs/ct", ["Input:\\n12+34\\nTarget:\\n"])   # `tether sample`

``tether.STAGES`` lists every ``train.stage`` with its properties, ``tether.TASKS`` every
``task.name``. The names are imported when first used, so ``import tether`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> "module:attribute"
_API = {
    "load_recipe": "tether.config:load_recipe",
    "Recipe": "tether.config:Recipe",
    "RecipeError": "tether.config:RecipeError",
    "train": "tether.engine.loop:train",
    "evaluate": "tether.eval.checkpoint:evaluate_checkpoint",
    "sample": "tether.generation.texts:sample_texts",
    "STAGES": "tether.stages.registry:STAGES",
    "TASKS": "tether.tasks:TASKS",
}

__all__ = [
    "STAGES",
    "TASKS",
    "Recipe",
    "RecipeError",
    "evaluate",
    "load_recipe",
    "sample",
    "train",
]

if TYPE_CHECKING:
    from tether.config import Recipe, RecipeError, load_recipe
    from tether.engine.loop import train
    from tether.eval.checkpoint import evaluate_checkpoint as evaluate
    from tether.generation.texts import sample_texts as sample
    from tether.stages.registry import STAGES
    from tether.tasks import TASKS


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'tether' has no attribute {name!r}")
    module, attribute = _API[name].split(":")
    value = getattr(import_module(module), attribute)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
