"""Rollout backends: where the stages' samples from the policy come from (``train.sampler``).

A rollout backend (:class:`RolloutBackend`) is called as ``backend(model, prompts,
max_new_tokens=..., temperature=..., generator=..., allowed_token_ids=...)`` and returns a
:class:`~tether.generation.sampler.SampleOutput`, so a stage does not know which backend drew its
samples (the stage's common set-up, :class:`tether.stages.base.Stage`, picks the recipe's):

- ``hf`` (:class:`HFRolloutBackend`): the built-in KV-cache sampler,
  :func:`tether.generation.sampler.sample`;
- ``vllm`` (:class:`tether.generation.vllm.VLLMRolloutBackend`): a ``vllm.LLM`` whose weights
  are refreshed from the model before each rollout.

Both put the model in eval mode for the rollout and back afterwards. The log-probs a stage gets
(PPO's ``old_logp``, DPG's log q) are those of the distribution the loss computes, so they are
recomputed by the model's own forward (:func:`rescore`) whenever the sampler's arithmetic is
not the loss's: always for vLLM (its kernels are not the trainer's), and for ``hf`` with
``train.precision: bf16`` (the fast runners compute in bf16 with their own op order, the
loss's forward under autocast).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tether.generation.sampler import SampleOutput, sample
from tether.models.loading import eval_mode
from tether.scoring import rescore


@dataclass(frozen=True)
class Draw:
    """How to complete the prompts of one rollout."""

    max_new_tokens: int
    temperature: float
    generator: torch.Generator | None
    allowed_token_ids: Sequence[int] | None


class RolloutBackend:
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


class HFRolloutBackend(RolloutBackend):
    """The built-in KV-cache sampler, in ``dtype`` (None: the weights'; ``train.precision:
    bf16`` samples in bf16); with ``rescore`` the log-probs are recomputed by the model's
    forward (``train.precision: bf16``: the loss's autocast arithmetic, not the sampler's)."""

    def __init__(self, tokenizer: Any, rescore: bool = False, dtype: torch.dtype | None = None):
        self.tokenizer = tokenizer
        self.rescore = rescore
        self.dtype = dtype

    def draw(self, model: nn.Module, prompts: list[str], how: Draw) -> SampleOutput:
        return sample(
            model,
            self.tokenizer,
            prompts,
            max_new_tokens=how.max_new_tokens,
            temperature=how.temperature,
            generator=how.generator,
            allowed_token_ids=how.allowed_token_ids,
            dtype=self.dtype,
        )
