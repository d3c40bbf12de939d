"""The stage contract: what the training loop asks of every method, and the set-up they share.

A stage is a batch source plus a loss (plus a reference and a schedule). The loop builds one
with :func:`make_stage` (the class the registry row of ``train.stage`` names) and then only
calls the hooks declared on :class:`Stage`: ``next_batch`` and ``loss`` every step
(``micro_batches`` between them with ``train.micro_batch_size``), ``parameters`` for the
optimizer, ``state_dict`` / ``load_state_dict`` / ``save_extra`` /
``checkpoint_metadata`` for checkpoints, ``evaluate`` (with ``generation_eval``) at each
evaluation, ``frozen_models`` for precision and compilation. Every hook but the first two has a
default, so a new stage writes only what it changes.

The common set-up is written once, in :meth:`Stage.__init__`: the task, the problem stream's
RNG (the same on every process), the rank-seeded sampling generator, and, as the stage's
registry row (:mod:`tether.stages.registry`) says, the frozen reference (``model.init``), the
rollout backend (``train.sampler``) and the reward (``reward``).
"""

from __future__ import annotations

import importlib
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether import distributed
from tether.batches import Batch, Share, unit_parts
from tether.config import Recipe
from tether.generation.rollouts import HFRolloutBackend, RolloutBackend
from tether.generation.vllm import VLLMRolloutBackend
from tether.models.lora import reference_policy
from tether.rewards.functions import RewardFunction, build_reward
from tether.stages.registry import STAGES, StageSpec
from tether.tasks import Task, task_from_config

BatchT = TypeVar("BatchT", bound=Batch)


