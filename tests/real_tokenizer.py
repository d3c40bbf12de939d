"""A tiny randomly initialised Llama with a real byte-level BPE tokenizer, built here (no
download): the general path of a real pretrained model (a chat template, EOS as the stop, no
pad token, multi-character tokens) in fast unit tests.

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on generated text
(arithmetic questions and answers), wrapped as a ``PreTrainedTokenizerFast`` with a ChatML
template (SmolLM2's layout: ``<|im_start|>role\\ncontent<|im_end|>\\n``), ``<|im_end|>`` as its
EOS and, like many real tokenizers, no pad token. Built once per process.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
VOCAB_SIZE = 400  # the 256 bytes, three special tokens and about 140 merges


def _corpus(lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["What", "is", "the", "sum", "of", "and", "Answer", "with", "number", "only"]
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append(f"What is {a}+{b}? Answer with the number only. {a + b}")
        out.append(" ".join(rng.choice(words) for _ in range(8)))
    return out


@functools.lru_cache(maxsize=1)
def _trained_backend() -> str:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    return backend.to_str()  # a string: every caller gets its own copy


def bpe_tokenizer(pad_token: str | None = None) -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer with the chat template and EOS; ``pad_token`` None (the
    default) leaves it without a pad token."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_backend()),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=pad_token,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, width-32 Llama for ``tokenizer``, randomly initialised from ``seed``, with
    untied input and output embeddings (so the output rows can be edited alone)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@torch.no_grad()
def greedy_ids(model: LlamaForCausalLM, ids: list[int], steps: int) -> list[int]:
    """``steps`` greedy tokens after ``ids`` by plain forward passes (no cache, no sampler)."""
    ids, out = list(ids), []
    for _ in range(steps):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        out.append(token)
    return out


@torch.no_grad()
def end_after(model: LlamaForCausalLM, prompt_ids: list[int], tokens: int) -> list[int]:
    """Make ``model``'s greedy completion of ``prompt_ids`` end with EOS after ``tokens``
    tokens: the output rows of EOS and of the token greedy decoding would pick at step
    ``tokens`` + 1 are swapped (the inputs are untouched, so the first ``tokens`` picks stay
    as long as neither token is among them). Returns the expected completion, EOS included."""
    eos = model.config.eos_token_id
    first = greedy_ids(model, prompt_ids, tokens + 1)
    *head, swap = first
    assert eos not in first and swap not in head, "pick another prompt or seed"
    weight = model.lm_head.weight
    weight[[eos, swap]] = weight[[swap, eos]].clone()
    assert greedy_ids(model, prompt_ids, tokens + 1) == [*head, eos]
    return [*head, eos]


def save_tiny_llama(folder: Path, seed: int = 0, pad_token: str | None = None) -> Path:
    """A tiny Llama and its BPE tokenizer saved as a plain Hugging Face folder (no
    ``tether.json``): what a user's own model looks like to tether."""
    tok = bpe_tokenizer(pad_token)
    model = tiny_llama(tok, seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
