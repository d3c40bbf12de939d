"""Token batches: the one shape every objective consumes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class TokenBatch:
    """Right-padded prompt+completion sequences.

    ``loss_mask[b, t]`` is 1 where token ``t`` belongs to the completion (EOS included), so
    the objective predicts it from position ``t - 1``; prompt and padding carry no loss.
    """

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long, 1 for real tokens
    loss_mask: torch.Tensor  # [B, L] float, 1 for completion tokens

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.loss_mask))
        )

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate_pairs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    add_eos: bool = True,
) -> TokenBatch:
    """Tokenise prompt and completion separately (so the boundary is exact) and pad right."""
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return collate_token_rows(prompt_ids, [c + eos for c in completion_ids], pad)


def collate_token_rows(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad: int
) -> TokenBatch:
    """Prompt + completion token rows, right-padded; the loss mask covers the completion."""
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    loss = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (p, row) in enumerate(zip(prompt_ids, rows, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        attn[i, : len(row)] = 1
        loss[i, len(p) : len(row)] = 1.0
    return TokenBatch(ids, attn, loss)
