"""The stage contract: what the training loop asks of every method."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from transformers import PreTrainedModel

from tether.tasks import Task


class Stage(Protocol):
    epochs_per_batch: int  # optimizer steps on each batch (PPO: several)
    task: Task  # where the problems come from; evaluation uses the same one

    def next_batch(self) -> Any: ...

    def loss(self, model: PreTrainedModel, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...

    def parameters(self) -> list[torch.nn.Parameter]: ...  # trainable besides the model's

    # what ``--resume`` needs besides the model and optimizer: data position, RNGs, extra modules
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
