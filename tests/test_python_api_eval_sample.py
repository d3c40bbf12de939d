"""The library behind `tether eval` and `tether sample` (the public `tether.evaluate` and
`tether.sample`): the figures the commands print, from Python, and one-line errors."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from tether.cli import app
from tether.eval.checkpoint import EvaluationError, checkpoint_winrate, evaluate_checkpoint
from tether.generation.texts import sample_completions, sample_texts
from tether.models.loading import load_model_and_tokenizer

runner = CliRunner()


def test_evaluate_checkpoint_is_what_eval_json_prints(tiny_checkpoint):
    figures = evaluate_checkpoint(tiny_checkpoint, digits=[1, 2], n=3)
    assert figures["task"] == "addition" and set(figures["accuracy"]["identical"]) == {"1", "2"}
    args = ["eval", str(tiny_checkpoint), "--digits", "1-2", "--n", "3", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(json.dumps(figures))


def test_evaluate_checkpoint_sweeps_another_task(tiny_checkpoint):
    figures = evaluate_checkpoint(tiny_checkpoint, task="multistep", n=2, k=2, temperatures=[1])
    assert figures["task"] == "multistep" and [r["temperature"] for r in figures["sweep"]] == [1]
    assert {"n", "k", "sweep"} <= set(figures) and "accuracy" not in figures


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"exact": True}, "only the enumerable task allows"),
        ({"exact": True, "task": "enumerable"}, "records no reference"),
        ({"beta": 1.0}, "--reference and --beta go with --exact"),
        ({"certainty": True, "digits": [1], "n": 2}, "--certainty needs --max-digits"),
        ({"max_digits": 30}, "--max-digits 30: must lie in 1..18"),
        ({"task": "nosuch", "n": 2}, "--task 'nosuch'"),
    ],
)
def test_evaluate_checkpoint_refuses_in_one_line(tiny_checkpoint, kwargs, needle):
    with pytest.raises(EvaluationError, match=needle) as info:
        evaluate_checkpoint(tiny_checkpoint, **kwargs)
    assert "\n" not in str(info.value)


def test_checkpoint_winrate_needs_a_reference_and_records_its_inputs(tiny_checkpoint):
    with pytest.raises(EvaluationError, match="pass --reference REF"):
        checkpoint_winrate(tiny_checkpoint, prompts=2)
    report = checkpoint_winrate(
        tiny_checkpoint, reference=tiny_checkpoint, ns=[1, 2], prompts=2, samples=2
    )
    assert report.kl.mean == 0.0 and report.label == str(tiny_checkpoint)
    assert report.info["reward"]["kind"] == "checker" and report.info["task"]["name"] == "addition"
    with pytest.raises(EvaluationError, match="--reward-model is for --reward model"):
        checkpoint_winrate(
            tiny_checkpoint, reference=tiny_checkpoint, reward="checker", reward_model="x"
        )
    with pytest.raises(EvaluationError, match="--reward model: checkpoint 'x'"):
        checkpoint_winrate(tiny_checkpoint, reference=tiny_checkpoint, reward_model="x")


def test_sample_texts_by_name_and_loaded_agree_and_are_reproducible(tiny_checkpoint):
    prompts = ["1+2=", "33+4="]
    by_path = sample_texts(tiny_checkpoint, prompts, max_new_tokens=6, temperature=1.0, seed=3)
    model, tokenizer = load_model_and_tokenizer(str(tiny_checkpoint))
    model.train()
    loaded = sample_texts(
        model, prompts, tokenizer=tokenizer, max_new_tokens=6, temperature=1.0, seed=3
    )
    assert by_path == loaded and len(by_path) == 2
    assert model.training  # given back in the mode it was in
    assert sample_texts(tiny_checkpoint, "1+2=", max_new_tokens=6) == sample_texts(
        tiny_checkpoint, ["1+2="], max_new_tokens=6
    )
    with pytest.raises(ValueError, match="tokenizer"):
        sample_texts(model, prompts)


def test_sample_completions_are_what_sample_json_prints(tiny_checkpoint):
    rows = sample_completions(tiny_checkpoint, ["1+2="], max_new_tokens=5)
    result = runner.invoke(
        app, ["sample", str(tiny_checkpoint), "--prompt", "1+2=", "--max-new-tokens", "5", "--json"]
    )
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row == {
        "prompt": "1+2=",
        "completion": rows[0].completion,
        "finished": rows[0].finished,
        "logprob": rows[0].logprob,
    }


def test_a_checkpoint_path_object_is_accepted(tiny_checkpoint, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, copy)
    assert evaluate_checkpoint(copy, digits=[1], n=2)["checkpoint"] == str(copy)


# ---------------------------------------------------------------- prompt formats, data, prompt-only


def test_the_prompt_format_given_reaches_the_evaluations(tiny_checkpoint):
    from tether.tasks.prompts import PromptFormat, PromptFormatError

    on = PromptFormat("on")  # the char tokenizer has no template: refused once it is applied
    with pytest.raises(PromptFormatError, match="task.chat_template on"):
        evaluate_checkpoint(tiny_checkpoint, task="multistep", n=2, k=2, prompt_format=on)
    with pytest.raises(PromptFormatError, match="task.chat_template on"):
        checkpoint_winrate(
            tiny_checkpoint, reference=tiny_checkpoint, prompts=2, samples=1, prompt_format=on
        )
    with pytest.raises(PromptFormatError, match="task.chat_template on"):
        sample_completions(tiny_checkpoint, "1+2=", max_new_tokens=2, prompt_format=on)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_jsonl_task_needs_its_file_and_takes_it_from_data(tiny_checkpoint, tmp_path):
    with pytest.raises(EvaluationError) as info:
        evaluate_checkpoint(tiny_checkpoint, task="jsonl", n=2, k=2)
    assert str(info.value) == (
        "--task 'jsonl': task.path is required when task.name is jsonl (a JSON Lines file) "
        "(give the data file: --data FILE)"
    )
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2=", "completion": "3"}])
    figures = evaluate_checkpoint(tiny_checkpoint, task="jsonl", data=data, n=2, k=2)
    assert figures["task"] == "jsonl" and len(figures["sweep"]) == 1


@pytest.fixture
def prompt_only_run(tiny_checkpoint, tmp_path):
    """A checkpoint trained (as its tether.json says) on prompt-only rows with a Python reward
    that reads the rows' ``bonus`` column."""
    data = _write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"{a}+1=", "bonus": 0.5} for a in range(1, 5)]
    )
    (tmp_path / "r.py").write_text(
        "def reward(prompt, completion, bonus):\n    return bonus\n"
        "def negative(prompt, completion, bonus):\n    return -bonus\n"
    )
    run = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, run)
    meta = {
        "init": str(tiny_checkpoint),
        "task": {"name": "jsonl", "path": str(data), "completion_field": None},
        "reward": {"kind": "python", "function": f"{tmp_path / 'r.py'}:reward"},
    }
    (run / "tether.json").write_text(json.dumps(meta))
    return run, tmp_path / "r.py"


