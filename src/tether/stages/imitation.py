"""Stages: a batch source plus an objective. The training loop knows nothing else.

A stage has ``next_batch()`` and ``loss(model, batch) -> (loss, stats)``, and a
``state_dict()`` holding whatever resuming needs besides the model and optimizer. The MLE stage
draws fresh problems from the task's generator every step (no fixed dataset, no epochs).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether import distributed
from tether.batches import TokenBatch, collate_token_rows
from tether.config import Recipe
from tether.generation.rollouts import make_rollouts
from tether.objectives import (
    iqlearn_loss,
    label_smoothed_mle_loss,
    lambda_schedule,
    mle_entropy_loss,
    mle_loss,
    shifted_token_logprobs,
)
from tether.scoring import bucketed
from tether.tasks import task_from_config
from tether.tasks.prompts import prompt_text

# optional: ``save_extra(folder)`` writes files that belong beside each checkpoint's weights;
# ``evaluate(model) -> dict`` adds the stage's own figures to each evaluation, and
# ``generation_eval = False`` turns off the task's generation-based evaluation


@dataclass
class DemoBatch:
    """Demonstrations (and, for online IQLearn, policy samples) as one right-padded batch."""

    tokens: TokenBatch
    terminated: torch.Tensor  # [B] bool: the row ends with EOS (not cut by the length limit)
    is_expert: torch.Tensor | None  # [B] bool; None when every row is a demonstration

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens


class ImitationStage:
    """Learning from the task's demonstrations (docs/methods.md §4), one batch source for three
    objectives: ``train.stage: mle`` (completion-only maximum likelihood, plus an entropy
    bonus when ``imitation.entropy_coef`` > 0, or label-smoothed when
    ``imitation.label_smoothing`` > 0: the support-preserving behaviour cloning of
    demonstration-regularised RL, docs/methods.md §6) and ``train.stage: iqlearn`` (TD-regularised
    MLE; online when ``imitation.online_fraction`` > 0: that share of each batch is completions
    sampled from the policy for fresh prompts). Problems are drawn fresh from the task's
    generator every step, or from its fixed pool with ``task.train_size``."""

    epochs_per_batch = 1

    def __init__(
        self,
        recipe: Recipe,
        tokenizer: PreTrainedTokenizerBase,
        model: PreTrainedModel,
        device: torch.device,
    ):
        self.method = recipe.train.stage
        self.cfg = recipe.imitation
        self.tokenizer = tokenizer
        self.model = model
        self.batch_size = recipe.train.batch_size
        self.task = task_from_config(recipe.task, recipe.seed)
        self.rng = random.Random(recipe.seed)
        self.generator = torch.Generator(device=device).manual_seed(
            distributed.rank_seed(recipe.seed)
        )
        self.device = device
        self.step = 0  # batches drawn: drives the λ warm-up
        online = self.cfg.online_fraction if self.method == "iqlearn" else 0.0
        self.n_policy = min(round(online * self.batch_size), self.batch_size - 1)
        self.rollouts = make_rollouts(recipe, model, tokenizer, device) if self.n_policy else None

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.getstate(),
            "generator": self.generator.get_state(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.generator.set_state(state["generator"])
        self.step = state["step"]

    def next_batch(self) -> DemoBatch:
        self.step += 1
        problems = [self.task.pretrain_problem(self.rng) for _ in range(self.batch_size)]
        # across processes each keeps its share of the demonstrations and of the policy rows
        n_expert = self.batch_size - self.n_policy
        experts = distributed.shard(problems[:n_expert], "train.batch_size (demonstrations)")
        policy_rows = distributed.shard(
            problems[n_expert:], "imitation.online_fraction × train.batch_size (policy rows)"
        )
        problems, n_expert = experts + policy_rows, len(experts)
        prompts = [prompt_text(self.tokenizer, p.prompt) for p in problems]
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        targets = [p.target for p in problems[:n_expert]]
        eos = [self.tokenizer.eos_token_id]
        completions = [
            c + eos for c in self.tokenizer(targets, add_special_tokens=False)["input_ids"]
        ]
        terminated = [True] * n_expert  # demonstrations end with EOS
        if self.rollouts is not None:  # online IQLearn: the rest of the batch is policy samples
            out = self.rollouts(
                self.model,
                prompts[n_expert:],
                max_new_tokens=self.task.max_new_tokens(),
                temperature=self.cfg.online_temperature,
                generator=self.generator,
            )
            completions += out.token_rows()[1]
            terminated += out.finished
        tokens = collate_token_rows(prompt_ids, completions, self.tokenizer.pad_token_id or 0)
        is_expert = None
        if self.n_policy:
            is_expert = torch.arange(len(problems), device=self.device) < n_expert
        return DemoBatch(
            tokens.to(self.device), torch.tensor(terminated, device=self.device), is_expert
        )

    def loss(
        self, model: PreTrainedModel, batch: DemoBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        tokens = batch.tokens
        ids, attention = tokens.input_ids, tokens.attention_mask
        plain = self.cfg.label_smoothing == 0 and self.cfg.entropy_coef == 0
        if self.method == "mle" and plain:  # log-probs group by group: no [B, L, V] copy
            return mle_loss(
                bucketed(model, ids, attention, shifted_token_logprobs), tokens.loss_mask
            )
        logits = bucketed(model, ids, attention)  # rows in length groups (tether.scoring)
        if self.method == "mle":
            if self.cfg.label_smoothing > 0:  # support-preserving behaviour cloning
                return label_smoothed_mle_loss(
                    logits, tokens.input_ids, tokens.loss_mask, self.cfg.label_smoothing
                )
            return mle_entropy_loss(
                logits, tokens.input_ids, tokens.loss_mask, self.cfg.entropy_coef
            )
        lam = lambda_schedule(self.step, self.cfg.lam, self.cfg.lam_warmup_steps)
        loss, stats = iqlearn_loss(
            logits,
            tokens.input_ids,
            tokens.loss_mask,
            batch.terminated,
            lam=lam,
            gamma=self.cfg.gamma,
            is_expert=batch.is_expert,
            alpha_mix=self.cfg.online_fraction,
        )
        return loss, {**stats, "lambda": lam}
