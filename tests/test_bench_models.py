"""`tether bench` takes any model tether loads: a plain Hugging Face folder (no tether.json, so
no recorded task: the addition prompts get the recipe's default N) with a real BPE tokenizer."""

import json

import pytest
from typer.testing import CliRunner

from real_tokenizer import save_tiny_llama
from tether.cli import app

runner = CliRunner()


def test_bench_rl_takes_a_plain_hugging_face_folder(tmp_path):
    pytest.importorskip("trl")
    folder = save_tiny_llama(tmp_path / "model")  # no pad token, as many real tokenizers
    args = ["bench", "rl", "--model", str(folder), "--prompts", "1", "--group", "2"]
    result = runner.invoke(app, [*args, "--max-new-tokens", "4", "--steps", "1", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["job"]["model"] == str(folder)
    assert doc["tether"]["completions_per_s"] > 0 and doc["trl_grpo"]["completions_per_s"] > 0
