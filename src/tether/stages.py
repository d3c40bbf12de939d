"""Stages: a batch source plus an objective. The training loop knows nothing else.

A stage has ``next_batch()`` and ``loss(model, batch) -> (loss, stats)``, and a
``state_dict()`` holding whatever resuming needs besides the model and optimizer. The MLE stage
draws fresh problems from the task's generator every step (no fixed dataset, no epochs).
"""

from __future__ import annotations

import random
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.config import Recipe
from tether.data import TokenBatch, collate_pairs
from tether.objectives import mle_loss, shifted_token_logprobs
from tether.tasks import get_task


class Stage(Protocol):
    epochs_per_batch: int  # optimizer steps on each batch (PPO: several)

    def next_batch(self) -> Any: ...

    def loss(self, model: PreTrainedModel, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...

    def parameters(self) -> list[torch.nn.Parameter]: ...  # trainable besides the model's

    # what ``--resume`` needs besides the model and optimizer: data position, RNGs, extra modules
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class MLEStage:
    """Completion-only maximum likelihood on the task's pre-training distribution."""

    epochs_per_batch = 1

    def __init__(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, device: torch.device):
        self.tokenizer = tokenizer
        self.batch_size = recipe.train.batch_size
        self.task = get_task(recipe.task.name, recipe.task.max_digits, recipe.task.long_fraction)
        self.rng = random.Random(recipe.seed)
        self.device = device

    def next_batch(self) -> TokenBatch:
        problems = [self.task.pretrain_problem(self.rng) for _ in range(self.batch_size)]
        batch = collate_pairs(
            self.tokenizer, [p.prompt for p in problems], [p.target for p in problems]
        )
        return batch.to(self.device)

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])

    def loss(
        self, model: PreTrainedModel, batch: TokenBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logprobs = shifted_token_logprobs(logits, batch.input_ids)
        return mle_loss(logprobs, batch.loss_mask)


def make_stage(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, device: torch.device
) -> Stage:
    if recipe.train.stage == "mle":
        return MLEStage(recipe, tokenizer, device)
    if recipe.train.stage == "rl":
        from tether.rl import RLStage

        return RLStage(recipe, tokenizer, model, device)
    raise ValueError(f"train.stage: unknown stage {recipe.train.stage!r}")
