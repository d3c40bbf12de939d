"""Prompt formatting: how a task's prompt becomes the text a model is given.

One path, :func:`format_prompt`, serves training, sampling, scoring and evaluation alike, so a
model is always asked the question the way it was trained on it. The recipe's
``task.chat_template`` (``auto``, ``on`` or ``off``) and ``task.system_prompt`` make a
:class:`PromptFormat`; a checkpoint records them in its ``tether.json`` (its ``task`` section),
so ``tether eval``, ``sample`` and ``winrate`` format prompts as its training did.

- ``auto`` (the default): the tokenizer's chat template when it has one (one user turn, the
  system prompt if any before it, and the assistant's opening), the prompt as is otherwise
  (the character tokenizer of the shipped models);
- ``on``: the chat template, and an error if the tokenizer has none;
- ``off``: the prompt as is, after the system prompt and a blank line when one is set.

A template that writes a default system turn of its own (SmolLM2's "You are a helpful AI
assistant...") keeps it unless ``task.system_prompt`` replaces it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

ChatTemplate = Literal["auto", "on", "off"]
CHAT_TEMPLATE_MODES: tuple[ChatTemplate, ...] = ("auto", "on", "off")


class PromptFormatError(ValueError):
    """A prompt format the tokenizer cannot give (``on`` without a chat template)."""


@dataclass(frozen=True)
class PromptFormat:
    """``task.chat_template`` and ``task.system_prompt``: how prompts are put to the model."""

    chat_template: ChatTemplate = "auto"
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.chat_template not in CHAT_TEMPLATE_MODES:
            raise PromptFormatError(
                f"task.chat_template must be auto, on or off (got {self.chat_template!r})"
            )

    @classmethod
    def of(cls, task: Any) -> PromptFormat:
        """The format a recipe's ``task`` section (a ``TaskConfig``) or a checkpoint's recorded
        ``task`` dict asks for; the defaults for a checkpoint that records neither key."""
        if task is None:
            return cls()
        get = (
            task.get
            if isinstance(task, Mapping)
            else lambda key, default: getattr(task, key, default)
        )
        return cls(get("chat_template", "auto") or "auto", get("system_prompt", None))

    def uses_template(self, tokenizer: Any) -> bool:
        """Whether prompts go through ``tokenizer``'s chat template."""
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if self.chat_template == "on" and not has_template:
            raise PromptFormatError(
                "task.chat_template on: the tokenizer has no chat template "
                "(use auto or off, or a tokenizer that has one)"
            )
        return has_template if self.chat_template == "auto" else self.chat_template == "on"


def format_prompt(tokenizer: Any, prompt: str, fmt: PromptFormat) -> str:
    """``prompt`` as the model is given it under ``fmt`` (module docstring)."""
    if fmt.uses_template(tokenizer):
        messages = [{"role": "user", "content": prompt}]
        if fmt.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": fmt.system_prompt})
        return str(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    if fmt.system_prompt:
        return f"{fmt.system_prompt}\n\n{prompt}"
    return prompt
