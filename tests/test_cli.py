"""One fast end-to-end test per CLI command, and the one-line errors (exit code 2)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tether.cli import app
from tether.models import AutoModelForCausalLM, AutoTokenizer

runner = CliRunner()

TINY = {
    "name": "tiny",
    "task": {"max_digits": 2},
    "model": {"arch": "llama", "n_layer": 1, "n_head": 2, "n_embd": 32, "max_positions": 256},
    "train": {"steps": 6, "batch_size": 4, "log_every": 2, "eval_every": 3, "checkpoint_every": 4},
    "optim": {"warmup_steps": 2},
    "eval": {"digits": [1, 2], "n": 3},
}


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def _invoke_json(*args):
    """Exit code and the JSON document on stdout (stderr may carry progress output)."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    recipe = d / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    out = d / "run"
    code, output = _invoke("train", recipe, "--out", out, "--quiet", "--set", "seed=3")
    assert code == 0, output
    return out


def test_train_writes_a_complete_run_directory(trained_run):
    out = trained_run
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in r for r in rows)
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in rows if "eval/acc_identical_2" in r] == [3, 6]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and "eval/acc_varying_2" in summary
    assert (out / "checkpoints" / "step-000004" / "config.json").is_file()
    # the final checkpoint loads with plain transformers
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 1 and tok.decode(tok("1+2")["input_ids"]) == "1+2"


def test_eval_json(trained_run):
    doc = _invoke_json("eval", trained_run, "--digits", "1-2", "--n", "4", "--json")
    assert set(doc["accuracy"]["identical"]) == {"1", "2"}
    cell = doc["accuracy"]["varying"]["2"]
    assert 0.0 <= cell["ci_low"] <= cell["accuracy"] <= cell["ci_high"] <= 1.0


def test_eval_table_and_certainty(trained_run):
    code, output = _invoke(
        "eval",
        trained_run / "model",
        "--digits",
        "2",
        "--n",
        "3",
        "--certainty",
        "--temperature",
        "1.0",
    )
    assert code == 0, output
    assert "identical" in output and "varying" in output


def test_sample(trained_run):
    rows = _invoke_json(
        "sample", trained_run, "--digits", "2", "--count", "2", "--max-new-tokens", "8", "--json"
    )
    assert len(rows) == 2 and all("correct" in r and "logprob" in r for r in rows)


def test_report(trained_run, tmp_path):
    code, output = _invoke("report", trained_run, trained_run, "-o", tmp_path / "rep")
    assert code == 0, output
    assert (tmp_path / "rep" / "report.md").is_file()
    assert list((tmp_path / "rep").glob("*.png"))


def test_models_lists_json():
    assert "addition-n3" in _invoke_json("models", "--json")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "missing.yaml"], "no such recipe file"),
        (["train", "RECIPE", "--set", "train.stepz=1"], "train.stepz: unknown key"),
        (["train", "RECIPE", "--set", "optim.lr=-1"], "optim.lr"),
        (["eval", "no/such/model"], "no such directory and no shipped model"),
        (["eval", "RUN", "--digits", "5-2"], "--digits"),
        (["sample", "RUN"], "--prompt"),
        (["report", "no/such/run"], "not a run directory"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(args, needle, tmp_path, trained_run):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    args = [str(recipe) if a == "RECIPE" else str(trained_run) if a == "RUN" else a for a in args]
    out = tmp_path / "never"
    if args[0] == "train":
        args += ["--out", str(out)]
    code, output = _invoke(*args)
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert not out.exists()  # nothing written


def test_existing_run_directory_is_refused(trained_run, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    code, output = _invoke("train", recipe, "--out", trained_run)
    assert code == 2 and "already exists" in output


def test_console_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "tether", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for command in ("train", "eval", "sample", "report", "models"):
        assert command in result.stdout


def test_checkpoint_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    code, output = _invoke("eval", Path(tmp_path / "empty"))
    assert code == 2 and "no config.json" in output


def test_tensorboard_tracker_logs_through_accelerate(tmp_path):
    pytest.importorskip("tensorboard")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        yaml.safe_dump({**TINY, "train": {**TINY["train"], "steps": 2, "eval_every": 2}})
    )
    out = tmp_path / "run"
    code, output = _invoke(
        "train", recipe, "--out", out, "--quiet", "--set", "tracking.trackers=[tensorboard]"
    )
    assert code == 0, output
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    assert (out / "metrics.jsonl").is_file()  # JSONL always


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train"], "give a RECIPE to train, or --resume RUN_DIR"),
        (["train", "--resume", "no/such/run"], "not a run directory (no config.yaml)"),
        (["train", "x.yaml", "--resume", "no/such/run"], "give no RECIPE, --set or --out"),
    ],
)
def test_train_resume_errors_are_one_line(args, message):
    code, output = _invoke(*args)
    assert code == 2 and message in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1


def test_train_resume_of_a_finished_run_is_refused(trained_run):
    code, output = _invoke("train", "--resume", trained_run)
    assert code == 2 and "already finished" in output


TINY_SET = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "train.batch_size=8",
    "train.eval_every=1000",
    "eval.n=4",
]


def test_study_imitation_end_to_end(tmp_path):
    args = ["study", "imitation", "--out", tmp_path, "--part", "small-data", "--seeds", "1"]
    args += ["--steps", "2", "--prompts", "4", "--k", "2", "--train-size", "4", "--quiet"]
    code, output = _invoke(*args, *(a for kv in TINY_SET for a in ("--set", kv)))
    assert code == 0, output
    folder = tmp_path / "small-data"
    assert "| MLE |" in (folder / "report.md").read_text()
    assert (folder / "score_vs_diversity.png").stat().st_size > 0
    results = json.loads((folder / "results.json").read_text())
    assert set(results) == {"MLE", "IQLearn λ=0.1"}
    assert {"train_accuracy", "heldout_nll", "sweep", "rewards"} <= set(results["MLE"][0])
    # finished runs are reused: a second call trains nothing
    code, output = _invoke(*args, *(a for kv in TINY_SET for a in ("--set", kv)))
    assert code == 0 and "seed 0" not in output


def test_eval_sweep_and_rewards_on_multistep(tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: {name: multistep, max_digits: 2}\n")
    sets = [*TINY_SET, "train.steps=2", "train.stage=iqlearn"]
    code, output = _invoke(
        "train", recipe, "--out", out, "--quiet", *(a for kv in sets for a in ("--set", kv))
    )
    assert code == 0, output
    result = _invoke_json(
        "eval", out, "--n", "4", "--temperatures", "0.5,1", "--k", "2", "--rewards", "--json"
    )
    assert result["task"] == "multistep"  # read from the checkpoint
    assert [row["temperature"] for row in result["sweep"]] == [0.5, 1.0]
    assert result["rewards"]["n"] == 8 and len(result["reward_examples"]) == 3
    code, output = _invoke("eval", out, "--temperatures", "hot")
    assert code == 2 and "--temperatures 'hot'" in output
