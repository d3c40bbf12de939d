"""The general path of a real pretrained model, on a tiny random Llama with a real byte-level
BPE tokenizer (tests/real_tokenizer.py): a chat template, EOS as the stop, no pad token. The
sampler stops on EOS, ``tether sample`` applies the chat template (and ``--chat-template off``
does not), rows of different lengths collate and score without a pad token, and a prompt-only
JSONL file with a Python reward that reads a column runs one step of every sampling stage."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from real_tokenizer import bpe_tokenizer, end_after, save_tiny_llama, tiny_llama
from tether.cli import app
from tether.eval.winrate import sequence_logprobs
from tether.generation.sampler import pad_id
from tether.generation.texts import checkpoint_prompt_format, sample_completions, sample_rows
from tether.models.loading import load_model_and_tokenizer
from tether.tasks.prompts import PromptFormat, format_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
QUESTION = "What is 23+58?"
AUTO, OFF = PromptFormat(), PromptFormat("off")


def templated(tok, prompt, system=None):
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def ending_model():
    """The tiny Llama edited so that its greedy answer to QUESTION (in the chat template)
    is three tokens and EOS; the tokenizer has no pad token."""
    tok = bpe_tokenizer()
    model = tiny_llama(tok)
    expected = end_after(model, tok(templated(tok, QUESTION))["input_ids"], 3)
    return model, tok, expected


@pytest.fixture(scope="module")
def saved_ending_model(ending_model, tmp_path_factory):
    model, tok, _ = ending_model
    folder = tmp_path_factory.mktemp("real-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_the_tokenizer_is_a_real_bpe_without_a_pad_token():
    tok = bpe_tokenizer()
    assert tok.pad_token is None and tok.eos_token == "<|im_end|>" and tok.chat_template
    ids = tok(QUESTION, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(QUESTION) and tok.decode(ids) == QUESTION  # merges, exact round trip
    assert pad_id(tok) == tok.eos_token_id  # the sampler's fallback


def test_sampling_stops_on_eos_in_the_chat_template(ending_model):
    model, tok, expected = ending_model
    rows = sample_rows(
        model, tok, [QUESTION], max_new_tokens=10, temperature=0.0, seed=0, prompt_format=AUTO
    )
    assert rows.prompt_rows[0] == tok(templated(tok, QUESTION))["input_ids"]
    assert rows.completion_rows[0] == expected and rows.finished == [True]
    assert rows.texts[0] == tok.decode(expected[:-1])  # EOS is not in the text
    # without the template the model is asked something else and runs to the limit
    raw = sample_rows(
        model, tok, [QUESTION], max_new_tokens=10, temperature=0.0, seed=0, prompt_format=OFF
    )
    assert raw.prompt_rows[0] == tok(QUESTION)["input_ids"] and raw.finished == [False]


def _cli_sample(folder, *options):
    args = ["sample", str(folder), "--prompt", QUESTION, "--max-new-tokens", "10", "--json"]
    result = runner.invoke(app, [*args, *options])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    return row


def test_tether_sample_applies_the_chat_template_and_off_does_not(ending_model, saved_ending_model):
    model, tok, expected = ending_model
    auto = _cli_sample(saved_ending_model)
    assert auto["completion"] == tok.decode(expected[:-1]) and auto["finished"]
    # the same as the library given the templated text with formatting off
    (by_hand,) = sample_completions(
        model, templated(tok, QUESTION), tokenizer=tok, max_new_tokens=10, prompt_format=OFF
    )
    assert auto["completion"] == by_hand.completion
    assert auto["logprob"] == pytest.approx(by_hand.logprob, abs=1e-5)
    off = _cli_sample(saved_ending_model, "--chat-template", "off")
    (raw,) = sample_completions(
        model, QUESTION, tokenizer=tok, max_new_tokens=10, prompt_format=OFF
    )
    assert off["completion"] == raw.completion and not off["finished"]
    assert off["completion"] != auto["completion"]
    system = _cli_sample(saved_ending_model, "--system-prompt", "Be brief.")
    (with_system,) = sample_completions(
        model,
        templated(tok, QUESTION, system="Be brief."),
        tokenizer=tok,
        max_new_tokens=10,
        prompt_format=OFF,
    )
    assert system["completion"] == with_system.completion


def test_a_bad_chat_template_option_is_one_line(saved_ending_model, tiny_checkpoint):
    for folder, option, needle in [
        (saved_ending_model, "sometimes", "--chat-template 'sometimes': choose auto, on or off"),
        (tiny_checkpoint, "on", "task.chat_template on: the tokenizer has no chat template"),
    ]:
        result = runner.invoke(
            app, ["sample", str(folder), "--prompt", "1+2=", "--chat-template", option]
        )
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output


def test_the_prompt_format_defaults_to_what_the_checkpoint_records(saved_ending_model, tmp_path):
    assert checkpoint_prompt_format(saved_ending_model) == PromptFormat()  # records nothing
    folder = tmp_path / "trained"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    task = {"name": "jsonl", "chat_template": "off", "system_prompt": "Be brief."}
    (folder / "tether.json").write_text(json.dumps({"task": task}))
    assert checkpoint_prompt_format(folder) == PromptFormat("off", "Be brief.")
    assert checkpoint_prompt_format(folder, "on") == PromptFormat("on", "Be brief.")
    assert checkpoint_prompt_format(folder, None, "") == PromptFormat("off", None)


def test_rows_of_different_lengths_collate_and_score_without_a_pad_token(ending_model):
    """Left-padded prompts (sampling) and right-padded rows (scoring) padded with EOS, the
    fallback: every row's completion and log-probability are those it gets alone."""
    model, tok, _ = ending_model
    prompts = [QUESTION, "What is the sum of 1 and 2? Answer with the number only.", "Hi"]
    kwargs = dict(max_new_tokens=6, temperature=1.0, prompt_format=AUTO)
    together = sample_rows(model, tok, prompts, seed=0, batch_size=3, **kwargs)
    assert len({len(r) for r in together.prompt_rows}) == 3  # three prompt lengths
    scored = sequence_logprobs(
        model, together.prompt_rows, together.completion_rows, pad_id=pad_id(tok)
    )
    for i in range(3):
        alone = sequence_logprobs(
            model, together.prompt_rows[i : i + 1], together.completion_rows[i : i + 1], pad_id=0
        )
        assert float(scored[i]) == pytest.approx(float(alone[0]), abs=1e-4)
        # the sampler's own log-probability of the row is the scorer's
        assert together.logprobs[i] == pytest.approx(float(alone[0]), abs=1e-3)


