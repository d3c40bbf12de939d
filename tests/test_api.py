"""The public Python API: ``tether.<name>`` for what the CLI does, imported on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tether


def test_import_tether_is_light():
    """``import tether`` loads neither torch nor transformers: the names are imported lazily."""
    code = "import sys, tether; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("name", tether.__all__)
def test_every_public_name_resolves(name):
    assert getattr(tether, name) is not None
    assert name in dir(tether)


def test_the_api_is_the_library():
    from tether.config import load_recipe
    from tether.engine.loop import train
    from tether.eval.checkpoint import evaluate_checkpoint
    from tether.generation.texts import sample_texts
    from tether.stages.registry import STAGES
    from tether.tasks import TASKS

    assert tether.load_recipe is load_recipe
    assert tether.train is train
    assert tether.evaluate is evaluate_checkpoint
    assert tether.sample is sample_texts
    assert set(tether.STAGES) == set(STAGES) and "rl" in tether.STAGES
    assert set(tether.TASKS) == set(TASKS) and "addition" in tether.TASKS


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        tether.trian  # noqa: B018
