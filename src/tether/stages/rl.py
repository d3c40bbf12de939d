"""The KL-regularised RL stage (docs/methods.md §2–3): rollouts, a frozen reference, and the loss.

One step: draw prompts from the task's RL distribution, sample completions from the policy at
temperature T with the KV-cache sampler, score them with the task (terminal reward), score the
same tokens under the frozen reference at the same temperature, then

    loss = policy-gradient loss (REINFORCE / RLOO / A2C / PPO-clip / GRPO)
         + α · mean_t w_t·KL_t        (KL in the loss)       or  r_t − α·w_t·k1_t (in the reward)
         − c_H · entropy + c_V · value loss (A2C, PPO)

with w_t = 1 (standard KL) or w_t = Ĵ_ref(s_t)^β_c (prioritised KL on critical tokens): the
pure function :func:`tether.objectives.rl.rl_loss`, which this stage calls once it has scored
the rollout under the policy (and the value head). Across processes the stage passes it the
token count N / W and REINFORCE's baseline over every process's tokens.

With ``train.micro_batch_size`` the rollout is scored and backpropagated in micro-batches of
rows (RLOO: of whole prompt groups, whose leave-one-out baselines read each other), each
dividing its token means by w·N with the whole rollout's N, and REINFORCE's baseline taken
over the whole rollout first: the step is the whole rollout's.

The reward is the recipe's ``reward`` section (:mod:`tether.rewards.functions`): the task's
checker by default, or its graded score, a Python function of your own or a learned reward
model. With ``reward.calibrate`` it is InfAlign's CTRL reward Φ(C) (docs/methods.md §8): K reference
samples per prompt, drawn at the RL temperature with their own seeded generator and cached
(``rl.prompt_pool`` makes the prompts a fixed set, so the cache is filled once, up front).
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether import distributed
from tether.batches import RolloutBatch
from tether.config import Recipe, RecipeError
from tether.generation.rollouts import RolloutBackend
from tether.generation.sampler import sample, vocab_bias
from tether.objectives import (
    RLLossSettings,
    grpo_advantages,
    log_softmax_and_token_logprobs,
    prioritized_kl_weights,
    rl_loss,
    rl_returns,
)
from tether.objectives.common import chunked_logprobs_and_metrics, uncertainty
from tether.rewards.functions import CalibratedReward, RewardFunction
from tether.scoring import grouped_completion_logits
from tether.stages.base import Stage, micro_parts, sample_health
from tether.tasks.prompts import format_prompt


class RLStage(Stage[RolloutBatch]):
    """Rollouts from the policy, a frozen reference, and the configured objective."""

    reference: nn.Module  # the registry row: rl needs one, samples and scores with a reward
    rollouts: RolloutBackend
    reward: RewardFunction
    splits_batches = True

    def __init__(
        self,
        recipe: Recipe,
        tokenizer: PreTrainedTokenizerBase,
        policy: PreTrainedModel,
        device: torch.device,
    ):
        super().__init__(recipe, tokenizer, policy, device)
        self.cfg = cfg = recipe.rl
        self.settings = RLLossSettings(
            algorithm=cfg.algorithm,
            kl_coef=cfg.kl_coef,
            kl_estimator=cfg.kl_estimator,
            kl_placement=cfg.kl_placement,
            entropy_coef=cfg.entropy_coef,
            value_coef=cfg.value_coef,
            gamma=cfg.gamma,
            gae_lambda=cfg.gae_lambda,
            clip_eps=cfg.clip_eps,
            group_size=cfg.group_size,
            reward_scale=cfg.scale_rewards,
            grpo_loss=cfg.grpo_loss,
            max_completion_length=cfg.max_new_tokens or self.task.max_new_tokens(),
        )
        self.value_head: nn.Linear | None = None
        if cfg.algorithm in ("a2c", "ppo"):
            self.value_head = nn.Linear(policy.config.hidden_size, 1).to(device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.epochs_per_batch = cfg.epochs  # ppo, grpo: rl.ppo_epochs (TRL's num_iterations)
        # the loss reads log π at the sampled tokens (and H for an entropy bonus) only, not the
        # exact KL: they and the metrics are computed by chunks of positions, the full log π
        # never kept
        self.chunked = cfg.kl_estimator != "exact"
        # rl.certainty_support task: the certainty over the task's characters and EOS only
        self.certainty_support = (
            task_token_ids(self.task, tokenizer, device)
            if cfg.certainty_support == "task" and cfg.certainty_exponent is not None
            else None
        )
        # the minibatches' order: its own stream (the prompt stream stays as it was)
        self.minibatch_generator = torch.Generator().manual_seed(recipe.seed + 104729)
        self.max_new_tokens = cfg.max_new_tokens or self.task.max_new_tokens()
        self.pool: list[Any] | None = None
        if cfg.prompt_pool is not None:
            pool_rng = random.Random(f"tether-rl-pool/{recipe.seed}")
            self.pool = [self.task.rl_problem(pool_rng) for _ in range(cfg.prompt_pool)]
        self.calibrated: CalibratedReward | None = None
        if recipe.reward.calibrate:
            rc = recipe.reward
            self.ref_generator = torch.Generator(device=device).manual_seed(
                distributed.rank_seed(recipe.seed + 7919)
            )
            self.calibrated = CalibratedReward(
                self.reward, self._sample_reference, rc.reference_samples, rc.transform, rc.t, rc.n
            )
            if self.pool is not None:
                self.calibrated.warm(self.pool, progress=True)

    @torch.no_grad()
    def _sample_reference(self, prompts: list[str], k: int) -> list[str]:
        """k completions per prompt from the frozen reference at the RL temperature."""
        out = sample(
            self.reference,
            self.tokenizer,
            [
                format_prompt(self.tokenizer, p, self.task.prompt_format)
                for p in prompts
                for _ in range(k)
            ],
            max_new_tokens=self.max_new_tokens,
            temperature=self.cfg.temperature,
            generator=self.ref_generator,
            batch_size=256,
        )
        return out.texts

    def _draw(self) -> Any:
        if self.pool is not None:
            return self.pool[self.rng.randrange(len(self.pool))]
        return self.task.rl_problem(self.rng)

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters besides the policy's (the value head)."""
        return list(self.value_head.parameters()) if self.value_head is not None else []

    def state_dict(self) -> dict[str, Any]:
        """The prompt stream, the sampling generator and the value head (for ``--resume``)."""
        state = super().state_dict()
        state["value_head"] = None if self.value_head is None else self.value_head.state_dict()
        state["minibatch_generator"] = self.minibatch_generator.get_state()
        if self.calibrated is not None:
            state["calibration"] = self.calibrated.state_dict()
            state["ref_generator"] = self.ref_generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.value_head is not None:
            self.value_head.load_state_dict(state["value_head"])
        if "minibatch_generator" in state:  # checkpoints written before rl.minibatches lack it
            self.minibatch_generator.set_state(state["minibatch_generator"])
        if self.calibrated is not None:
            self.calibrated.load_state_dict(state["calibration"])
            self.ref_generator.set_state(state["ref_generator"])

    # ------------------------------------------------------------------ rollout

    @torch.no_grad()
    def next_batch(self) -> RolloutBatch:
        cfg = self.cfg
        # every process draws the global prompts and samples only its share of them
        problems = [self._draw() for _ in range(cfg.prompts_per_step)]
        problems = distributed.shard(problems, "rl.prompts_per_step")
        problems = [p for p in problems for _ in range(cfg.group_size)]
        t0 = time.perf_counter()
        out = self.rollouts(
            self.policy,
            [self.task.model_input(self.tokenizer, p) for p in problems],
            max_new_tokens=self.max_new_tokens,
            temperature=cfg.temperature,
            generator=self.generator,
        )
        t_sampled = time.perf_counter()
        correct = torch.tensor(
            [self.task.is_correct(p, t) for p, t in zip(problems, out.texts, strict=True)],
            device=self.device,
        )
        reward_stats = None
        if self.calibrated is not None:
            parts = self.calibrated.details(problems, out.texts)
            seq_rewards = parts["reward"].to(self.device)
            reward_stats = {
                "reward_raw": float(parts["raw"].mean()),
                "reward_calibrated": float(parts["calibrated"].mean()),
            }
        else:
            seq_rewards = self.reward(problems, out.texts).float().to(self.device)
        # one sample per prompt: the step's batch is the group whose rewards must differ
        k = cfg.group_size
        groups = seq_rewards.view(-1, k) if k > 1 else seq_rewards.view(1, -1)
        reward_stats = {**(reward_stats or {}), **sample_health(out.texts, out.finished, groups)}
        completion_ids = out.completion_ids.to(self.device)
        input_ids = torch.cat([out.prompt_ids.to(self.device), completion_ids], dim=1)
        attention_mask = torch.cat([out.prompt_mask, out.completion_mask], dim=1).to(self.device)
        prompt_len = out.prompt_ids.shape[1]
        t_scored = time.perf_counter()
        # once per batch, reused by every PPO epoch; right-padded rows in length groups
        ref_logits = grouped_completion_logits(
            self.reference, input_ids, attention_mask, prompt_len, cfg.temperature
        )
        kl_weights = None
        if cfg.certainty_exponent is not None:
            # certainty of the reference at its own (unscaled) logits: undo the sampling temperature
            own_logits = ref_logits * cfg.temperature
            if self.certainty_support is not None:  # −inf outside the task's characters
                own_logits = own_logits + vocab_bias(self.certainty_support, own_logits.shape[-1])
            typical = None
            if cfg.certainty_normalization == "typical":
                # ū: the reference's mean uncertainty over every process's real completion tokens
                u = uncertainty(own_logits, cfg.certainty_form, cfg.certainty_temperature)
                real = out.completion_mask.to(u)
                count = distributed.all_sum(real.sum()).clamp_min(1.0)
                typical = distributed.all_sum((u * real).sum()) / count
            kl_weights = prioritized_kl_weights(
                own_logits,
                cfg.certainty_exponent,
                cfg.certainty_form,
                cfg.certainty_temperature,
                cfg.certainty_normalization,
                typical,
            )
        # normalised once here: the loss reads the reference's log-probs, never its logits
        ref_log_softmax, ref_logp = log_softmax_and_token_logprobs(ref_logits, completion_ids)
        rollout = RolloutBatch(
            advantages=self._grpo_advantages(seq_rewards),
            input_ids=input_ids,
            attention_mask=attention_mask,
            prompt_len=prompt_len,
            mask=out.completion_mask.float().to(self.device),
            old_logp=out.logprobs.to(self.device),
            ref_logp=ref_logp,
            ref_log_softmax=ref_log_softmax,  # small vocabularies: the exact KL is cheap
            kl_weights=kl_weights,
            seq_rewards=seq_rewards,
            correct=correct,
            reward_stats=reward_stats,
        )
        # where a step's time goes (read by `tether bench rl`)
        self.last_timing = {
            "sample_s": t_sampled - t0,
            "reference_s": time.perf_counter() - t_scored,
        }
        return rollout

    def _grpo_advantages(self, seq_rewards: Tensor) -> Tensor | None:
        """GRPO's advantages of the whole rollout, once, before it is cut into minibatches and
        micro-batches (as TRL takes them once per generation batch); with
        ``rl.scale_rewards batch`` the std of every process's rewards. None for the others."""
        if self.settings.algorithm != "grpo":
            return None
        batch_std = None
        if self.settings.reward_scale == "batch":
            r = seq_rewards.double()
            n, total, squares = (
                distributed.all_sum(x)
                for x in (r.new_tensor(float(r.numel())), r.sum(), r.square().sum())
            )
            variance = (squares - total * total / n) / (n - 1).clamp_min(1.0)
            batch_std = variance.clamp_min(0.0).sqrt().float()
        return grpo_advantages(
            seq_rewards, self.settings.group_size, self.settings.reward_scale, batch_std
        )

    @property
    def unit(self) -> int:
        """Rows the loss reads together: a prompt group for RLOO and GRPO (their baselines read
        each other), else one row."""
        return self.cfg.group_size if self.settings.algorithm in ("rloo", "grpo") else 1

    # ------------------------------------------------------------------ minibatches

    def updates(self, rollout: RolloutBatch) -> list[RolloutBatch]:
        """Each epoch (PPO, GRPO: ``rl.ppo_epochs``, else one) the rollout's units (rows; RLOO,
        GRPO: prompt groups) shuffled and cut into ``rl.minibatches`` near-equal minibatches,
        one optimizer step each, on its own token mean: the released critical-token code's
        granularity (several updates per collect) at the size of minibatch a CPU affords."""
        if self.cfg.minibatches == 1:
            return super().updates(rollout)
        unit = self.unit
        units = rollout.input_ids.shape[0] // unit
        if self.cfg.minibatches > units:
            raise RecipeError(
                f"rl.minibatches {self.cfg.minibatches}: the rollout has only {units} "
                f"{'prompt groups' if unit > 1 else 'rows'} on this process to split"
            )
        parts = []
        for _ in range(self.epochs_per_batch):
            order = torch.randperm(units, generator=self.minibatch_generator)
            for chunk in order.tensor_split(self.cfg.minibatches):
                rows = _unit_rows(chunk.sort().values.to(self.device), unit)
                parts.append(rollout.select(rows, None))
        return parts

    # ------------------------------------------------------------------ micro-batches

    def micro_batches(
        self, model: nn.Module, rollout: RolloutBatch, size: int
    ) -> list[RolloutBatch]:
        """Micro-batches of rows (RLOO, GRPO: of whole prompt groups) with the whole rollout's token
        count N / W and, for REINFORCE, its baseline (:meth:`Stage.micro_batches`)."""
        unit = self.unit
        parts = [
            (_unit_rows(units, unit), share)
            for units, share in micro_parts(
                rollout.input_ids.shape[0] // unit, unit, size, self.device
            )
        ]
        if len(parts) == 1:
            return [rollout]
        count = distributed.mean_count(rollout.mask.sum())
        baseline = None
        if self.settings.algorithm == "reinforce":  # the mean return over the whole rollout
            total = sum(self._return_sum(model, rollout.select(r, s)) for r, s in parts)
            tokens = distributed.all_sum(rollout.mask.sum())
            baseline = distributed.all_sum(torch.as_tensor(total)) / tokens.clamp_min(1.0)
        return [
            rollout.select(rows, replace(share, denominators=(count,), baseline=baseline))
            for rows, share in parts
        ]

    @torch.no_grad()
    def _return_sum(self, model: nn.Module, rollout: RolloutBatch) -> Tensor:
        """Σ of REINFORCE's returns over the rollout's real tokens: with the KL in the reward
        they read log π (a pass without gradient), else the rewards alone."""
        logp = rollout.ref_logp  # read only with the KL in the reward
        if self.settings.kl_placement == "reward":
            logits = grouped_completion_logits(
                model,
                rollout.input_ids,
                rollout.attention_mask,
                rollout.prompt_len,
                self.cfg.temperature,
            )
            completion_ids = rollout.input_ids[:, rollout.prompt_len :]
            logp = log_softmax_and_token_logprobs(logits, completion_ids)[1]
        mask = rollout.mask
        returns = rl_returns(
            logp, rollout.ref_logp, mask, rollout.seq_rewards, self.settings, rollout.kl_weights
        )
        return torch.where(mask > 0, returns, torch.zeros_like(returns)).sum()

    # ------------------------------------------------------------------ loss

    def loss(self, model: nn.Module, rollout: RolloutBatch) -> tuple[Tensor, dict[str, float]]:
        """Score the rollout under ``model`` (and the value head), then :func:`rl_loss`."""
        mask = rollout.mask
        completion_ids = rollout.input_ids[:, rollout.prompt_len :]
        values = None
        scored = grouped_completion_logits(
            model,
            rollout.input_ids,
            rollout.attention_mask,
            rollout.prompt_len,
            self.cfg.temperature,
            hidden=self.value_head is not None,
            raw=self.chunked,
        )
        if self.value_head is not None:
            logits, hidden = scored
            values = self.value_head(hidden.float()).squeeze(-1)
        else:
            logits = scored
        log_p, metrics, token_entropy = None, None, None
        if self.chunked:  # log π of the sampled tokens, H (a bonus's) and the exact KL metric
            logp, token_entropy, kl = chunked_logprobs_and_metrics(
                logits, completion_ids, self.cfg.temperature, rollout.ref_log_softmax
            )
            metrics = (token_entropy.detach(), kl)
        else:
            # one fp32 log-softmax over the vocabulary serves log π of the sampled tokens, the
            # exact KL and the entropy
            log_p, logp = log_softmax_and_token_logprobs(logits, completion_ids)
        share = rollout.share  # a micro-batch: the whole rollout's baseline and token count
        baseline = None if share is None else share.baseline
        if self.settings.algorithm == "reinforce" and share is None:
            # the mean return over every process's tokens (a constant of the estimator)
            returns = rl_returns(
                logp, rollout.ref_logp, mask, rollout.seq_rewards, self.settings, rollout.kl_weights
            )
            real = torch.where(mask > 0, returns, torch.zeros_like(returns)).detach()
            total, count = distributed.all_sum(real.sum()), distributed.all_sum(mask.sum())
            baseline = total / count.clamp_min(1.0)
        loss, stats = rl_loss(
            log_p,
            logp,
            rollout.ref_logp,
            rollout.ref_log_softmax,
            mask,
            rollout.seq_rewards,
            self.settings,
            values=values,
            # one update per collect: the sampling policy is this one (rl.updates_per_collect)
            old_logp=rollout.old_logp if self.cfg.updates_per_collect > 1 else logp.detach(),
            kl_weights=rollout.kl_weights,
            correct=rollout.correct,
            # across processes N / W, so DDP's gradient average is the global token mean's;
            # a micro-batch divides by w·N, N its whole rollout's
            token_count=distributed.mean_count(mask.sum())
            if share is None
            else share.denominator(),
            baseline=baseline,
            advantages=rollout.advantages,
            metrics=metrics,
            token_entropy=token_entropy if self.cfg.entropy_coef > 0 else None,
        )
        if rollout.reward_stats:
            stats.update(rollout.reward_stats)
        return loss, stats


def _unit_rows(units: Tensor, unit: int) -> Tensor:
    """The rows of the units ``units``, each ``unit`` consecutive rows."""
    return (units[:, None] * unit + torch.arange(unit, device=units.device)).reshape(-1)


def task_token_ids(task: Any, tokenizer: Any, device: torch.device) -> Tensor:
    """The ids of the task's characters (``task.alphabet``) and EOS, for a tokenizer with one
    token per character. RecipeError naming the key where there is none."""
    if task.alphabet is None:
        raise RecipeError(
            "rl.certainty_support task: this task writes open text (it has no alphabet); "
            "use certainty_support vocabulary"
        )
    encoded = {ch: tokenizer.encode(ch, add_special_tokens=False) for ch in task.alphabet}
    missing = [ch for ch, ids in encoded.items() if len(ids) != 1]
    if missing:
        raise RecipeError(
            "rl.certainty_support task needs one token per character of the task; the "
            f"tokenizer has none for {''.join(missing)!r}: use certainty_support vocabulary"
        )
    ids = [encoded[ch][0] for ch in task.alphabet] + [tokenizer.eos_token_id]
    return torch.tensor(sorted(set(ids)), dtype=torch.long, device=device)
