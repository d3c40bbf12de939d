"""The KL-regularised RL stage (docs/methods.md §2–3): rollouts, a frozen reference, and the loss.

One step: draw prompts from the task's RL distribution, sample completions from the policy at
temperature T with the KV-cache sampler, score them with the task (terminal reward), score the
same tokens under the frozen reference at the same temperature, then

    loss = policy-gradient loss (REINFORCE / RLOO / A2C / PPO-clip)
         + α · mean_t w_t·KL_t        (KL in the loss)       or  r_t − α·w_t·KL_t (in the reward)
         − c_H · entropy + c_V · value loss (A2C, PPO)

with w_t = 1 (standard KL) or w_t = Ĵ_ref(s_t)^β_c (prioritised KL on critical tokens).

The reward is the recipe's ``reward`` section (:mod:`tether.rewards.functions`): the task's
checker by default, or its graded score, a Python function of your own or a learned reward
model. With ``reward.calibrate`` it is InfAlign's CTRL reward Φ(C) (docs/methods.md §8): K reference
samples per prompt, drawn at the RL temperature with their own seeded generator and cached
(``rl.prompt_pool`` makes the prompts a fixed set, so the cache is filled once, up front).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether import distributed
from tether.config import Recipe
from tether.generation.rollouts import make_rollouts
from tether.generation.sampler import sample
from tether.models.lora import reference_policy
from tether.objectives import (
    discounted_returns,
    entropy_from_log_softmax,
    exact_kl_from_log_softmax,
    gae,
    kl_penalty,
    log_softmax_and_token_logprobs,
    masked_mean,
    ppo_clip_loss,
    prioritized_kl_weights,
    reinforce_loss,
    rloo_baseline,
    shape_rewards_with_kl,
    terminal_rewards,
    value_loss,
)
from tether.rewards.functions import CalibratedReward, RewardFunction, build_reward
from tether.scoring import grouped_completion_logits
from tether.tasks import task_from_config
from tether.tasks.prompts import prompt_text


@dataclass
class Rollout:
    """Everything one update needs; completion tensors are [B, T], sequences [B, P+T]."""

    input_ids: Tensor
    attention_mask: Tensor
    prompt_len: int
    mask: Tensor  # completion tokens
    old_logp: Tensor  # sampling policy's log-probs at temperature T
    ref_logp: Tensor
    ref_log_softmax: Tensor  # [B, T, V] log π_ref(·|s) at temperature T: the exact KL
    kl_weights: Tensor | None
    seq_rewards: Tensor  # [B]
    correct: Tensor  # [B] bool
    reward_stats: dict[str, float] | None = None  # raw and calibrated means under CTRL

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


class RLStage:
    """Rollouts from the policy, a frozen reference, and the configured objective."""

    def __init__(
        self,
        recipe: Recipe,
        tokenizer: PreTrainedTokenizerBase,
        policy: PreTrainedModel,
        device: torch.device,
    ):
        assert recipe.model.init is not None
        self.cfg = recipe.rl
        self.tokenizer = tokenizer
        self.policy = policy
        self.device = device
        self.task = task_from_config(recipe.task, recipe.seed)
        self.rng = random.Random(recipe.seed)
        self.generator = torch.Generator(device=device).manual_seed(
            distributed.rank_seed(recipe.seed)
        )
        self.reference = reference_policy(recipe, policy, device)
        self.value_head: nn.Linear | None = None
        if self.cfg.algorithm in ("a2c", "ppo"):
            self.value_head = nn.Linear(policy.config.hidden_size, 1).to(device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.epochs_per_batch = self.cfg.ppo_epochs if self.cfg.algorithm == "ppo" else 1
        self.max_new_tokens = self.cfg.max_new_tokens or self.task.max_new_tokens()
        self.last_timing: dict[str, float] = {}
        self.pool: list[Any] | None = None
        if self.cfg.prompt_pool is not None:
            pool_rng = random.Random(f"tether-rl-pool/{recipe.seed}")
            self.pool = [self.task.rl_problem(pool_rng) for _ in range(self.cfg.prompt_pool)]
        self.reward: RewardFunction = build_reward(recipe, self.task, device)
        self.rollouts = make_rollouts(recipe, policy, tokenizer, device)  # train.sampler
        self.calibrated: CalibratedReward | None = None
        if recipe.reward.calibrate:
            rc = recipe.reward
            self.ref_generator = torch.Generator(device=device).manual_seed(
                distributed.rank_seed(recipe.seed + 7919)
            )
            self.calibrated = CalibratedReward(
                self.reward, self._sample_reference, rc.reference_samples, rc.transform, rc.t, rc.n
            )
            self.reward = self.calibrated
            if self.pool is not None:
                self.calibrated.warm(self.pool, progress=True)

    @torch.no_grad()
    def _sample_reference(self, prompts: list[str], k: int) -> list[str]:
        """k completions per prompt from the frozen reference at the RL temperature."""
        out = sample(
            self.reference,
            self.tokenizer,
            [prompt_text(self.tokenizer, p) for p in prompts for _ in range(k)],
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
        state = {
            "rng": self.rng.getstate(),
            "generator": self.generator.get_state(),
            "value_head": None if self.value_head is None else self.value_head.state_dict(),
        }
        if self.calibrated is not None:
            state["calibration"] = self.calibrated.state_dict()
            state["ref_generator"] = self.ref_generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.generator.set_state(state["generator"])
        if self.value_head is not None:
            self.value_head.load_state_dict(state["value_head"])
        if self.calibrated is not None:
            self.calibrated.load_state_dict(state["calibration"])
            self.ref_generator.set_state(state["ref_generator"])

    # ------------------------------------------------------------------ rollout

    @torch.no_grad()
    def next_batch(self) -> Rollout:
        cfg = self.cfg
        # every process draws the global prompts and samples only its share of them
        problems = [self._draw() for _ in range(cfg.prompts_per_step)]
        problems = distributed.shard(problems, "rl.prompts_per_step")
        problems = [p for p in problems for _ in range(cfg.group_size)]
        t0 = time.perf_counter()
        out = self.rollouts(
            self.policy,
            [prompt_text(self.tokenizer, p.prompt) for p in problems],
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
            kl_weights = prioritized_kl_weights(
                ref_logits * cfg.temperature,
                cfg.certainty_exponent,
                cfg.certainty_form,
                cfg.certainty_temperature,
            )
        # normalised once here: the loss reads the reference's log-probs, never its logits
        ref_log_softmax, ref_logp = log_softmax_and_token_logprobs(ref_logits, completion_ids)
        rollout = Rollout(
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

    # ------------------------------------------------------------------ loss

    def loss(self, model: nn.Module, rollout: Rollout) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        mask = rollout.mask
        completion_ids = rollout.input_ids[:, rollout.prompt_len :]
        need_values = self.value_head is not None
        scored = grouped_completion_logits(
            model,
            rollout.input_ids,
            rollout.attention_mask,
            rollout.prompt_len,
            cfg.temperature,
            hidden=need_values,
        )
        if need_values:
            assert self.value_head is not None
            logits, hidden = scored
            values = self.value_head(hidden.float()).squeeze(-1)
        else:
            logits = scored
        # one fp32 log-softmax over the vocabulary serves log π of the sampled tokens, the
        # exact KL and the entropy
        log_p, logp = log_softmax_and_token_logprobs(logits, completion_ids)

        # full-vocabulary KL per position: the penalty with the exact estimator, a metric always
        exact = exact_kl_from_log_softmax(
            log_p if cfg.kl_estimator == "exact" else log_p.detach(), rollout.ref_log_softmax
        )
        if cfg.kl_estimator == "exact":
            per_token_kl = torch.where(mask > 0, exact, torch.zeros_like(exact))
            if rollout.kl_weights is not None:
                per_token_kl = per_token_kl * rollout.kl_weights
        else:
            per_token_kl = kl_penalty(
                logp, rollout.ref_logp, mask, cfg.kl_estimator, rollout.kl_weights
            )

        token_rewards = terminal_rewards(rollout.seq_rewards, mask)
        if cfg.kl_placement == "reward":
            token_rewards = shape_rewards_with_kl(token_rewards, per_token_kl, cfg.kl_coef)

        stats: dict[str, float] = {}
        if cfg.algorithm == "reinforce":
            returns = discounted_returns(token_rewards, mask, cfg.gamma)
            # the batch's mean return over every process's tokens (a constant, no gradient)
            real = torch.where(mask > 0, returns, torch.zeros_like(returns)).detach()
            total, count = distributed.all_sum(real.sum()), distributed.all_sum(mask.sum())
            baseline = total / count.clamp_min(1.0)
            pg, stats = reinforce_loss(logp, (returns - baseline).detach(), mask)
        elif cfg.algorithm == "rloo":
            seq_return = (token_rewards * mask).sum(1)
            pg, stats = reinforce_loss(logp, rloo_baseline(seq_return, cfg.group_size), mask)
        else:
            advantages, returns = gae(token_rewards, values, mask, cfg.gamma, cfg.gae_lambda)
            if cfg.algorithm == "a2c":
                pg, stats = reinforce_loss(logp, advantages, mask)
            else:
                pg, stats = ppo_clip_loss(logp, rollout.old_logp, advantages, mask, cfg.clip_eps)
            v_loss, v_stats = value_loss(values, returns, mask)
            pg = pg + cfg.value_coef * v_loss
            stats.update(v_stats)

        kl_mean = masked_mean(per_token_kl, mask)
        loss = pg
        if cfg.kl_placement == "loss":
            loss = loss + cfg.kl_coef * kl_mean
        if cfg.entropy_coef > 0:
            entropy = masked_mean(entropy_from_log_softmax(log_p), mask)
            loss = loss - cfg.entropy_coef * entropy
        else:  # a metric only: no backward pass through it
            with torch.no_grad():
                entropy = masked_mean(entropy_from_log_softmax(log_p.detach()), mask)

        with torch.no_grad():
            sampled_kl = masked_mean(
                logp - rollout.ref_logp, mask
            )  # k1: unbiased KL(π‖π_ref) per token
            stats.update(
                {
                    "loss": float(loss.item()),
                    "reward": float(rollout.seq_rewards.mean()),
                    "accuracy": float(rollout.correct.float().mean()),
                    "kl_penalty": float(kl_mean.item()),
                    "kl_sampled": float(sampled_kl.item()),
                    "entropy": float(entropy.item()),
                    "completion_tokens": float(mask.sum(1).mean()),
                }
            )
            stats["kl_exact"] = float(masked_mean(exact.detach(), mask))
            stats["kl_sequence"] = float(((logp - rollout.ref_logp) * mask).sum(1).mean())
            if rollout.reward_stats:
                stats.update(rollout.reward_stats)
            if rollout.kl_weights is not None:
                stats["kl_weight_mean"] = float(masked_mean(rollout.kl_weights, mask))
                stats["kl_weight_below_half"] = float(
                    masked_mean((rollout.kl_weights < 0.5).float(), mask)
                )
        return loss, stats
