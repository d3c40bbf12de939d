"""Prompt formatting: how a task's prompt becomes the text a model is given."""

from __future__ import annotations

from typing import Any


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model expects it: wrapped in the chat template (one user turn and the
    assistant's opening) when the tokenizer has one, as is for the char tokenizer."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return str(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    return prompt
