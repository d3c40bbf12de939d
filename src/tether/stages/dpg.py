"""The DPG / f-DPG stage (``train.stage: dpg``): distribution matching toward a target EBM
(docs/methods.md §5), the Bayesian reading of KL-tethered fine-tuning.

The target is P(y|x) = π_ref(y|x)·exp(r(x,y)/β), whose normalisation p* = P/Z is exactly the
optimum of KL-RL with coefficient β (docs/methods.md §2); or P = π_ref·b for a hard constraint
b = ``task.is_correct``. π_ref is the frozen ``model.init``, r the recipe's ``reward``
(:mod:`tether.rewards.functions`): by default the task's graded score in [0, 1] (the stage's
registry row's default when ``reward.kind`` is unset), or a Python
function of your own (``kind: python``) or a learned reward model (``kind: model``). One step:

1. draw ``prompts_per_step`` prompts from the task, and ``samples_per_step`` responses split
   evenly over them, from the proposal q: the policy itself (``proposal: policy``) or a frozen
   copy of it (``proposal: adaptive``), at ``temperature``;
2. score the responses: r, log π_ref(y) (one forward pass of the reference), log q(y) (the
   sampler's own log-probs: the distribution that drew them), so log P = log π_ref + r/β;
3. log Z per prompt: ``running`` (mean P/q over every sample of that prompt so far: P/q with
   y ∼ q is unbiased for Z whatever q was, so samples of earlier proposals still count),
   ``batch`` (this step's samples, self-normalised) or ``exact`` (enumerated, enumerable task);
4. the loss of :mod:`tether.objectives.dpg` per prompt, averaged: ``forward_kl`` is DPG with the
   GDC++ baseline (:func:`dpg_loss`), the others f-DPG (:func:`f_dpg_loss`, leave-one-out
   baseline). ``reverse_kl`` is KL-RL: β times its gradient is REINFORCE-RLOO on the shaped
   reward r − β·log(π/π_ref) (tests/test_dpg_stage.py checks it on the stage's own samples);
5. ``proposal: adaptive``: before the update, the policy replaces the proposal when it is closer
   to the target, KL(p‖π) < KL(p‖q) estimated on this step's samples (GDC++).

With ``train.micro_batch_size`` the loss runs over micro-batches of whole prompt groups (the
loss is a mean over groups, each group's baseline and Ẑ read all its samples).

Any temperature or proposal is importance-weighted back to π at temperature 1: the weights
use q's log-probs, so the gradient stays that of the divergence to π itself.

On the enumerable task (:mod:`tether.tasks.enumerable`) responses are drawn with the task's
vocabulary only (``sample(..., allowed_token_ids=...)``) and scored the same way, so the
sampled policy is the enumerated one, and each evaluation logs exact figures instead of the
generation-based ones: ``exact/kl_target_policy`` KL(p*‖π), ``exact/kl_policy_target``,
``exact/kl_policy_ref``, ``exact/tv``, ``exact/entropy``, ``exact/reward``, ``exact/log_z``...
(:mod:`tether.distributions.enumeration`).
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether import distributed
from tether.batches import DPGBatch, Responses
from tether.config import Recipe, RecipeError
from tether.distributions.bayes import (
    constraint_log_target,
    fit_moments,
    kl_policy_ref,
    kl_target_policy,
    moment_log_target,
    reward_log_target,
)
from tether.distributions.enumeration import (
    ExactSpace,
    ExactTarget,
    NotEnumerableError,
    exact_figures,
)
from tether.distributions.enumeration import exact_space as build_exact_space
from tether.generation.rollouts import RolloutBackend
from tether.generation.sampler import SampleOutput, sample
from tether.models.loading import eval_mode
from tether.models.lora import frozen_copy
from tether.objectives import (
    FDivergence,
    dpg_loss,
    f_dpg_loss,
    kl_adaptive_proposal_update,
    sequence_logprobs,
)
from tether.rewards.functions import GradedReward, RewardFunction
from tether.scoring import grouped_completion_logits, restricted_token_logprobs
from tether.stages.base import Stage, micro_parts, sample_health
from tether.tasks.features import feature_matrix

# the recipe's short names for the f-divergences of tether.objectives.dpg
DIVERGENCES: dict[str, FDivergence] = {
    "forward_kl": "forward_kl",
    "reverse_kl": "reverse_kl",
    "js": "jensen_shannon",
    "tv": "total_variation",
}


def restricted_sequence_logprobs(
    logits: Tensor, tokens: Tensor, mask: Tensor, allowed: Tensor | None
) -> Tensor:
    """log π(y) = Σ_t log π_V(y_t|s_t) per row, [B, T, V] → [B], where π_V is the next-token
    distribution renormalised over the ``allowed`` ids (all of them when None): logits outside
    the set are −inf, as the sampler draws them and as :mod:`tether.distributions.exact` enumerates them."""
    return sequence_logprobs(restricted_token_logprobs(logits, tokens, mask, allowed), mask)


def responses_from_sample(out: SampleOutput, device: torch.device) -> Responses:
    """The sampler's output as model input: prompts left-padded, completions right-padded."""
    mask = out.completion_mask.to(device)
    return Responses(
        input_ids=torch.cat([out.prompt_ids, out.completion_ids], dim=1).to(device),
        attention_mask=torch.cat([out.prompt_mask.to(device), mask], dim=1),
        prompt_len=out.prompt_ids.shape[1],
        mask=mask,
    )