class Stage(ABC, Generic[BatchT]):
    """A training method: batches, their loss, and what resuming and evaluating need."""

    epochs_per_batch: int = 1  # optimizer steps on each batch (PPO: several)
    splits_batches: bool = False  # micro_batches can cut its batches (train.micro_batch_size)
    generation_eval: bool = True  # the task's generation-based evaluation applies to it
    # frozen models the stage scores or samples with besides the policy (cast to
    # train.precision): the reference (model.init), DPG's adaptive proposal
    reference: nn.Module | None
    proposal: nn.Module | None = None
    rollouts: RolloutBackend | None  # draws the policy's samples (train.sampler)
    # judges samples (the recipe's reward section, raw: a stage may train on a transform of
    # it, as CTRL's calibration), and the held-out completions at each evaluation
    reward: RewardFunction | None

    def __init__(
        self,
        recipe: Recipe,
        tokenizer: PreTrainedTokenizerBase,
        policy: PreTrainedModel,
        device: torch.device,
    ) -> None:
        self.spec: StageSpec = STAGES[recipe.train.stage]
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.policy = policy
        self.device = device
        self.task: Task = task_from_config(recipe.task, recipe.seed)
        # the problem stream: the global batch's problems, the same on every process
        self.rng = random.Random(recipe.seed)
        # sampling: each process draws its own share with its own seed
        self.generator = torch.Generator(device=device).manual_seed(
            distributed.rank_seed(recipe.seed)
        )
        self.reference = (
            reference_policy(recipe, policy, device) if self.spec.needs_reference else None
        )
        self.reward = (
            build_reward(reward_recipe(recipe, self.spec), self.task, device)
            if self.spec.scores_with_reward
            else None
        )
        self.rollouts = (
            make_rollout_backend(recipe, policy, tokenizer, device)
            if recipe.samples_from_policy
            else None
        )
        self.last_timing: dict[str, float] = {}  # where the last batch's time went (bench)

    # ------------------------------------------------------------------ every step

    @abstractmethod
    def next_batch(self) -> BatchT:
        """This process's share of the next global batch."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: BatchT) -> tuple[Tensor, dict[str, float]]:
        """The loss to minimise on ``batch`` and the figures to log (plain floats)."""

    def micro_batches(self, model: nn.Module, batch: BatchT, size: int) -> list[BatchT]:
        """``batch`` cut into micro-batches of at most ``size`` rows (``train.micro_batch_size``),
        whole units each (a unit whose rows the loss reads together: an RLOO or DPG prompt
        group, a pair), each marked with its :class:`~tether.batches.Share`, so that

            Σ_i w_i·loss(model, micro_i) = loss(model, batch)    (value and gradient)

        and Σ_i w_i·stats_i gives the whole batch's figures (those that are means). The loop
        runs each micro-batch's forward and backward in turn (the gradients accumulate) and
        steps once. ``[batch]`` when it fits in ``size`` rows. The default cannot cut: it
        returns ``[batch]``, and the loop refuses ``train.micro_batch_size`` for a stage whose
        ``splits_batches`` is false. ``model`` is the policy as ``loss`` receives it, for a
        stage that needs a pass over the whole batch first (REINFORCE's baseline)."""
        return [batch]

    def updates(self, batch: BatchT) -> list[BatchT]:
        """The batches of the optimizer steps taken on one drawn ``batch``, in order: the batch
        itself ``epochs_per_batch`` times by default (PPO's epochs); the RL stage splits it
        into shuffled minibatches (``rl.minibatches``)."""
        return [batch] * self.epochs_per_batch

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters besides the model's (a value head, a reward head)."""
        return []

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """What ``--resume`` needs besides the model and optimizer: the data position, the
        RNGs, extra modules. Subclasses add to this one."""
        return {"rng": self.rng.getstate(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.generator.set_state(state["generator"])

    def save_extra(self, folder: Path) -> None:
        """Write files that belong beside each checkpoint's weights (a reward model's head),
        into the checkpoint's temporary folder, so they land atomically with the weights."""

    def checkpoint_metadata(self) -> dict[str, Any]:
        """Entries for each checkpoint's ``tether.json`` beyond the recipe's common ones."""
        return {}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The stage's own figures at each evaluation (pairwise accuracy, exact KLs), added
        to the task's generation-based ones (when ``generation_eval``)."""
        return {}

    def frozen_models(self) -> list[nn.Module]:
        """The models the stage runs besides the policy: its reference and DPG's proposal,
        where it has them (``train.precision`` casts their forward passes too)."""
        return [m for m in (self.reference, self.proposal) if m is not None]


def reward_recipe(recipe: Recipe, spec: StageSpec) -> Recipe:
    """The recipe whose ``reward`` section the stage scores with: the recipe itself, with an
    unset ``reward.kind`` (null) replaced by the stage's default (its registry row's
    ``default_reward``: the checker, or DPG's graded score)."""
    if recipe.reward.kind is not None:
        return recipe
    reward = recipe.reward.model_copy(update={"kind": spec.default_reward})
    return recipe.model_copy(update={"reward": reward})


def micro_parts(
    units: int, unit_rows: int, size: int, device: torch.device
) -> list[tuple[Tensor, Share]]:
    """The unit indices of each micro-batch (consecutive whole units with at most ``size`` rows,
    :func:`~tether.batches.unit_parts`) and its share w_i = units_i / units (no denominators
    yet: ``dataclasses.replace`` adds what the stage's loss needs)."""
    return [
        (torch.arange(r.start, r.stop, device=device), Share(weight=len(r) / units))
        for r in unit_parts(units, unit_rows, size)
    ]


def sample_health(
    texts: Sequence[str], finished: Sequence[bool], reward_groups: Tensor
) -> dict[str, float]:
    """The figures of a step's samples that :mod:`tether.engine.signals` watches: the share of
    prompt groups (rows of ``reward_groups`` [G, k], the rewards of one prompt's samples)
    whose rewards are all equal (no learning signal: ``frac_constant_groups``), of completions
    cut at ``max_new_tokens`` (not ``finished``: ``frac_truncated``) and of blank completions
    (``frac_empty``)."""
    groups = reward_groups.detach().float()
    constant = (groups.amax(dim=1) == groups.amin(dim=1)).float().mean()
    n = max(len(texts), 1)
    return {
        "frac_constant_groups": float(constant),
        "frac_truncated": sum(not f for f in finished) / n,
        "frac_empty": sum(not t.strip() for t in texts) / n,
    }


def make_stage(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, device: torch.device
) -> Stage[Any]:
    """The stage that trains ``recipe.train.stage``: the class its registry row names."""
    module, _, name = STAGES[recipe.train.stage].stage_class.partition(":")
    stage_class = getattr(importlib.import_module(module), name)
    stage: Stage[Any] = stage_class(recipe, tokenizer, model, device)
    return stage


def make_rollout_backend(
    recipe: Recipe, policy: nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> RolloutBackend:
    """The recipe's rollout backend (``train.sampler``) for ``policy``."""
    if recipe.train.sampler == "vllm":
        return VLLMRolloutBackend(recipe, policy, tokenizer, device)
    # bf16: the log-probs must be the losses' own (autocast) numbers, where a loss reads them
    rescore = recipe.train.precision != "fp32" and recipe.reads_sampler_logprobs
    dtype = torch.bfloat16 if recipe.train.precision == "bf16" else None  # bf16 rollouts too
    return HFRolloutBackend(tokenizer, rescore=rescore, dtype=dtype)
