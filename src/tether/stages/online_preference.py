"""Online preference stages (docs/methods.md §7): online DPO and XPO.

One step (``train.batch_size`` prompts from the task's RL distribution):

1. sample y ∼ π_θ(·|x) and a second response ỹ: from the frozen reference π_ref
   (``preference.pair_with: reference``, always for XPO) or from π_θ again (``policy``);
2. score both with the recipe's ``reward`` (:mod:`tether.rewards.functions`) and label the pair
   with :func:`~tether.objectives.preference_pairs`: the higher reward is chosen, a tie goes
   to the policy sample y (``preference.ties: policy``, as XPO) or the pair is left out of the
   loss (``ties: drop``);
3. score all 2B rows under the frozen reference once, then minimise

       L = −log σ(β·(h_w − h_l)) + α·log π_θ(ỹ|x),    h = Σ_t log π_θ/π_ref over the response

   with α = 0 for ``train.stage: online-dpo`` and α = ``preference.alpha`` for ``xpo``
   (Xie et al. 2024). ``preference.loss: ipo`` replaces the sigmoid term by IPO's square.

The bonus lowers the policy's probability of what the reference says, so mass moves to
responses π_ref rarely produces: the exploration that makes XPO sample-efficient where the
reference seldom finds the best answer. Logged per step: the loss and its parts, the rewards
of both responses, the share of ties and of pairs the policy sample wins, the policy sample's
accuracy under the task's checker and ``kl_sequence``, its summed log-ratio Σ_t log π_θ/π_ref
at T = 1 (the k1 estimate of the sequence KL when ``preference.temperature`` is 1), and the
health of the policy's samples (``frac_constant_groups``: the share of tied pairs;
``frac_truncated``, ``frac_empty``).

With ``train.micro_batch_size`` the pairs are cut into micro-batches of whole pairs; with
``ties: drop`` each divides its pair loss by w·K, K the whole batch's kept pairs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether import distributed
from tether.batches import OnlinePairBatch, collate_token_rows
from tether.config import Recipe
from tether.generation.rollouts import HFRolloutBackend, RolloutBackend
from tether.generation.sampler import SampleOutput, pad_id
from tether.objectives import (
    PreferencePairs,
    preference_pairs,
    sequence_logprobs,
    sequence_logratios,
    xpo_loss,
)
from tether.rewards.functions import RewardFunction
from tether.scoring import pair_token_logprobs
from tether.stages.base import Stage, micro_parts, sample_health


class OnlinePreferenceStage(Stage[OnlinePairBatch]):
    """``train.stage: online-dpo`` (α = 0) or ``xpo`` (module docstring)."""

    reference: nn.Module  # the registry rows: both need one, sample and score with a reward
    rollouts: RolloutBackend
    reward: RewardFunction
    splits_batches = True

    def __init__(
        self,
        recipe: Recipe,
        tokenizer: PreTrainedTokenizerBase,
        policy: PreTrainedModel,
        device: torch.device,
    ) -> None:
        super().__init__(recipe, tokenizer, policy, device)
        self.cfg = recipe.preference
        self.xpo = recipe.train.stage == "xpo"
        self.alpha = self.cfg.alpha if self.xpo else 0.0
        self.pair_with = "reference" if self.xpo else self.cfg.pair_with
        self.batch_size = recipe.train.batch_size
        # the reference's samples: their own rank-seeded generator
        seed = distributed.rank_seed(recipe.seed)
        self.ref_generator = torch.Generator(device=device).manual_seed(seed + 7919)
        self.max_new_tokens = self.cfg.max_new_tokens or self.task.max_new_tokens()
        self.reference_rollouts = HFRolloutBackend(tokenizer)  # the frozen reference: hf always

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ref_generator": self.ref_generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.ref_generator.set_state(state["ref_generator"])

    # ------------------------------------------------------------------ rollout

    def _sample(self, model: nn.Module, prompts: list[str], generator: Any) -> SampleOutput:
        rollouts = self.rollouts if model is self.policy else self.reference_rollouts
        return rollouts(
            model,
            prompts,
            max_new_tokens=self.max_new_tokens,
            temperature=self.cfg.temperature,
            generator=generator,
        )

    @torch.no_grad()
    def next_batch(self) -> OnlinePairBatch:
        problems = [self.task.rl_problem(self.rng) for _ in range(self.batch_size)]
        problems = distributed.shard(problems, "train.batch_size")
        prompts = [self.task.model_input(self.tokenizer, p) for p in problems]
        ours = self._sample(self.policy, prompts, self.generator)
        if self.pair_with == "reference":
            theirs = self._sample(self.reference, prompts, self.ref_generator)
        else:
            theirs = self._sample(self.policy, prompts, self.generator)
        reward_a = self.reward(problems, ours.texts)
        reward_b = self.reward(problems, theirs.texts)
        pairs = preference_pairs(reward_a, reward_b, policy_sample="a")
        prompt_a, comp_a = ours.token_rows()
        prompt_b, comp_b = theirs.token_rows()
        rows = collate_token_rows(prompt_a + prompt_b, comp_a + comp_b, pad_id(self.tokenizer))
        tokens = rows.to(self.device)
        # each pair as one packed row, its shared prompt run once (tether.scoring), as the
        # loss scores them
        ref_logp = pair_token_logprobs(
            self.reference, tokens.input_ids, tokens.attention_mask, tokens.loss_mask
        )
        correct = torch.tensor(
            [self.task.is_correct(p, t) for p, t in zip(problems, ours.texts, strict=True)],
            device=self.device,
        )
        return OnlinePairBatch(
            tokens=tokens,
            ref_logp=ref_logp,
            policy_is_chosen=pairs.a_is_chosen.to(self.device),
            tie=pairs.tie.to(self.device),
            rewards=torch.cat([reward_a, reward_b]).to(self.device),
            correct=correct,
            # a pair is a prompt's group: a tie teaches nothing
            stats=sample_health(ours.texts, ours.finished, torch.stack([reward_a, reward_b], 1)),
        )

    def micro_batches(
        self, model: nn.Module, batch: OnlinePairBatch, size: int
    ) -> list[OnlinePairBatch]:
        """Micro-batches of whole pairs (2 rows each); with ``ties: drop``, the whole batch's
        kept pairs (:meth:`Stage.micro_batches`)."""
        parts = micro_parts(batch.pairs, 2, size, self.device)
        if len(parts) == 1:
            return [batch]
        kept = (~batch.tie).sum().to(torch.float32)
        return [batch.select(pairs, replace(share, denominators=(kept,))) for pairs, share in parts]

    # ------------------------------------------------------------------ loss

    def loss(self, model: nn.Module, batch: OnlinePairBatch) -> tuple[Tensor, dict[str, float]]:
        tokens, b = batch.tokens, batch.tokens.input_ids.shape[0] // 2
        mask = tokens.loss_mask
        logp = pair_token_logprobs(model, tokens.input_ids, tokens.attention_mask, mask)
        h = sequence_logratios(logp, batch.ref_logp, mask, average=self.cfg.length_normalize)
        chosen, rejected = PreferencePairs(batch.policy_is_chosen, batch.tie).order(h[:b], h[b:])
        # log π_θ(ỹ|x) of the second responses ỹ ∼ π_ref: XPO's exploration bonus
        bonus_logp = sequence_logprobs(logp[b:], mask[b:]) if self.alpha else None
        keep = ~batch.tie if self.cfg.ties == "drop" else None
        args = (self.cfg.beta, self.alpha, self.cfg.loss, self.cfg.label_smoothing, keep)
        loss, stats = xpo_loss(chosen, rejected, bonus_logp, *args)
        if keep is not None and batch.share is not None and bool(keep.any()):
            # the pair loss is a mean over kept pairs: over the whole batch's K, not this
            # micro-batch's k, so w·loss adds up: scale it by k / (w·K)
            kept = batch.share.denominator()
            assert kept is not None  # micro_batches gives the whole batch's kept pairs
            scale = float(keep.sum()) / float(kept)
            pair_loss = xpo_loss(chosen, rejected, None, *args)[0]
            loss = loss + (scale - 1.0) * pair_loss
            stats["preference_loss"] *= scale
        with torch.no_grad():
            r = batch.rewards
            stats.update(
                {
                    "loss": float(loss.detach()),
                    "reward": float(r[:b].mean()),
                    "reward_second": float(r[b:].mean()),
                    "ties": float(batch.tie.float().mean()),
                    "policy_wins": float((r[:b] > r[b:]).float().mean()),
                    "accuracy": float(batch.correct.float().mean()),
                    "kl_sequence": float(
                        ((logp[:b] - batch.ref_logp[:b]) * mask[:b]).sum(1).mean()
                    ),
                    "completion_tokens": float(mask[:b].sum(1).mean()),
                    **batch.stats,
                }
            )
        return loss, stats