class DPGStage(Stage[DPGBatch]):
    """Samples from the policy (or an adaptive proposal), a frozen reference, DPG / f-DPG."""

    reference: nn.Module  # the registry row: dpg needs one, samples and scores with a reward
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
        self.cfg = recipe.dpg
        self.divergence = DIVERGENCES[self.cfg.divergence]
        self.beta = self.cfg.beta if self.cfg.target == "reward" else None
        self.moment_names = list(self.cfg.moments)
        self.lam: Tensor | None = None  # λ of a moment-constraint target, fitted below
        self.moment_fit: dict[str, float] = {}
        self.group_size = self.cfg.samples_per_step // self.cfg.prompts_per_step
        self.max_new_tokens = self.task.max_new_tokens()

        # the enumerable task: a restricted vocabulary, and exact figures at each evaluation
        self.space: ExactSpace | None = None
        self.target: ExactTarget | None = None
        self.allowed: Tensor | None = None
        if recipe.task.name == "enumerable":
            try:
                self.space = build_exact_space(self.task, tokenizer).to(device)
            except NotEnumerableError as err:
                raise RecipeError(f"task.name enumerable: {err}") from None
            self.allowed = torch.tensor(self.space.vocab_ids, device=device)
            if not isinstance(self.reward, GradedReward):  # the space's r: the recipe's
                problem = self.task.rl_problem(random.Random(recipe.seed))
                texts = self.space.texts
                self.space = replace(
                    self.space, reward=self._rewards([problem] * len(texts), texts)
                )
        if self.cfg.target == "moments":
            self.lam = self._fit_moments(recipe.seed)
        if self.space is not None:
            log_ref = self.space.distribution(self.reference).log_probs
            if self.lam is not None:
                phi = feature_matrix(self.moment_names, self.space.texts).to(device)
                self.target = ExactTarget.from_log_target(
                    log_ref, moment_log_target(log_ref, phi, self.lam)
                )
            else:
                self.target = ExactTarget.build(self.space, log_ref, self.beta)
        # exact figures replace the generation-based evaluation (which samples unrestricted)
        self.generation_eval = self.space is None

        # a frozen copy of the policy (under LoRA, of its adapters alone)
        if self.cfg.proposal == "adaptive":
            self.proposal = frozen_copy(policy)
        self.proposal_updates = 0
        # running log Z per prompt: [log Σ_i P_i/q_i, number of samples]
        self.running: dict[str, list[float]] = {}

    @torch.no_grad()
    def _fit_moments(self, seed: int) -> Tensor:
        """λ of P = π_ref·exp(λ·φ) whose feature means are ``dpg.moments``, by SNIS on
        ``dpg.moment_samples`` reference samples of one prompt (its own seeded generator)."""
        problem = self.task.rl_problem(random.Random(f"tether-moments/{seed}"))
        out = sample(
            self.reference,
            self.tokenizer,
            [self.task.model_input(self.tokenizer, problem)] * self.cfg.moment_samples,
            max_new_tokens=self.max_new_tokens,
            temperature=1.0,
            generator=torch.Generator(device=self.device).manual_seed(seed + 104729),
            batch_size=1024,
            allowed_token_ids=None if self.allowed is None else self.allowed.tolist(),
        )
        phi = feature_matrix(self.moment_names, out.texts)
        targets = torch.tensor(list(self.cfg.moments.values()), dtype=torch.float64)
        try:
            fit = fit_moments(phi, targets)
        except ValueError as err:
            raise RecipeError(f"dpg.moments: {err}") from None
        if not fit.converged:
            raise RecipeError(
                f"dpg.moments: the reference samples cannot reach these means (max error "
                f"{fit.max_error:.3g}); move the targets inside the range the reference covers"
            )
        self.moment_fit = {
            "lambda/" + n: float(v) for n, v in zip(self.moment_names, fit.lam, strict=True)
        }
        self.moment_fit["moment_fit_ess"] = fit.effective_sample_size
        return fit.lam.to(self.device, torch.float64)

    def state_dict(self) -> dict[str, Any]:
        """The prompt stream, the sampling generator, the running log Z and the proposal."""
        return {
            **super().state_dict(),
            "running": copy.deepcopy(self.running),
            "proposal_updates": self.proposal_updates,
            "proposal": None if self.proposal is None else self.proposal.state_dict(),
        }

    def checkpoint_metadata(self) -> dict[str, Any]:
        """The ``dpg`` section: how the target and the proposal were set."""
        return {"dpg": self.recipe.dpg.model_dump()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.running = copy.deepcopy(state["running"])
        self.proposal_updates = state["proposal_updates"]
        if self.proposal is not None:
            self.proposal.load_state_dict(state["proposal"])

    # ------------------------------------------------------------------ sampling

    def _sequence_logprobs(self, model: nn.Module, responses: Responses) -> Tensor:
        """log π(y) of each response under ``model`` at T = 1, restricted to the task's
        vocabulary: the policy and the reference as the target and the exact figures see them."""
        r = responses
        logits = grouped_completion_logits(model, r.input_ids, r.attention_mask, r.prompt_len, 1.0)
        completion_ids = r.input_ids[:, r.prompt_len :]
        return restricted_sequence_logprobs(logits, completion_ids, r.mask, self.allowed)

    def _running_log_z(self, prompts: list[str], log_P: Tensor, log_q: Tensor) -> Tensor:
        """Add this step's P/q to each prompt's running sum; the log of the running means.
        Across processes every process adds every process's sums, in rank order, so the
        running table is the same everywhere (a prompt may come back on another process)."""
        sums = [
            (prompt, float(torch.logsumexp(log_P[rows].double() - log_q[rows].double(), 0)))
            for prompt, rows in zip(prompts, self._group_rows(len(prompts)), strict=True)
        ]
        out = []
        mine = distributed.rank() if distributed.active() else 0
        for r, share in enumerate(distributed.gather_objects(sums)):
            for prompt, log_sum in share:
                total, count = self.running.get(prompt, [-math.inf, 0.0])
                total = float(np.logaddexp(total, log_sum))  # fp64
                count += self.group_size
                self.running[prompt] = [total, count]
                if r == mine:
                    out.append(total - math.log(count))
        return torch.tensor(out, dtype=torch.float64, device=log_P.device)

    def _group_rows(self, n_prompts: int) -> list[slice]:
        return [slice(g * self.group_size, (g + 1) * self.group_size) for g in range(n_prompts)]

    @torch.no_grad()
    def next_batch(self) -> DPGBatch:
        cfg = self.cfg
        problems = [self.task.rl_problem(self.rng) for _ in range(cfg.prompts_per_step)]
        problems = distributed.shard(problems, "dpg.prompts_per_step")
        prompts = [self.task.model_input(self.tokenizer, p) for p in problems]
        sampler = self.proposal if self.proposal is not None else self.policy
        out = self.rollouts(
            sampler,
            [p for p in prompts for _ in range(self.group_size)],
            max_new_tokens=self.max_new_tokens,
            temperature=cfg.temperature,
            generator=self.generator,
            allowed_token_ids=None if self.allowed is None else self.allowed.tolist(),
        )

        responses = responses_from_sample(out, self.device)
        problem_of = [p for p in problems for _ in range(self.group_size)]
        reward = self._rewards(problem_of, out.texts)
        judged = zip(problem_of, out.texts, strict=True)
        correct = torch.tensor([self.task.is_correct(p, t) for p, t in judged], device=self.device)
        proposal_logp = sequence_logprobs(out.logprobs.to(self.device), responses.mask).double()
        ref_logp = self._sequence_logprobs(self.reference, responses).double()
        if self.lam is not None:
            phi = feature_matrix(self.moment_names, out.texts).to(self.device)
            log_P = moment_log_target(ref_logp, phi, self.lam)
        elif self.beta is None:
            log_P = constraint_log_target(ref_logp, correct)
        else:
            log_P = reward_log_target(ref_logp, reward, self.beta)
        log_z = None
        if cfg.log_z == "running":
            log_z = self._running_log_z(prompts, log_P, proposal_logp)
        elif cfg.log_z == "exact":
            assert self.target is not None
            log_z = torch.full(
                (len(prompts),), self.target.log_z, dtype=torch.float64, device=self.device
            )
        batch = DPGBatch(
            responses=responses,
            group_size=self.group_size,
            proposal_logp=proposal_logp,
            on_policy=self.proposal is None and cfg.temperature == 1.0,
            ref_logp=ref_logp,
            log_P=log_P,
            log_z=log_z,
            reward=reward,
            correct=correct,
            stats=sample_health(out.texts, out.finished, reward.view(-1, self.group_size)),
        )
        if self.proposal is not None:
            self._update_proposal(batch)
        return batch

    def _rewards(self, problems: list[Any], texts: list[str]) -> Tensor:
        """r of each response, fp64: the recipe's reward; the task's graded score is computed
        in fp64 itself (DPG's default, the numbers of earlier runs)."""
        if isinstance(self.reward, GradedReward):
            scores = [self.task.score(p, t) for p, t in zip(problems, texts, strict=True)]
            return torch.tensor(scores, dtype=torch.float64, device=self.device)
        return self.reward(problems, texts).to(self.device, torch.float64)

    def micro_batches(self, model: nn.Module, batch: DPGBatch, size: int) -> list[DPGBatch]:
        """Micro-batches of whole prompt groups; the loss is a mean over groups, so a
        micro-batch's own mean, weighted by its share of the groups, adds up to the batch's
        (:meth:`Stage.micro_batches`)."""
        groups = batch.reward.shape[0] // batch.group_size
        parts = micro_parts(groups, batch.group_size, size, self.device)
        if len(parts) == 1:
            return [batch]
        return [batch.select(index, share) for index, share in parts]

    def _update_proposal(self, batch: DPGBatch) -> None:
        """GDC++: the policy becomes the proposal when KL(p‖π) < KL(p‖q) on these samples
        (averaged over prompts). The batch keeps the log q of the proposal that drew it."""
        assert self.proposal is not None
        with eval_mode(self.policy):
            policy_logp = self._sequence_logprobs(self.policy, batch.responses)
        kls = []
        for g, rows in enumerate(batch.groups()):
            log_z = None if batch.log_z is None else batch.log_z[g]
            kls.append(
                kl_adaptive_proposal_update(
                    batch.log_P[rows], batch.proposal_logp[rows], policy_logp[rows], log_z
                )[1]
            )
        # averaged over every process's prompts: all processes take the same decision
        kl_pi_sum, kl_q_sum, n = distributed.all_sum(
            torch.tensor(
                [
                    sum(s["kl_target_policy"] for s in kls),
                    sum(s["kl_target_proposal"] for s in kls),
                    len(kls),
                ],
                dtype=torch.float64,
            )
        ).tolist()
        kl_pi, kl_q = kl_pi_sum / n, kl_q_sum / n
        update = kl_pi < kl_q  # a NaN (no sample inside a hard constraint) keeps q
        if update:
            self.proposal.load_state_dict(distributed.whole_weights(self.policy))  # FSDP: gathered
            self.proposal_updates += 1
        batch.stats.update(
            {
                "kl_target_proposal": kl_q,
                "proposal_updated": float(update),
                "proposal_updates": float(self.proposal_updates),
            }
        )

    # ------------------------------------------------------------------ loss

    def loss(self, model: nn.Module, batch: DPGBatch) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        policy_logp = self._sequence_logprobs(model, batch.responses)
        log_q = policy_logp.detach().double() if batch.on_policy else batch.proposal_logp
        losses, group_stats = [], []
        for g, rows in enumerate(batch.groups()):
            log_z = None if batch.log_z is None else batch.log_z[g]
            if log_z is not None and not math.isfinite(float(log_z)):
                log_z = None  # a running Z that has seen no P > 0 yet: this batch's instead
            if log_z is None and not bool(torch.isfinite(batch.log_P[rows]).any()):
                # a hard constraint that no sample of this prompt meets, and Z unknown: every
                # P/q is 0 and log Ẑ = −inf, no signal; the prompt adds nothing this step
                losses.append(0.0 * policy_logp[rows].sum())
                continue
            if self.divergence == "forward_kl":
                loss, stats = dpg_loss(
                    policy_logp[rows], log_q[rows], batch.log_P[rows], log_z, baseline=cfg.baseline
                )
            else:
                loss, stats = f_dpg_loss(
                    policy_logp[rows],
                    log_q[rows],
                    batch.log_P[rows],
                    log_z,
                    self.divergence,
                    baseline="loo" if cfg.baseline else "none",
                )
            stats["kl_target_policy"] = float(
                kl_target_policy(batch.log_P[rows], log_q[rows], policy_logp[rows].detach(), log_z)
            )
            losses.append(loss)
            group_stats.append(stats)
        loss = torch.stack(losses).mean()
        stats = {
            key: sum(s[key] for s in group_stats) / len(group_stats)
            for key in (group_stats[0] if group_stats else {})
        }
        with torch.no_grad():
            is_weights = None if batch.on_policy else log_q
            stats.update(
                {
                    **batch.stats,
                    "loss": float(loss.detach()),
                    "reward": float(batch.reward.mean()),
                    "accuracy": float(batch.correct.float().mean()),
                    # KL(π‖π_ref) per response: k1, importance-weighted when q is not π
                    "kl_policy_ref": float(
                        kl_policy_ref(policy_logp.detach(), batch.ref_logp, is_weights)
                    ),
                    "completion_tokens": float(batch.responses.mask.sum(1).float().mean()),
                }
            )
        return loss, stats

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Exact figures on the enumerable task (``exact/...``); none on other tasks."""
        if self.space is None or self.target is None:
            return {}
        with eval_mode(model):
            log_pi = self.space.distribution(model).log_probs
        figures = exact_figures(log_pi, self.space, self.target)
        if self.lam is not None:  # the feature means under π, to compare with dpg.moments
            phi = feature_matrix(self.moment_names, self.space.texts).to(log_pi.device)
            means = log_pi.detach().double().exp() @ phi
            figures.update(
                {f"moment/{n}": float(m) for n, m in zip(self.moment_names, means, strict=True)}
            )
            figures.update(self.moment_fit)
        return {f"exact/{key}": value for key, value in figures.items()}
