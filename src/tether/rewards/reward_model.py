"""A learned reward model: the causal LM trained by ``train.stage: reward-model`` plus its
scalar head, saved beside the weights as ``reward_head.safetensors``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.batches import collate_pairs
from tether.models.loading import (
    ModelLoadError,
    checkpoint_task,
    load_model_and_tokenizer,
    resolve_checkpoint,
)
from tether.tasks.prompts import PromptFormat, format_prompt

REWARD_HEAD_FILE = "reward_head.safetensors"


# ----------------------------------------------------------------------------- reward model


def last_token_scores(
    model: nn.Module, head: nn.Linear, input_ids: Tensor, attention_mask: Tensor
) -> Tensor:
    """s = head(last hidden state at the last real token) per right-padded row: [B]."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    last = attention_mask.sum(dim=1) - 1
    hidden = out.hidden_states[-1][torch.arange(input_ids.shape[0], device=last.device), last]
    return head(hidden.float()).squeeze(-1)


def save_reward_head(head: nn.Linear, directory: str | Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    meta = {
        "format": "tether-reward-head",
        "pooling": "last_token",
        "hidden_size": str(head.in_features),
    }
    save_file(state, str(Path(directory) / REWARD_HEAD_FILE), metadata=meta)


class RewardModel(nn.Module):
    """A trained reward model: the checkpoint's causal LM body plus its scalar head."""

    def __init__(
        self,
        lm: PreTrainedModel,
        head: nn.Linear,
        tokenizer: PreTrainedTokenizerBase,
        prompt_format: PromptFormat | None = None,
    ):
        super().__init__()
        self.lm = lm
        self.head = head
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format or PromptFormat()  # as its training formatted them

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Scores [B] of right-padded rows (prompt + response + EOS, as in training)."""
        return last_token_scores(self.lm, self.head, input_ids, attention_mask)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        """Scores [B] of responses to prompts, formatted and tokenised as in training."""
        tokens = collate_pairs(
            self.tokenizer,
            [format_prompt(self.tokenizer, p, self.prompt_format) for p in prompts],
            responses,
        ).to(self.head.weight.device)
        return self.forward(tokens.input_ids, tokens.attention_mask)


def load_reward_model(name_or_path: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    """Load a ``train.stage: reward-model`` checkpoint (or run directory): the causal LM with
    ``from_pretrained`` and its head from :data:`REWARD_HEAD_FILE`, in eval mode. Raises
    :class:`~tether.models.loading.ModelLoadError` for a checkpoint without a head."""
    path = resolve_checkpoint(str(name_or_path))
    head_file = path / REWARD_HEAD_FILE
    if not head_file.is_file():  # a language model (a pretrained one's GGUF file too)
        raise ModelLoadError(
            f"checkpoint {str(path)!r}: no {REWARD_HEAD_FILE} (not a reward-model checkpoint; "
            f"train one with train.stage reward-model and model.init {name_or_path})"
        )
    lm, tokenizer = load_model_and_tokenizer(str(path), device=device)
    state = load_file(str(head_file))
    head = nn.Linear(state["weight"].shape[1], 1).to(device)
    head.load_state_dict(state)
    return RewardModel(lm, head, tokenizer, PromptFormat.of(checkpoint_task(path))).eval()
