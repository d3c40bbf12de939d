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

**Micro-batches** (``train.micro_batch_size``): a stage cuts its batch into micro-batches of
whole units (rows; an RLOO or DPG prompt group; a pair, both of its rows) with each kind's
``select`` and marks each with a :class:`Share`: its weight w_i (its share of the batch's
units, Σ w_i = 1) and what its loss needs from the whole batch (the token counts that
divide token means, REINFORCE's baseline). The stage's loss on a micro-batch is then written so
that Σ_i w_i·loss_i is the loss of the whole batch, and Σ_i w_i·stats_i its figures
(:meth:`tether.stages.base.Stage.micro_batches`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Share:
    """Where a micro-batch sits in the batch it was cut from (module docstring).

    ``weight`` w: its share of the batch's units. ``denominators``: the whole batch's, as the
    stage's loss computes them for a whole batch (token counts, N / W across processes); the
    loss of a micro-batch divides by w·N, so that w·loss_i adds up to the whole batch's token
    mean. ``baseline``: REINFORCE's batch-mean baseline, the whole batch's. ``stats``: figures of
    the whole batch (counts) that replace the micro-batch's own.
    """

    weight: float
    denominators: tuple[Tensor | None, ...] = ()
    baseline: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    def denominator(self, i: int = 0) -> Tensor | None:
        """The whole batch's ``i``-th denominator scaled by w (None stays None)."""
        whole = self.denominators[i]
        return None if whole is None else whole * self.weight


class Batch(Protocol):
    """What the loop asks of every batch: its number of real tokens (throughput) and, for a
    micro-batch, its :class:`Share` of the batch it was cut from (None: a whole batch)."""

    share: Share | None

    @property
    def num_tokens(self) -> int: ...


def unit_parts(units: int, unit_rows: int, size: int) -> list[range]:
    """Consecutive runs of whole units (of ``unit_rows`` rows each) with at most ``size`` rows,
    and at least one unit each (a unit is never split, so a micro-batch may be one unit larger
    than ``size`` rows when a unit is)."""
    per = max(1, size // unit_rows)
    return [range(i, min(i + per, units)) for i in range(0, units, per)]


def _rows(x: Tensor, index: Tensor) -> Tensor:
    return x.index_select(0, index.to(x.device))


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

    def rows(self, index: Tensor) -> TokenBatch:
        """The rows ``index`` (a 1-D index tensor), in that order."""
        return TokenBatch(
            *(_rows(t, index) for t in (self.input_ids, self.attention_mask, self.loss_mask))
        )


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
    share: Share | None = None  # a micro-batch's place in its batch

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens

    def select(self, rows: Tensor, share: Share) -> DemonstrationBatch:
        """The micro-batch of ``rows`` (a 1-D index tensor)."""
        expert = None if self.is_expert is None else _rows(self.is_expert, rows)
        return DemonstrationBatch(
            self.tokens.rows(rows), _rows(self.terminated, rows), expert, share
        )


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
    # figures of the whole rollout: the raw and calibrated means under CTRL, the sample's
    # health (frac_truncated...: tether.stages.base.sample_health)
    reward_stats: dict[str, float] | None = None
    share: Share | None = None  # a micro-batch's place in its batch
    # [B] GRPO's group-normalised advantages, taken once over the whole rollout (else None)
    advantages: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def select(self, rows: Tensor, share: Share | None) -> RolloutBatch:
        """The micro-batch of ``rows`` (a 1-D index tensor): every per-row tensor's rows; with
        ``share`` None, a minibatch of its own (its own token count and baseline)."""
        return replace(
            self,
            input_ids=_rows(self.input_ids, rows),
            attention_mask=_rows(self.attention_mask, rows),
            mask=_rows(self.mask, rows),
            old_logp=_rows(self.old_logp, rows),
            ref_logp=_rows(self.ref_logp, rows),
            ref_log_softmax=_rows(self.ref_log_softmax, rows),
            kl_weights=None if self.kl_weights is None else _rows(self.kl_weights, rows),
            seq_rewards=_rows(self.seq_rewards, rows),
            correct=_rows(self.correct, rows),
            share=share,
            advantages=None if self.advantages is None else _rows(self.advantages, rows),
        )


@dataclass
class OfflinePairBatch:
    """B preference pairs of a dataset as 2B training rows: chosen responses in rows 0..B-1,
    the rejected responses of the same prompts in rows B..2B-1. ``ref_logp`` [2B, L]: the
    reference's token log-probs aligned with ``input_ids`` (DPO; None for a reward model)."""

    tokens: TokenBatch
    ref_logp: Tensor | None = None
    share: Share | None = None  # a micro-batch's place in its batch

    @property
    def pairs(self) -> int:
        return self.tokens.input_ids.shape[0] // 2

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens

    def select(self, pairs: Tensor, share: Share) -> OfflinePairBatch:
        """The micro-batch of ``pairs`` (a 1-D index tensor): both rows of each pair."""
        rows = pair_rows(pairs, self.pairs)
        ref = None if self.ref_logp is None else _rows(self.ref_logp, rows)
        return OfflinePairBatch(self.tokens.rows(rows), ref, share)


def pair_rows(pairs: Tensor, n_pairs: int) -> Tensor:
    """The rows of ``pairs`` in a batch of 2B rows laid out as the pair batches are (the first
    responses in rows 0..B-1, the second in B..2B-1): the micro-batch keeps that layout."""
    return torch.cat([pairs, pairs + n_pairs])


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
    stats: dict[str, float] = field(default_factory=dict)  # the samples' health (whole batch)
    share: Share | None = None  # a micro-batch's place in its batch

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens

    @property
    def pairs(self) -> int:
        return self.tokens.input_ids.shape[0] // 2

    def select(self, pairs: Tensor, share: Share) -> OnlinePairBatch:
        """The micro-batch of ``pairs`` (a 1-D index tensor): both rows of each pair."""
        rows = pair_rows(pairs, self.pairs)
        return replace(
            self,
            tokens=self.tokens.rows(rows),
            ref_logp=_rows(self.ref_logp, rows),
            policy_is_chosen=_rows(self.policy_is_chosen, pairs),
            tie=_rows(self.tie, pairs),
            rewards=_rows(self.rewards, rows),
            correct=_rows(self.correct, pairs),
            share=share,
        )


@dataclass
class Responses:
    """Sampled responses as model input (sampled rows): prompts left-padded, completions
    right-padded."""

    input_ids: Tensor  # [B, P+T]
    attention_mask: Tensor
    prompt_len: int
    mask: Tensor  # [B, T] completion tokens (EOS included)

    def rows(self, index: Tensor) -> Responses:
        """The rows ``index`` (a 1-D index tensor), in that order."""
        return Responses(
            _rows(self.input_ids, index),
            _rows(self.attention_mask, index),
            self.prompt_len,
            _rows(self.mask, index),
        )


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
    # from sampling: the proposal's update, the samples' health (whole batch)
    stats: dict[str, float] = field(default_factory=dict)
    share: Share | None = None  # a micro-batch's place in its batch

    @property
    def num_tokens(self) -> int:
        return int(self.responses.attention_mask.sum())

    def groups(self) -> list[slice]:
        k = self.group_size
        return [slice(i, i + k) for i in range(0, self.reward.shape[0], k)]

    def select(self, groups: Tensor, share: Share) -> DPGBatch:
        """The micro-batch of the prompt groups ``groups`` (a 1-D index tensor)."""
        k = self.group_size
        offsets = torch.arange(k, device=groups.device)
        rows = (groups[:, None] * k + offsets).reshape(-1)
        return replace(
            self,
            responses=self.responses.rows(rows),
            proposal_logp=_rows(self.proposal_logp, rows),
            ref_logp=_rows(self.ref_logp, rows),
            log_P=_rows(self.log_P, rows),
            log_z=None if self.log_z is None else _rows(self.log_z, groups),
            reward=_rows(self.reward, rows),
            correct=_rows(self.correct, rows),
            share=share,
        )
