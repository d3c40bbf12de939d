"""Completions of task prompts: what ``tether sample``, ``tether.sample`` and the sampled
evaluations (win rate, diversity, the implicit reward) draw.

Every prompt goes through the one formatting path, :func:`tether.tasks.prompts.format_prompt`
(the chat template where the tokenizer has one, the text as is for the char tokenizer), and
then :func:`tether.generation.sampler.sample`, with one ``torch.Generator`` seeded from
``seed`` on the model's device, so a call's samples depend on its arguments only.

- :func:`sample_rows`: the completions of already-loaded models, as texts and as the token
  rows the sampler produced (what scoring them as training rows needs).
- :func:`sample_completions` / :func:`sample_texts`: the same for a shipped model name, a
  checkpoint or run directory, or a loaded model with its tokenizer; the public
  ``tether.sample`` is :func:`sample_texts`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tether.generation.sampler import sample
from tether.models.loading import (
    ModelLoadError,
    checkpoint_task,
    eval_mode,
    load_model_and_tokenizer,
    model_device,
    resolve_checkpoint,
)
from tether.tasks.prompts import PromptFormat, format_prompt

__all__ = [
    "Completion",
    "SampledRows",
    "checkpoint_prompt_format",
    "sample_completions",
    "sample_rows",
    "sample_texts",
]


@dataclass
class SampledRows:
    """One completion per prompt, in prompt order: decoded texts and the sampler's own ids."""

    texts: list[str] = field(default_factory=list)  # special tokens skipped
    prompt_rows: list[list[int]] = field(default_factory=list)  # the formatted prompt's ids
    completion_rows: list[list[int]] = field(default_factory=list)  # EOS included if generated
    finished: list[bool] = field(default_factory=list)  # False: cut at max_new_tokens
    logprobs: list[float] = field(default_factory=list)  # Σ_t log π_T(y_t | ·) over the row


def sample_rows(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    prompt_format: PromptFormat,
    batch_size: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> SampledRows:
    """Complete each of ``prompts`` (task prompts, formatted here in ``prompt_format``) once,
    ``batch_size`` rows at a time (None: all at once), from one generator seeded with
    ``seed``: the same as one ``sample`` call over all of them. ``on_batch(rows)`` is called
    after each batch (a progress bar). The model must be in eval mode."""
    texts = [format_prompt(tokenizer, p, prompt_format) for p in prompts]
    generator = torch.Generator(device=model_device(model)).manual_seed(seed)
    size = batch_size or max(len(texts), 1)
    out = SampledRows()
    for start in range(0, len(texts), size):
        s = sample(
            model,
            tokenizer,
            texts[start : start + size],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            generator=generator,
        )
        prompt_rows, completion_rows = s.token_rows()
        out.texts += s.texts
        out.prompt_rows += prompt_rows
        out.completion_rows += completion_rows
        out.finished += s.finished
        # the sampler's fp32 log-probs of the chosen tokens, summed over the real ones
        out.logprobs += [
            float(lp[m.bool()].sum()) for lp, m in zip(s.logprobs, s.completion_mask, strict=True)
        ]
        if on_batch is not None:
            on_batch(len(s.texts))
    return out


@dataclass(frozen=True)
class Completion:
    """One prompt's completion, as ``tether sample`` prints it."""

    prompt: str  # the task prompt, before formatting
    completion: str
    finished: bool  # ended with EOS (False: cut at max_new_tokens)
    logprob: float  # log-probability of the completion under the sampling distribution


def sample_completions(
    model: str | Path | Any,
    prompts: str | Sequence[str],
    *,
    tokenizer: Any = None,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int | None = None,
    prompt_format: PromptFormat | None = None,
) -> list[Completion]:
    """:func:`sample_texts` with each completion's prompt, end and log-probability."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(model, (str, Path)):
        if tokenizer is not None:
            raise ValueError("tokenizer goes with a loaded model, not with a model's name or path")
        if prompt_format is None:  # as the checkpoint was trained (its tether.json)
            prompt_format = PromptFormat.of(recorded_task(str(model)))
        model, tokenizer = load_model_and_tokenizer(str(model))
    elif tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer: pass tokenizer=")
    prompt_format = prompt_format or PromptFormat()
    with eval_mode(model):
        rows = sample_rows(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            prompt_format=prompt_format,
            batch_size=batch_size,
        )
    return [
        Completion(p, text, finished, logprob)
        for p, text, finished, logprob in zip(
            prompts, rows.texts, rows.finished, rows.logprobs, strict=True
        )
    ]


def sample_texts(
    model: str | Path | Any,
    prompts: str | Sequence[str],
    *,
    tokenizer: Any = None,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int | None = None,
    prompt_format: PromptFormat | None = None,
) -> list[str]:
    """Complete each prompt with a model; the completions, in prompt order.

    ``model`` is a shipped model name (``tether models``), a checkpoint or run directory, or
    a loaded causal LM, which then needs its ``tokenizer``. ``prompts`` are task prompts (one
    string or several): each is formatted as training formats it
    (:func:`tether.tasks.prompts.format_prompt`: the chat template where the tokenizer has
    one) and completed with up to ``max_new_tokens`` tokens, stopping at EOS. ``temperature``
    0 is greedy; above 0, tokens are drawn from ``softmax(logits / temperature)`` with a
    generator seeded from ``seed``, so a call is reproducible. ``batch_size`` rows are sampled
    at once (None: all). A loaded model is sampled in eval mode and given back in the mode it
    was in.

    >>> import tether
    >>> tether.sample("addition-n3", "Input:\\n12+34\\nTarget:")[0][-3:]  # doctest: +SKIP
    '4 6'
    """
    completions = sample_completions(
        model,
        prompts,
        tokenizer=tokenizer,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        prompt_format=prompt_format,
    )
    return [c.completion for c in completions]


def checkpoint_prompt_format(
    model: str | Path, chat_template: str | None = None, system_prompt: str | None = None
) -> PromptFormat:
    """The prompt format a checkpoint was trained with (its ``tether.json``'s task section:
    ``task.chat_template`` and ``task.system_prompt``; the defaults, ``auto`` and none, for a
    model that records none), with ``chat_template`` (auto, on or off) and ``system_prompt``
    in place of the recorded ones where given; ``system_prompt=""`` means none (a chat
    template's own default system turn, if it has one). What ``--chat-template`` and
    ``--system-prompt`` of ``tether sample``, ``eval`` and ``winrate`` ask for."""
    recorded = PromptFormat.of(recorded_task(str(model)))
    template = recorded.chat_template if chat_template is None else chat_template
    system = recorded.system_prompt if system_prompt is None else (system_prompt or None)
    return PromptFormat(template, system)  # type: ignore[arg-type]  # checked on creation


def recorded_task(model: str) -> dict[str, Any]:
    """The ``task`` section a checkpoint records (empty for a model not trained by tether, such
    as a shipped name without one or a plain Hugging Face folder)."""
    try:
        return checkpoint_task(resolve_checkpoint(model))
    except ModelLoadError:
        return {}
