"""One fast end-to-end test per CLI command, and the one-line errors (exit code 2)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tether.cli import app
from tether.models.loading import AutoModelForCausalLM, AutoTokenizer

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
        (["eval", "RUN", "--chat-template", "maybe"], "--chat-template 'maybe': choose auto"),
        (["winrate", "RUN", "--chat-template", "maybe"], "--chat-template 'maybe': choose auto"),
        (["sample", "RUN", "--prompt", "x", "--chat-template", "on"], "has no chat template"),
        (["eval", "RUN", "--task", "jsonl"], "(give the data file: --data FILE)"),
        (["eval", "RUN", "--task", "jsonl", "--data", "no.jsonl"], "no.jsonl: no such file"),
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


# ---------------------------------------------------------------- bad input found by the audit


def _one_line_error(code, output, needle):
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert needle in lines[0], lines[0]


RL_TINY = [
    "train.stage=rl",
    "train.steps=3",
    "train.checkpoint_every=1",
    "train.eval_every=100",
    "rl.prompts_per_step=2",
    "rl.max_new_tokens=12",
    "eval.n=2",
    "eval.digits=[]",
]


def _sets(overrides):
    return [a for kv in overrides for a in ("--set", kv)]


def test_a_reward_function_that_raises_is_one_line_and_keeps_the_checkpoints(trained_run, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    rew = tmp_path / "rew.py"
    rew.write_text(
        "n = 0\ndef boom(prompt, completion):\n    global n\n    n += 1\n"
        "    if n > 4:\n        raise KeyError('oops')\n    return 0.0\n"
    )  # 2 calls judge step 0's evaluation, 2 step 1's samples: it raises at step 2
    out = tmp_path / "run"
    sets = [*RL_TINY, f"model.init={trained_run / 'model'}", "reward.kind=python"]
    code, output = _invoke(
        "train", recipe, "--out", out, "--quiet", *_sets([*sets, f"reward.function={rew}:boom"])
    )
    _one_line_error(code, output, f"reward.function '{rew}:boom' raised KeyError('oops')")
    assert "on completion" in output
    # what the run wrote before the failure is kept: step 1's checkpoint and its metrics
    assert (out / "checkpoints" / "step-000001").is_dir()
    assert (out / "metrics.jsonl").is_file()
    # a function of the wrong signature is refused before anything is written
    out2 = tmp_path / "run2"
    code, output = _invoke(
        "train", recipe, "--out", out2, "--quiet", *_sets([*sets, "reward.function=os:getcwd"])
    )
    _one_line_error(code, output, "reward.function 'os:getcwd': must take two arguments")
    assert not out2.exists()
    code, output = _invoke(
        "winrate", trained_run, "--reference", trained_run, "--reward-function", "os:getcwd"
    )
    _one_line_error(code, output, "reward.function 'os:getcwd'")


def test_a_study_refuses_a_finished_run_trained_with_other_settings(tmp_path):
    args = ["study", "imitation", "--out", tmp_path, "--part", "small-data", "--seeds", "1"]
    args += ["--prompts", "4", "--k", "2", "--train-size", "4", "--quiet", *_sets(TINY_SET)]
    code, output = _invoke(*args, "--steps", "1")
    assert code == 0, output
    code, output = _invoke(*args, "--steps", "2")
    run = tmp_path / "small-data" / "mle-seed0"
    _one_line_error(code, output, f"{run}: already trained with train.steps=1 (now 2)")
    assert "use another --out or remove that folder" in output
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 1


def test_train_once_reuses_only_the_same_settings(tmp_path):
    from tether.config import load_recipe
    from tether.engine.checkpoints import RunDirError
    from tether.studies.common import train_once

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(TINY))
    recipe = load_recipe(recipe_file, ["train.steps=5", "train.eval_every=100"])
    run = tmp_path / "run"
    train_once(recipe, run, progress=False)
    stamp = (run / "summary.json").stat().st_mtime_ns
    train_once(recipe, run, progress=False)  # the same settings: reused, not trained again
    assert (run / "summary.json").stat().st_mtime_ns == stamp
    other = load_recipe(recipe_file, ["train.steps=5", "train.eval_every=100", "optim.lr=0.01"])
    with pytest.raises(RunDirError, match=r"already trained with optim\.lr=0\.001 \(now 0\.01\)"):
        train_once(other, run, progress=False)
    # an interrupted run is not resumed with other settings either
    (run / "summary.json").unlink()
    with pytest.raises(RunDirError, match="an interrupted run started with optim.lr"):
        train_once(other, run, progress=False)
    assert (run / "checkpoints" / "step-000004").is_dir()  # nothing removed


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["demo", "--set", "seed=5"], "--set seed: tether demo sets each run's seed; use --seeds"),
        (["demo", "--set", "rl.certainty_exponent=10"], "--set rl.certainty_exponent: tether"),
        (["demo", "--set", "rl={certainty_exponent: 10}"], "use --certainty-exponent or --sweep"),
        (["study", "demo-rl", "--set", "dpg.beta=0.5"], "--set dpg.beta: tether study demo-rl"),
        (["study", "demo-rl", "--set", "seed=1"], "use --seeds and --rl-seeds"),
        (["study", "collapse", "--set", "dpg.beta=1"], "--set dpg.beta: tether study collapse"),
        (["study", "ctrl", "--set", "rl.kl_coef=2"], "use --kl-coefs"),
        (["study", "xpo", "--set", "preference.alpha=0.1"], "use --alphas"),
        (["study", "imitation", "--set", "imitation.lam=2"], "--set imitation.lam: tether"),
        (["study", "imitation", "--set", "train.steps=2"], "use --steps"),
    ],
)
def test_set_of_a_key_the_command_sets_itself_is_refused(args, needle, tmp_path):
    out = tmp_path / "out"
    split = 2 if args[0] == "study" else 1
    code, output = _invoke(*args[:split], "--out", out, *args[split:])
    _one_line_error(code, output, needle)
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "RECIPE", "--out", "FILE"], "--out FILE: is a file, not a folder"),
        (["train", "RECIPE", "--out", "FILE/sub"], "--out FILE/sub: FILE is a file, not a folder"),
        (["demo", "--out", "FILE"], "--out FILE: is a file, not a folder"),
        (["report", "RUN", "-o", "FILE"], "--out FILE: is a file, not a folder"),
        (["study", "collapse", "--out", "FILE"], "--out FILE: is a file, not a folder"),
        (["study", "imitation", "--out", "FILE/x"], "FILE is a file, not a folder"),
        (["winrate", "RUN", "--plot", "FILE/p.png"], "--plot FILE/p.png: FILE is a file"),
        (["train", "RECIPE", "--out", "/proc/x"], "--out /proc/x: cannot create the folder"),
        (["report", "RUN", "-o", "/proc/x"], "--out /proc/x: cannot create the folder"),
    ],
)
def test_an_output_path_that_cannot_be_made_is_one_line(args, needle, trained_run, tmp_path):
    if "/proc/x" in args and not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    afile = tmp_path / "afile"
    afile.write_text("")
    swap = {"RECIPE": str(recipe), "RUN": str(trained_run)}
    args = [swap.get(a, a.replace("FILE", str(afile))) for a in args]
    code, output = _invoke(*args)
    _one_line_error(code, output, needle.replace("FILE", str(afile)))
    assert afile.read_text() == ""


def _damaged(trained_run, tmp_path, name, file, text):
    model = tmp_path / name
    shutil.copytree(trained_run / "model", model)
    (model / file).write_text(text)
    return model


@pytest.mark.parametrize(
    ("command", "file", "text", "needle"),
    [
        ("eval", "tether.json", "{bad", "tether.json is not valid JSON"),
        ("eval", "tether.json", "[1, 2]", "tether.json must hold a JSON object"),
        ("winrate", "tether.json", "{bad", "tether.json is not valid JSON"),
        ("eval", "model.safetensors", "garbage", "could not load (Error while deserializing"),
    ],
)
def test_damaged_checkpoint_files_are_one_line(command, file, text, needle, trained_run, tmp_path):
    model = _damaged(trained_run, tmp_path, "ck", file, text)
    code, output = _invoke(command, model, "--n", "2")
    _one_line_error(code, output, needle)
    assert f"'{model}'" in output


def _interrupted(trained_run, tmp_path):
    """A copy of the trained run as if stopped after its step-4 checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "model")
    (run / "summary.json").unlink()
    return run


