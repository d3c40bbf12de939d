"""Rollouts: where the stages' samples from the policy come from (``train.sampler``).

A rollout backend (:class:`Rollouts`) is called as ``rollouts(model, prompts,
max_new_tokens=..., temperature=..., generator=..., allowed_token_ids=...)`` and returns a
:class:`~tether.sampling.SampleOutput`, so a stage does not know which backend drew its
samples:

- ``hf`` (:class:`HFRollouts`): the built-in KV-cache sampler, :func:`tether.sampling.sample`;
- ``vllm`` (:class:`tether.vllm_backend.VLLMRollouts`): a ``vllm.LLM`` whose weights are
  refreshed from the model before each rollout.

Both put the model in eval mode for the rollout and back afterwards. The log-probs a stage gets
(PPO's ``old_logp``, DPG's log q) are those of the distribution the loss computes, so they are
recomputed by the model's own forward (:func:`rescore`) whenever the sampler's arithmetic is
not the loss's: always for vLLM (its kernels are not the trainer's), and for ``hf`` with
``train.precision: bf16`` (the fast runners compute in fp32, the loss's forward in bf16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tether.models import eval_mode
from tether.objectives.common import log_softmax_and_token_logprobs
from tether.sampling import SampleOutput, sample, vocab_bias


@torch.no_grad()
def rescore(
    model: nn.Module,
    out: SampleOutput,
    temperature: float,
    allowed_token_ids: Sequence[int] | None = None,
) -> Tensor:
    """[B, T] fp32 log-probs of ``out``'s completion tokens under ``model`` at ``temperature``
    (1 for greedy, as :func:`~tether.sampling.sample` reports them), renormalised over
    ``allowed_token_ids`` when given, 0 at padding: one forward pass over prompt + completion,
    laid out as the stages score rollouts."""
    from tether.rl import grouped_completion_logits  # rl imports this module

    device = next(model.parameters()).device
    completion_ids = out.completion_ids.to(device)
    mask = out.completion_mask.to(device)
    if completion_ids.shape[1] == 0:
        return torch.zeros(completion_ids.shape, dtype=torch.float32, device=device)
    input_ids = torch.cat([out.prompt_ids.to(device), completion_ids], dim=1)
    attention_mask = torch.cat([out.prompt_mask.to(device), mask], dim=1)
    t = temperature if temperature > 0 else 1.0
    # the pass the stages' losses use (length groups, tether.buckets): the same arithmetic, so
    # an unchanged policy gives a PPO ratio of exactly 1
    logits = grouped_completion_logits(model, input_ids, attention_mask, out.prompt_ids.shape[1], t)
    allowed = None
    if allowed_token_ids is not None:
        allowed = torch.tensor(list(allowed_token_ids), dtype=torch.long, device=device)
    return restricted_token_logprobs(logits, completion_ids, mask, allowed) * mask


def restricted_token_logprobs(
    logits: Tensor, tokens: Tensor, mask: Tensor, allowed: Tensor | None
) -> Tensor:
    """log π_V(y_t|s_t), [B, T, V] → [B, T], where π_V is the next-token distribution
    renormalised over the ``allowed`` ids (all of them when None): logits outside the set are
    −inf, as the sampler draws them. Values at padding (``mask`` 0) are meaningless."""
    if allowed is not None:
        logits = logits.float() + vocab_bias(allowed, logits.shape[-1])  # as the sampler does
        # padding holds a token outside the set: give it an allowed one (masked out anyway)
        tokens = torch.where(mask.bool(), tokens, allowed[0])
    # the normalisation the losses use (one log-softmax), so rescored and scored log-probs agree
    return log_softmax_and_token_logprobs(logits, tokens)[1]


@dataclass(frozen=True)
class Draw:
    """How to complete the prompts of one rollout."""

    max_new_tokens: int
    temperature: float
    generator: torch.Generator | None
    allowed_token_ids: Sequence[int] | None


class Rollouts:
    """A rollout backend: ``draw`` samples; calling it wraps that in eval mode and, with
    ``rescore``, replaces the log-probs by the model's own (module docstring)."""

    rescore = False

    def __call__(
        self,
        model: nn.Module,
        prompts: list[str],
        *,
        max_new_tokens: int,
        temperature: float,
        generator: torch.Generator | None,
        allowed_token_ids: Sequence[int] | None = None,
    ) -> SampleOutput:
        how = Draw(max_new_tokens, temperature, generator, allowed_token_ids)
        with eval_mode(model):
            out = self.draw(model, prompts, how)
            if self.rescore:
                out.logprobs = rescore(model, out, temperature, allowed_token_ids)
        return out

    def draw(self, model: nn.Module, prompts: list[str], how: Draw) -> SampleOutput:
        raise NotImplementedError


class HFRollouts(Rollouts):
    """The built-in KV-cache sampler; with ``rescore`` the log-probs are recomputed by the
    model's forward (``train.precision: bf16``)."""

    def __init__(self, tokenizer: Any, rescore: bool = False):
        self.tokenizer = tokenizer
        self.rescore = rescore

    def draw(self, model: nn.Module, prompts: list[str], how: Draw) -> SampleOutput:
        return sample(
            model,
            self.tokenizer,
            prompts,
            max_new_tokens=how.max_new_tokens,
            temperature=how.temperature,
            generator=how.generator,
            allowed_token_ids=how.allowed_token_ids,
        )


def make_rollouts(recipe: Any, policy: nn.Module, tokenizer: Any, device: torch.device) -> Rollouts:
    """The recipe's rollout backend (``train.sampler``) for ``policy``."""
    if recipe.train.sampler == "vllm":
        from tether.vllm_backend import VLLMRollouts

        return VLLMRollouts(recipe, policy, tokenizer, device)
    # bf16: the log-probs must be the losses' own (autocast) numbers, where a loss reads them
    return HFRollouts(
        tokenizer, rescore=recipe.train.precision != "fp32" and reads_logprobs(recipe)
    )


def reads_logprobs(recipe: Any) -> bool:
    """The stage reads the sampler's log-probs: PPO's old log-probs, DPG's log q. The others
    (REINFORCE, RLOO, A2C, online DPO/XPO, online IQLearn) use only the samples."""
    stage = recipe.train.stage
    return stage == "dpg" or (stage == "rl" and recipe.rl.algorithm == "ppo")
