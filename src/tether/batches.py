"""The batches the stages train on, one type per kind, defined here and nowhere else.

A stage's ``next_batch()`` returns one of these and its ``loss(model, batch)`` reads it; the
loop only asks a batch for ``num_tokens`` (:class:`Batch`). Two layouts of token rows occur:

- **training rows** (:class:`TokenBatch`): prompt + completion right-padded, a ``loss_mask`` on
  the completion, aligned with ``input_ids`` (the objective predicts token t from position
  t − 1): demonstrations and preference pairs, and online pairs re-laid out from samples;
- **sampled rows**: as the sampler returns them, the prompt left-padded in the first
  ``prompt_len`` columns and the completion right-padded after them, with a completion ``mask``
  [B, T]: RL rollouts and DPG's samples.

The kinds:

=============================  ==============================  ===========================
batch                          stages                          rows
=============================  ==============================  ===========================
:class:`DemonstrationBatch`    mle, iqlearn                    training rows (+ policy
                                                               samples, online IQLearn)
:class:`RolloutBatch`          rl                              sampled rows, scored
:class:`OfflinePairBatch`      dpo, reward-model               training rows, 2B per B pairs
:class:`OnlinePairBatch`       online-dpo, xpo                 training rows, 2B per B pairs
:class:`DPGBatch`              dpg                             sampled rows (:class:`Responses`)
=============================  ==============================  ===========================

Tensors live on the stage's device; per-sequence tensors are [B], per-token ones [B, T].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase


class Batch(Protocol):
    """What the loop asks of every batch: its number of real tokens (throughput)."""

    @property
    def num_tokens(self) -> int: ...


@dataclass
class TokenBatch:
    """Right-padded prompt+completion sequences.

    ``loss_mask[b, t]`` is 1 where token ``t`` belongs to the completion (EOS included), so
    the objective predicts it from position ``t - 1``; prompt and padding carry no loss.
    """

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long, 1 for real tokens
    loss_mask: torch.Tensor  # [B, L] float, 1 for completion tokens

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.loss_mask))
        )

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate_pairs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    add_eos: bool = True,
) -> TokenBatch:
    """Tokenise prompt and completion separately (so the boundary is exact) and pad right."""
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return collate_token_rows(prompt_ids, [c + eos for c in completion_ids], pad)


def collate_token_rows(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad: int
) -> TokenBatch:
    """Prompt + completion token rows, right-padded; the loss mask covers the completion."""
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    loss = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (p, row) in enumerate(zip(prompt_ids, rows, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        attn[i, : len(row)] = 1
        loss[i, len(p) : len(row)] = 1.0
    return TokenBatch(ids, attn, loss)


# ----------------------------------------------------------------------------- the kinds


@dataclass
class DemonstrationBatch:
    """Demonstrations (and, for online IQLearn, policy samples) as one right-padded batch."""

    tokens: TokenBatch
    terminated: Tensor  # [B] bool: the row ends with EOS (not cut by the length limit)
    is_expert: Tensor | None  # [B] bool; None when every row is a demonstration

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens


@dataclass
class RolloutBatch:
    """One RL rollout, sampled and scored: everything an update needs. Sampled rows: sequences
    [B, P+T] (prompt left-padded in the first ``prompt_len`` columns), completion tensors
    [B, T]."""

    input_ids: Tensor
    attention_mask: Tensor
    prompt_len: int
    mask: Tensor  # [B, T] float, 1 for completion tokens (EOS included)
    old_logp: Tensor  # [B, T] the sampling policy's log-probs at temperature T
    ref_logp: Tensor  # [B, T] the reference's, at temperature T
    ref_log_softmax: Tensor  # [B, T, V] log π_ref(·|s) at temperature T: the exact KL
    kl_weights: Tensor | None  # [B, T] prioritised-KL weights Ĵ_ref^β_c, or None (w = 1)
    seq_rewards: Tensor  # [B] the reward of each completion
    correct: Tensor  # [B] bool: the task's checker
    reward_stats: dict[str, float] | None = None  # raw and calibrated means under CTRL

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class OfflinePairBatch:
    """B preference pairs of a dataset as 2B training rows: chosen responses in rows 0..B-1,
    the rejected responses of the same prompts in rows B..2B-1. ``ref_logp`` [2B, L]: the
    reference's token log-probs aligned with ``input_ids`` (DPO; None for a reward model)."""

    tokens: TokenBatch
    ref_logp: Tensor | None = None

    @property
    def pairs(self) -> int:
        return self.tokens.input_ids.shape[0] // 2

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens


@dataclass
class OnlinePairBatch:
    """B online pairs as 2B training rows: the policy samples y in rows 0..B-1, the second
    responses ỹ of the same prompts in rows B..2B-1; ``ref_logp`` [2B, L] the reference's token
    log-probs. The labels come from the rewards (``tether.objectives.preference_pairs``)."""

    tokens: TokenBatch
    ref_logp: Tensor
    policy_is_chosen: Tensor  # [B] bool: y (the policy sample) is the chosen response
    tie: Tensor  # [B] bool: equal rewards
    rewards: Tensor  # [2B]
    correct: Tensor  # [B] bool: the policy samples under the task's checker

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens


@dataclass
class Responses:
    """Sampled responses as model input (sampled rows): prompts left-padded, completions
    right-padded."""

    input_ids: Tensor  # [B, P+T]
    attention_mask: Tensor
    prompt_len: int
    mask: Tensor  # [B, T] completion tokens (EOS included)


@dataclass
class DPGBatch:
    """One DPG step's samples, scored: per-response tensors [B], fp64. Rows come in groups of
    ``group_size`` consecutive responses to the same prompt."""

    responses: Responses
    group_size: int
    proposal_logp: Tensor  # log q(y): the sampler's, at its temperature, restricted
    on_policy: bool  # q is the policy at T = 1: use the policy's own (detached) log-probs
    ref_logp: Tensor
    log_P: Tensor  # log π_ref + r/β, or −inf where a hard constraint fails
    log_z: Tensor | None  # [groups], or None: estimated per group from the batch
    reward: Tensor
    correct: Tensor
    stats: dict[str, float] = field(default_factory=dict)  # from sampling (proposal update)

    @property
    def num_tokens(self) -> int:
        return int(self.responses.attention_mask.sum())

    def groups(self) -> list[slice]:
        k = self.group_size
        return [slice(i, i + k) for i in range(0, self.reward.shape[0], k)]