def test_prompt_only_rows_are_evaluated_by_the_recorded_reward(prompt_only_run):
    run, _ = prompt_only_run
    figures = evaluate_checkpoint(run, n=3, k=2, temperature=1.0)
    assert figures["judged_by"]["kind"] == "python" and figures["task"] == "jsonl"
    (cell,) = figures["sweep"]
    # every row's bonus is 0.5: the mean reward, and every sample's reward is positive
    assert cell["score"] == pytest.approx(0.5) and cell["accuracy"] == 1.0


def test_prompt_only_win_rate_needs_a_reward_without_a_reference(prompt_only_run):
    run, functions = prompt_only_run
    report = checkpoint_winrate(run, ns=[1], prompts=2, samples=2)
    assert report.reward_policy.mean == pytest.approx(0.5)
    assert report.accuracy_policy.mean == 1.0  # the share of samples with a positive reward
    negative = checkpoint_winrate(
        run, ns=[1], prompts=2, samples=2, reward_function=f"{functions}:negative"
    )
    assert negative.accuracy_policy.mean == 0.0 and negative.reward_reference.mean == -0.5
    with pytest.raises(EvaluationError, match="--reward checker: task jsonl has prompt-only rows"):
        checkpoint_winrate(run, ns=[1], prompts=2, samples=2, reward="checker")
