"""Bad input never gives a traceback: a corpus of malformed recipes, broken checkpoints and
arbitrary model outputs. Each gets a one-line ``error: ...`` naming what is wrong (exit code 2)
and leaves no run directory behind, or is scored without raising."""

import json
import random
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tether.cli import app
from tether.config import Recipe, RecipeError, load_recipe
from tether.models.loading import build_model, char_tokenizer
from tether.tasks import get_task

CORPUS = Path(__file__).parent / "fuzz"
runner = CliRunner()


def _train(tmp_path, *args):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", *map(str, args), "--out", str(out), "--quiet"])
    return result, out


def _assert_one_line_error(result, out, expected):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0], lines[0]
    assert not out.exists()  # nothing written for a run that never started


@pytest.mark.parametrize("case", sorted((CORPUS / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_corpus(case, tmp_path):
    expected = case.read_bytes().splitlines()[0].decode().removeprefix("# expect: ")
    result, out = _train(tmp_path, case)
    _assert_one_line_error(result, out, expected)


# ---------------------------------------------------------------- checkpoints


def _tiny(path, n_embd=32):
    tok = char_tokenizer(model_max_length=64)
    model = build_model(tok, arch="llama", n_layer=1, n_head=2, n_embd=n_embd, max_positions=64)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def _mismatched(path):
    """A tokenizer with more tokens than the model's embedding has rows."""
    _tiny(path)
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = 50
    small = build_model(char_tokenizer(), "llama", 1, 2, 32, 64)
    small.resize_token_embeddings(50)
    small.save_pretrained(path)


CHECKPOINTS = {
    "tokenizer-model-mismatch": (_mismatched, "tokenizer has 99 tokens but the model's embedding"),
    "garbage-config": (
        lambda p: (_tiny(p), (p / "config.json").write_text("{not json")),
        "could not load",
    ),
    "no-weights": (
        lambda p: (_tiny(p), (p / "model.safetensors").unlink()),
        "could not load",
    ),
    "no-config": (lambda p: (_tiny(p), (p / "config.json").unlink()), "no config.json there"),
    "unfinished.tmp": (_tiny, "an unfinished checkpoint"),
}


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_broken_checkpoints_give_one_line(name, tmp_path):
    make, expected = CHECKPOINTS[name]
    ckpt = tmp_path / name
    ckpt.mkdir()
    make(ckpt)
    for stage in ("mle", "rl"):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("task: {max_digits: 2}\n")
        result, out = _train(
            tmp_path,
            recipe,
            "--set",
            f"model.init={ckpt}",
            "--set",
            f"train.stage={stage}",
            "--set",
            "train.steps=1",
        )
        _assert_one_line_error(result, out, expected)


# ---------------------------------------------------------------- generated recipes

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
KEYS = st.sampled_from(
    ["name", "seed", "task", "model", "optim", "train", "rl", "eval", "steps", "lr", "x", ""]
)
TREES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=TREES)
def test_generated_recipes_validate_or_fail_in_one_line(data, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        assert isinstance(load_recipe(path), Recipe)
    except RecipeError as err:
        assert "\n" not in str(err) and str(err).startswith(str(path))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_as_a_recipe(raw, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(raw)
    try:
        load_recipe(path)
    except RecipeError as err:
        assert "\n" not in str(err)


@settings(max_examples=100, deadline=None)
@example(override="0\n0=")  # a line break inside the key once reached the message
@given(override=st.text(max_size=30))
def test_arbitrary_set_overrides(override):
    try:
        load_recipe(None, [override])
    except RecipeError as err:
        assert "\n" not in str(err)


# ---------------------------------------------------------------- task checkers

TASKS = ["addition", "first-digit", "multistep", "multistep-prefs"]


@pytest.mark.parametrize("name", TASKS)
@settings(max_examples=200, deadline=None)
@given(completion=st.text(max_size=80), seed=st.integers(0, 10**6))
def test_checkers_accept_any_model_output(name, completion, seed):
    task = get_task(name, 3)
    problem = task.pretrain_problem(random.Random(seed))
    assert task.is_correct(problem, completion) in (True, False)
    assert 0.0 <= task.score(problem, completion) <= 1.0
    assert task.is_correct(problem, problem.target) is True
    assert task.score(problem, problem.target) == 1.0


@pytest.fixture(scope="module")
def jsonl_task(tmp_path_factory):
    from tether.tasks.jsonl import JsonlTask

    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    rows = [{"prompt": "Translate: chat", "completion": "the cat sat on the mat"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return JsonlTask.from_file(path)


@settings(max_examples=200, deadline=None)
@given(completion=st.text(max_size=80))
def test_jsonl_checker_accepts_any_model_output(jsonl_task, completion):
    problem = jsonl_task.pretrain_problem(random.Random(0))
    assert jsonl_task.is_correct(problem, completion) in (True, False)
    assert 0.0 <= jsonl_task.score(problem, completion) <= 1.0