def test_a_plain_folder_loads_with_its_tokenizer_and_no_pad_token(saved_ending_model):
    model, tok = load_model_and_tokenizer(str(saved_ending_model))
    assert tok.pad_token is None and tok.chat_template and not model.training
    assert format_prompt(tok, QUESTION, AUTO) == templated(bpe_tokenizer(), QUESTION)


REWARD = """
def reward(prompt, completion, answer, bonus=0.0):
    a, b = prompt.removeprefix("What is ").removesuffix("?").split("+")
    # each row's own columns: the answer matches its own prompt
    return bonus if answer == str(int(a) + int(b)) else -100.0
"""


@pytest.mark.parametrize("stage", ["rl", "online-dpo", "xpo", "dpg"])
def test_prompt_only_jsonl_and_a_python_reward_run_one_step_of_each_sampling_stage(stage, tmp_path):
    rows = [
        {"prompt": f"What is {a}+{b}?", "answer": str(a + b), "bonus": 0.25, "tests": [a, b]}
        for a, b in [(1, 2), (30, 4), (12, 12), (7, 70)]
    ]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "reward.py").write_text(REWARD)
    summary = _run(
        tmp_path,
        {"name": "jsonl", "path": str(data), "completion_field": None},
        train={"stage": stage, "steps": 1, "log_every": 1, "eval_every": 100, "batch_size": 2},
        rl={"algorithm": "rloo", "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4},
        preference={"max_new_tokens": 4},
        dpg={"samples_per_step": 4, "prompts_per_step": 2},
        reward={"kind": "python", "function": f"{tmp_path / 'reward.py'}:reward"},
    )
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    (step,) = [m for m in metrics if "reward" in m]
    assert step["reward"] == pytest.approx(0.25)  # every row's bonus: its columns reached it
    assert torch.isfinite(torch.tensor(step["loss"])) and summary["steps"] == 1


def _run(tmp_path, task, **sections):
    import tether

    recipe = {
        "name": "real-tokenizer",
        "task": task,
        "model": {"init": str(save_tiny_llama(tmp_path / "model"))},
        "train": {"steps": 1, "log_every": 1, "eval_every": 100, "batch_size": 2},
        "eval": {"n": 2},
        **sections,
    }  # a plain Hugging Face folder (no tether.json) as model.init
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return tether.train(tether.load_recipe(str(path)), tmp_path / "run", progress=False)


def test_demonstrations_collate_without_a_pad_token(tmp_path):
    """MLE on the chat-formatted demonstrations of a tokenizer without a pad token: rows of
    different lengths padded with the fallback; the loss is finite."""
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": "What is 1+2?", "completion": "3"}, {"prompt": "Hi", "completion": "Hello!"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = _run(tmp_path, {"name": "jsonl", "path": str(data)})
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    (step,) = [m for m in metrics if "loss" in m]
    assert summary["steps"] == 1 and torch.isfinite(torch.tensor(step["loss"]))
    assert step["loss"] > 1.0  # a random model: about log(400) nats per token, not 0


def test_prompt_only_rows_are_refused_by_a_stage_that_learns_from_demonstrations(tmp_path):
    """Refused when the recipe is read, before any run folder is written."""
    from tether.config import RecipeError

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1+2?", "answer": "3"}) + "\n")
    task = {"name": "jsonl", "path": str(data), "completion_field": None}
    with pytest.raises(RecipeError, match="train.stage mle learns from demonstrations"):
        _run(tmp_path, task)
    assert not (tmp_path / "run").exists()


def test_a_prompt_only_run_is_evaluated_and_compared_by_its_recorded_reward(tmp_path):
    """`tether eval` and `tether winrate` on the run: the task, the reward and the reference
    (model.init, a plain folder) come from its tether.json."""
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {a}+1?", "answer": str(a + 1), "bonus": 0.25} for a in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "reward.py").write_text(REWARD)
    _run(
        tmp_path,
        {"name": "jsonl", "path": str(data), "completion_field": None},
        train={"stage": "rl", "steps": 1, "log_every": 1, "eval_every": 100},
        rl={"algorithm": "rloo", "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4},
        reward={"kind": "python", "function": f"{tmp_path / 'reward.py'}:reward"},
    )
    run = tmp_path / "run"
    result = runner.invoke(app, ["eval", str(run), "--n", "2", "--k", "2", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["judged_by"]["kind"] == "python" and doc["sweep"][0]["score"] == pytest.approx(0.25)
    args = ["winrate", str(run), "--n", "1", "--prompts", "2", "--samples", "2"]
    result = runner.invoke(app, [*args, "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["mean_reward"]["policy"]["mean"] == pytest.approx(0.25)
    assert doc["reference"] == str(tmp_path / "model")
