"""The one prompt path (tether.tasks.prompts): task.chat_template auto | on | off and
task.system_prompt, the same in every stage, the sampler and evaluation."""

from __future__ import annotations

import pytest

from tether.config import load_recipe
from tether.models.loading import char_tokenizer
from tether.tasks import task_from_config
from tether.tasks.prompts import PromptFormat, PromptFormatError, format_prompt

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}: {{ m['content'] }}]{% endfor %}"
    "{% if add_generation_prompt %}[assistant: {% endif %}"
)


def chat_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_char_prompts_pass_through_unchanged():
    assert format_prompt(char_tokenizer(), "Sum 1 2:", PromptFormat()) == "Sum 1 2:"


def test_prompts_go_through_a_chat_template_when_there_is_one():
    assert format_prompt(chat_tokenizer(), "Sum 1 2:", PromptFormat()) == (
        "[user: Sum 1 2:][assistant: "
    )


def test_on_off_and_the_system_prompt():
    tok = chat_tokenizer()
    assert format_prompt(tok, "Q", PromptFormat("off")) == "Q"
    assert format_prompt(tok, "Q", PromptFormat("on")) == "[user: Q][assistant: "
    with_system = PromptFormat("auto", "Be brief.")
    assert format_prompt(tok, "Q", with_system) == "[system: Be brief.][user: Q][assistant: "
    # without a template the system prompt is the first paragraph
    assert format_prompt(char_tokenizer(), "Q", with_system) == "Be brief.\n\nQ"
    assert format_prompt(tok, "Q", PromptFormat("off", "Be brief.")) == "Be brief.\n\nQ"


def test_on_without_a_template_is_one_line_naming_the_key():
    with pytest.raises(PromptFormatError, match=r"^task.chat_template on: the tokenizer has no"):
        format_prompt(char_tokenizer(), "Q", PromptFormat("on"))


def test_the_format_comes_from_the_recipe_or_a_checkpoints_task_section():
    recipe = load_recipe(None, ["task.chat_template=off", "task.system_prompt=Be brief."])
    assert PromptFormat.of(recipe.task) == PromptFormat("off", "Be brief.")
    assert task_from_config(recipe.task).prompt_format == PromptFormat("off", "Be brief.")
    # tether.json of an older checkpoint records neither key: the defaults
    assert PromptFormat.of({"name": "addition", "max_digits": 3}) == PromptFormat()
    assert PromptFormat.of(None) == PromptFormat()


def test_a_bad_mode_is_refused_by_the_recipe():
    from tether.config import RecipeError

    with pytest.raises(RecipeError, match="task.chat_template"):
        load_recipe(None, ["task.chat_template=sometimes"])


def test_every_stage_formats_through_the_task(tmp_path):
    """The stages ask the task for the model's input: a system prompt set in the recipe reaches
    the rows a stage trains on (here MLE's demonstrations, with the char tokenizer)."""
    import torch

    from tether.engine.setup import build_policy
    from tether.stages.base import make_stage

    recipe = load_recipe(
        None,
        [
            "model.n_layer=1",
            "model.n_embd=16",
            "model.n_head=2",
            "train.batch_size=2",
            "task.system_prompt=SYS",
        ],
    )
    model, tok = build_policy(recipe)
    stage = make_stage(recipe, tok, model, torch.device("cpu"))
    batch = stage.next_batch()
    first = tok.decode(batch.tokens.input_ids[0])
    assert first.startswith("SYS\n\nInput:")
