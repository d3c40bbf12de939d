"""The imitation stage: learning from the task's demonstrations (docs/methods.md §4).

It draws fresh problems from the task's generator every step (no fixed dataset, no epochs),
or from its fixed pool with ``task.train_size``, and trains ``train.stage: mle`` or
``iqlearn`` on them (online IQLearn adds policy samples to each batch).

With ``train.micro_batch_size`` a batch is cut into micro-batches of rows whose token means
divide by w·N, N the whole batch's count; online IQLearn's micro-batches each hold
demonstrations and policy rows (its online term compares the two), so there are at most as
many as the batch has policy rows.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether import distributed
from tether.batches import DemonstrationBatch, Share, collate_token_rows
from tether.config import Recipe
from tether.objectives import (
    action_mask,
    iqlearn_loss,
    label_smoothed_mle_loss,
    lambda_schedule,
    mle_entropy_loss,
    mle_loss,
)
from tether.scoring import bucketed, loss_token_logprobs
from tether.stages.base import Stage, micro_parts


class ImitationStage(Stage[DemonstrationBatch]):
    """Learning from the task's demonstrations (docs/methods.md §4), one batch source for three
    objectives: ``train.stage: mle`` (completion-only maximum likelihood, plus an entropy
    bonus when ``imitation.entropy_coef`` > 0, or label-smoothed when
    ``imitation.label_smoothing`` > 0: the support-preserving behaviour cloning of
    demonstration-regularised RL, docs/methods.md §6) and ``train.stage: iqlearn`` (TD-regularised
    MLE; online when ``imitation.online_fraction`` > 0: that share of each batch is completions
    sampled from the policy for fresh prompts). Problems are drawn fresh from the task's
    generator every step, or from its fixed pool with ``task.train_size``."""

    splits_batches = True

    def __init__(
        self,
        recipe: Recipe,
        tokenizer: PreTrainedTokenizerBase,
        model: PreTrainedModel,
        device: torch.device,
    ):
        super().__init__(recipe, tokenizer, model, device)
        self.method = recipe.train.stage
        self.cfg = recipe.imitation
        self.batch_size = recipe.train.batch_size
        self.step = 0  # batches drawn: drives the λ warm-up
        online = self.cfg.online_fraction if recipe.samples_from_policy else 0.0
        self.n_policy = min(round(online * self.batch_size), self.batch_size - 1)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.step = state["step"]

    def next_batch(self) -> DemonstrationBatch:
        self.step += 1
        problems = [self.task.pretrain_problem(self.rng) for _ in range(self.batch_size)]
        # across processes each keeps its share of the demonstrations and of the policy rows
        n_expert = self.batch_size - self.n_policy
        experts = distributed.shard(problems[:n_expert], "train.batch_size (demonstrations)")
        policy_rows = distributed.shard(
            problems[n_expert:], "imitation.online_fraction × train.batch_size (policy rows)"
        )
        problems, n_expert = experts + policy_rows, len(experts)
        prompts = [self.task.model_input(self.tokenizer, p) for p in problems]
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        targets = [p.target for p in problems[:n_expert]]
        eos = [self.tokenizer.eos_token_id]
        completions = [
            c + eos for c in self.tokenizer(targets, add_special_tokens=False)["input_ids"]
        ]
        terminated = [True] * n_expert  # demonstrations end with EOS
        if self.n_policy:  # online IQLearn: the rest of the batch is policy samples
            assert self.rollouts is not None  # the registry row: iqlearn samples when online
            out = self.rollouts(
                self.policy,
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
        return DemonstrationBatch(
            tokens.to(self.device), torch.tensor(terminated, device=self.device), is_expert
        )

    def micro_batches(
        self, model: nn.Module, batch: DemonstrationBatch, size: int
    ) -> list[DemonstrationBatch]:
        """Micro-batches of rows with the whole batch's token counts (:meth:`Stage.micro_batches`);
        online IQLearn's each hold demonstrations and policy rows, in the batch's proportion."""
        rows = batch.tokens.input_ids.shape[0]
        if batch.is_expert is None:
            parts = micro_parts(rows, 1, size, self.device)
        else:
            parts = self._mixed_parts(batch.is_expert, size)
        if len(parts) == 1:
            return [batch]
        counts = self._token_counts(batch)
        whole = self._count_stats(batch)
        return [
            batch.select(index, replace(share, denominators=counts, stats=whole))
            for index, share in parts
        ]

    def _mixed_parts(self, is_expert: Tensor, size: int) -> list[tuple[Tensor, Share]]:
        """Online IQLearn: the k-th micro-batch takes the k-th of m consecutive runs of the
        demonstrations and the k-th of the policy rows (m = ⌈rows / size⌉, at most the number
        of either), so that each has both, as the online term needs."""
        expert = torch.nonzero(is_expert).flatten()
        policy = torch.nonzero(~is_expert).flatten()
        rows = is_expert.shape[0]
        m = min(-(-rows // size), len(expert), len(policy))
        parts = []
        for e, q in zip(expert.tensor_split(m), policy.tensor_split(m), strict=True):
            index = torch.cat([e, q])
            parts.append((index, Share(weight=len(index) / rows)))
        return parts

    def _token_counts(self, batch: DemonstrationBatch) -> tuple[Tensor, Tensor | None]:
        """The denominators of the batch's token means, N / W across processes: the scored
        tokens (IQLearn and the entropy bonus: those of :func:`action_mask`; else the
        completion tokens) and, for online IQLearn, the policy rows' (else None)."""
        mask = batch.tokens.loss_mask
        if self.method == "iqlearn":
            return self._soft_q_token_counts(batch)
        if self.cfg.entropy_coef > 0:  # the entropy's states predict tokens 1..: not position 0
            return distributed.mean_count(action_mask(mask).sum()), None
        return distributed.mean_count(mask.sum()), None

    def _count_stats(self, batch: DemonstrationBatch) -> dict[str, float]:
        """The batch's logged counts (``tokens``; online IQLearn's ``expert_tokens`` and
        ``policy_tokens``): a micro-batch logs its whole batch's."""
        counts = self._token_counts(batch)
        stats = {"tokens": float(counts[0])}
        if batch.is_expert is not None:
            mask = action_mask(batch.tokens.loss_mask)
            expert = batch.is_expert.unsqueeze(1).to(mask.dtype)
            stats["expert_tokens"] = float((mask * expert).sum())
            stats["policy_tokens"] = float((mask * (1 - expert)).sum())
        return stats

    def loss(self, model: nn.Module, batch: DemonstrationBatch) -> tuple[Tensor, dict[str, float]]:
        loss, stats = self._loss(model, batch)
        if batch.share is not None:
            stats.update(batch.share.stats)
        return loss, stats

    def _loss(self, model: nn.Module, batch: DemonstrationBatch) -> tuple[Tensor, dict[str, float]]:
        ids, attention, mask = (
            batch.tokens.input_ids,
            batch.tokens.attention_mask,
            batch.tokens.loss_mask,
        )
        # token means are over the global batch: each process divides by N / W, the mean of
        # the processes' counts (tether.distributed), as DDP averages their gradients; a
        # micro-batch divides by w·N, N its whole batch's
        share = batch.share
        counts: tuple[Tensor | None, Tensor | None] = (
            self._token_counts(batch)
            if share is None
            else (share.denominator(0), share.denominator(1))
        )
        if self.method == "iqlearn":
            lam = lambda_schedule(self.step, self.cfg.lam, self.cfg.lam_warmup_steps)
            expert_tokens, policy_tokens = counts
            loss, stats = iqlearn_loss(
                bucketed(model, ids, attention),  # rows in length groups (tether.scoring)
                ids,
                mask,
                batch.terminated,
                lam=lam,
                gamma=self.cfg.gamma,
                is_expert=batch.is_expert,
                alpha_mix=self.cfg.online_fraction,
                token_count=expert_tokens,
                policy_token_count=policy_tokens,
            )
            return loss, {**stats, "lambda": lam}
        if self.cfg.entropy_coef > 0:
            logits = bucketed(model, ids, attention)
            return mle_entropy_loss(logits, ids, mask, self.cfg.entropy_coef, counts[0])
        completion_tokens = counts[0]
        if self.cfg.label_smoothing > 0:  # support-preserving behaviour cloning
            logits = bucketed(model, ids, attention)
            eps = self.cfg.label_smoothing
            return label_smoothed_mle_loss(logits, ids, mask, eps, completion_tokens)
        # plain MLE: log-probs group by group, no [B, L, V] copy, the LM head from the
        # completions on (tether.scoring.loss_token_logprobs)
        logprobs = loss_token_logprobs(model, ids, attention, mask)
        return mle_loss(logprobs, mask, completion_tokens)

    def _soft_q_token_counts(self, batch: DemonstrationBatch) -> tuple[Tensor, Tensor | None]:
        """N / W of the demonstrations' scored tokens and of the policy rows' (online), the
        denominators of IQLearn's token means (:func:`~tether.objectives.action_mask`)."""
        mask = action_mask(batch.tokens.loss_mask)
        if batch.is_expert is None:
            return distributed.mean_count(mask.sum()), None
        expert = batch.is_expert.unsqueeze(1)
        expert_tokens = (mask * expert.to(mask.dtype)).sum()
        policy_tokens = (mask * (~expert).to(mask.dtype)).sum()
        return distributed.mean_count(expert_tokens), distributed.mean_count(policy_tokens)
