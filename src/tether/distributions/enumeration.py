"""Exact diagnostics of a policy on the enumerable task: true figures, not estimates.

The enumerable task (:mod:`tether.tasks.enumerable`) has a response space small enough to
list; :mod:`tether.distributions.exact` turns a model into its probability on every response. Given the
policy π, the reference π_ref and the target p* ∝ π_ref·exp(r/β) (or π_ref·b for a hard
constraint), every figure the Bayesian view talks about is a finite sum (docs/methods.md §2, §5):

- ``kl_target_policy`` KL(p*‖π): what DPG (forward KL) minimises; small when π covers p*;
- ``kl_policy_target`` KL(π‖p*): what KL-RL minimises, = (β·log Z − J(π))/β;
- ``kl_policy_ref`` KL(π‖π_ref): how far the tether has been stretched;
- ``tv`` and ``js``: total variation and Jensen–Shannon between π and p*;
- ``entropy`` H(π) (nats), ``reward`` E_π[r], ``accuracy`` π(r is the top level);
- ``objective`` J(π) = E_π[r] − β·KL(π‖π_ref), ``log_z`` log Z (reward target only for J);
- ``rejection_acceptance``: how often exact rejection sampling of p* accepts a sample of π
  (quasi-rejection sampling at β_qrs = max p*/π, :func:`tether.distributions.exact.qrs_acceptance_rate`):
  1 when π = p*, and a measure of how usable π is as a proposal for the target.

Used by the DPG stage's ``evaluate`` (logged as ``exact/...``) and by
``tether eval CHECKPOINT --exact``. Both π and π_ref are the restricted policies of
:mod:`tether.distributions.exact` (renormalised over the task's vocabulary, at temperature 1), the very
distributions the DPG stage samples from.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from tether.distributions.exact import (
    ExactDistribution,
    entropy,
    enumerate_sequences,
    exact_distribution,
    expectation,
    jensen_shannon,
    kl,
    log_partition,
    target_distribution,
    total_variation,
)
from tether.tasks.prompts import format_prompt


class NotEnumerableError(ValueError):
    """The task (or the tokenizer) does not give a response space exact mode can list."""


@dataclass
class ExactSpace:
    """The enumerated responses of a task for one tokenizer, with their rewards."""

    prompt_ids: list[int]
    vocab_ids: list[int]  # EOS first, then the task's characters
    eos_id: int
    max_len: int
    sequences: list[tuple[int, ...]]  # exact.enumerate_sequences order
    texts: list[str]
    reward: Tensor  # [N] fp64, task.score of each response
    correct: Tensor  # [N] bool, task.is_correct

    def __len__(self) -> int:
        return len(self.sequences)

    def to(self, device: str | torch.device) -> ExactSpace:
        """The same space with its rewards and checks on ``device`` (a run's device)."""
        return replace(self, reward=self.reward.to(device), correct=self.correct.to(device))

    def distribution(self, model: Any, requires_grad: bool = False) -> ExactDistribution:
        """π(·|prompt) of ``model`` over the space (restricted to the vocabulary, T = 1)."""
        return exact_distribution(
            model,
            self.prompt_ids,
            self.vocab_ids,
            self.eos_id,
            self.max_len,
            requires_grad=requires_grad,
        )


def vocabulary_ids(tokenizer: Any, characters: str) -> list[int]:
    """EOS and one token id per character; NotEnumerableError unless each character is a single
    token of its own (then text and token sequences correspond one to one)."""
    ids = [tokenizer.eos_token_id]
    for ch in characters:
        encoded = tokenizer(ch, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1 or encoded[0] in ids or tokenizer.decode(encoded) != ch:
            raise NotEnumerableError(
                f"the tokenizer does not encode {ch!r} as a token of its own: the enumerable "
                "task needs one token per character (the char tokenizer has them)"
            )
        ids.append(int(encoded[0]))
    return ids


def exact_space(task: Any, tokenizer: Any) -> ExactSpace:
    """The space of an enumerable task (one with ``prompt``, ``vocabulary`` and ``max_len``)."""
    if not all(hasattr(task, key) for key in ("prompt", "vocabulary", "max_len")):
        raise NotEnumerableError(
            f"{type(task).__name__} has no enumerable response space (task.name enumerable has)"
        )
    vocab_ids = vocabulary_ids(tokenizer, task.vocabulary)
    eos = int(tokenizer.eos_token_id)
    # encoded as the sampler encodes prompts (``sample`` calls the tokenizer plainly)
    prompt_ids = tokenizer(format_prompt(tokenizer, task.prompt, task.prompt_format))
    sequences = enumerate_sequences(vocab_ids, eos, task.max_len)
    texts = [tokenizer.decode(list(s), skip_special_tokens=True) for s in sequences]
    problem = task.rl_problem(random.Random(0))  # the one fixed prompt
    return ExactSpace(
        prompt_ids=list(prompt_ids["input_ids"]),
        vocab_ids=vocab_ids,
        eos_id=eos,
        max_len=task.max_len,
        sequences=sequences,
        texts=texts,
        reward=torch.tensor([task.score(problem, t) for t in texts], dtype=torch.float64),
        correct=torch.tensor([task.is_correct(problem, t) for t in texts]),
    )


@dataclass
class ExactTarget:
    """p* over a space: P = π_ref·exp(r/β) (``beta``), or π_ref·b with b = is_correct (None)."""

    log_ref: Tensor  # [N] fp64
    log_target: Tensor  # [N] fp64, normalised log p*
    log_z: float
    beta: float | None

    @classmethod
    def build(cls, space: ExactSpace, log_ref: Tensor, beta: float | None) -> ExactTarget:
        log_ref = log_ref.detach().to(torch.float64)
        if beta is None:
            log_z = log_partition(log_ref, constraint=space.correct)
            log_p = target_distribution(log_ref, constraint=space.correct)
        else:
            log_z = log_partition(log_ref, space.reward, beta)
            log_p = target_distribution(log_ref, space.reward, beta)
        return cls(log_ref=log_ref, log_target=log_p, log_z=float(log_z), beta=beta)

    @classmethod
    def from_log_target(cls, log_ref: Tensor, log_P: Tensor) -> ExactTarget:
        """p* = P/Z from any unnormalised log P over the space (a moment-constraint EBM)."""
        log_P = log_P.detach().to(torch.float64)
        log_z = torch.logsumexp(log_P, 0)
        return cls(
            log_ref=log_ref.detach().to(torch.float64),
            log_target=log_P - log_z,
            log_z=float(log_z),
            beta=None,
        )

    def unnormalised(self, space: ExactSpace) -> Tensor:
        """log P = log p* + log Z for every response."""
        return self.log_target + self.log_z


def exact_figures(log_pi: Tensor, space: ExactSpace, target: ExactTarget) -> dict[str, float]:
    """The figures of the module docstring for a policy's log-probs over the space (detached).
    A KL that is infinite (π puts mass where a hard constraint fails) is left out."""
    lp = log_pi.detach().to(torch.float64)
    log_p = target.log_target
    figures = {
        "kl_target_policy": float(kl(log_p, lp)),
        "kl_policy_target": float(kl(lp, log_p)),
        "kl_policy_ref": float(kl(lp, target.log_ref)),
        "tv": float(total_variation(lp, log_p)),
        "js": float(jensen_shannon(lp, log_p)),
        "entropy": float(entropy(lp)),
        "reward": float(expectation(lp, space.reward)),
        "accuracy": float(expectation(lp, space.correct.to(torch.float64))),
        "log_z": target.log_z,
        # exact rejection sampling of p* with π as the proposal (QRS at β = max p*/π):
        # the share of π's samples accepted, 1 / max_y p*(y)/π(y)
        "rejection_acceptance": float(torch.exp(-(log_p - lp).max())),
    }
    if target.beta is not None:
        figures["objective"] = figures["reward"] - target.beta * figures["kl_policy_ref"]
    return {k: v for k, v in figures.items() if math.isfinite(v)}


def top_responses(
    log_pi: Tensor, space: ExactSpace, target: ExactTarget, k: int = 5
) -> list[dict[str, Any]]:
    """The k most probable responses under π, with π, p*, π_ref and r of each."""
    lp = log_pi.detach().to(torch.float64)
    order = torch.argsort(lp, descending=True)[:k].tolist()
    rows = []
    for i in order:
        seq = space.sequences[i]
        shown = space.texts[i] + ("<eos>" if seq and seq[-1] == space.eos_id else "")
        rows.append(
            {
                "response": shown,
                "policy": float(lp[i].exp()),
                "target": float(target.log_target[i].exp()),
                "reference": float(target.log_ref[i].exp()),
                "reward": float(space.reward[i]),
            }
        )
    return rows