def test_resume_with_a_damaged_trainer_state_is_one_line(trained_run, tmp_path):
    run = _interrupted(trained_run, tmp_path)
    state = run / "checkpoints" / "step-000004" / "trainer_state.pt"
    state.write_text("garbage\n")
    code, output = _invoke("train", "--resume", run, "--quiet")
    _one_line_error(code, output, f"--resume: '{state}' cannot be read")
    assert state.read_text() == "garbage\n" and not (run / "summary.json").exists()


def test_a_partial_last_metrics_line_is_skipped_but_not_a_damaged_middle_one(trained_run, tmp_path):
    run = _interrupted(trained_run, tmp_path)
    metrics = run / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 7, "lo')  # killed while writing a line
    code, output = _invoke("report", run, "-o", tmp_path / "rep")
    assert code == 0 and "skipping a partial last line" in output, output
    code, output = _invoke("train", "--resume", run, "--quiet")
    assert code == 0, output
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    lines = whole.splitlines()
    metrics.write_text("\n".join([lines[0], '{"step": 1, "lo', *lines[1:]]) + "\n")
    code, output = _invoke("report", run, "-o", tmp_path / "rep2")
    _one_line_error(code, output, "metrics.jsonl, line 2: not valid JSON")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["eval", "RUN", "--task", "nosuch"], "'addition', 'first-digit', 'multistep'"),
        (["eval", "RUN", "--temperatures", "nan"], "--temperatures 'nan': expected finite"),
        (["eval", "RUN", "--certainty", "--max-digits", "0"], "--max-digits 0: must lie in 1..18"),
        (["eval", "RUN", "--certainty", "--max-digits", "-2"], "--max-digits -2: must lie in"),
        (["sample", "RUN", "--prompt", ""], "--prompt '': empty"),
        (["train", "RECIPE", "--set", "seed=4294967296"], "seed: Input should be less than"),
        (["train", "RECIPE", "--set", "model.n_embd=12", "--set", "model.n_head=4"], "even"),
        (["bench", "steps", "--width", "9", "--stage", "mle"], "--width 9: must be a multiple"),
    ],
)
def test_more_bad_options_are_one_line(args, needle, trained_run, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    swap = {"RECIPE": str(recipe), "RUN": str(trained_run)}
    out = tmp_path / "never"
    args = [swap.get(a, a) for a in args] + (["--out", str(out)] if args[0] == "train" else [])
    code, output = _invoke(*args)
    _one_line_error(code, output, needle)
    assert not out.exists()


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_a_seed_too_large_is_a_usage_error(command, trained_run):
    code, output = _invoke(command, trained_run, "--digits", "1", "--seed", "9" * 20)
    assert code == 2 and "--seed" in output and "Traceback" not in output
