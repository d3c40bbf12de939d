"""Scoring: the log-probs of completions under a model, in one place.

Every stage scores token rows under the policy (with gradient) and under the frozen
reference (without), and the rollout backends rescore samples; they all go through here:
:func:`bucketed` runs a right-padded batch, :func:`grouped_completion_logits` returns the
logits that predict each completion token of prompt + completion rows, :func:`rescore` gives a
sample's token log-probs under a model.

**Length groups.** A training batch is padded to its longest row, and the model computes every padded position:
on the demo model's batches that is 16% of the positions of an addition MLE batch and 26% of
a DPO batch (short pairs beside long ones), more of the attention, whose cost grows with the
square of the length. :func:`bucketed` sorts the rows by length, cuts them into a few groups
(where a cut saves more padded positions than one more pass costs, :func:`length_buckets`),
runs the model on each group trimmed to its own longest row, and puts the per-position results
back in row order, padded with zeros: the same [B, L, ...] tensor a single pass would give, up
to float rounding, for less work.

Each group is also run without an attention mask. In a right-padded row every real token
comes before every pad, so causal attention alone never lets a real position see a pad: the
outputs at real positions are those of the masked pass, and the model takes its faster
mask-free path (no [B, 1, L, L] mask built; SDPA with ``is_causal``). Positions are 0..L−1 in
both. Outputs at padded positions are set to 0.

**Pairs.** Preference batches (the chosen rows, then the rejected rows of the same prompts)
go through :func:`pair_token_logprobs`: each pair is one packed row in which the tokens both
rows start with are computed once, under a 4D attention mask that gives every token the
context it has in its own row. Rows that share a prompt (the completions of a GRPO or RLOO
group) are packed the same way by :func:`packed_completion_window_logits`: the prompt is run
once for the group, in the reference pass and in the update.

Not for left-padded or gapped masks (the plain masked pass is used), nor under
``DistributedDataParallel``, whose gradient hooks allow one forward pass per backward, nor
under FSDP or DeepSpeed (one trimmed, mask-free pass is used).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tether.generation.sampler import SampleOutput, vocab_bias
from tether.objectives.common import (
    at_least_fp32,
    log_softmax_and_token_logprobs,
    shifted_token_logprobs,
    token_logprobs,
)

# One more forward and backward pass costs about as much as this many padded positions on the
# demo model (Python and op dispatch of a 4-layer pass, ~10-20 ms, against ~50-90 µs a
# position on two CPU cores); a cut is made only where it saves more.
PASS_COST_POSITIONS = 256


def length_buckets(lengths: Sequence[int], pass_cost: int | None = None) -> list[list[int]]:
    """Row indices grouped for :func:`bucketed`: sorted longest first and cut into contiguous
    groups that minimise Σ_groups (rows · longest row) + ``pass_cost`` · groups, the padded
    positions computed plus a price per pass (exact, by dynamic programming over the sorted
    rows; ``None``: :data:`PASS_COST_POSITIONS`). Every row is in exactly one group; one group
    when no cut pays."""
    pass_cost = PASS_COST_POSITIONS if pass_cost is None else pass_cost
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    longest = np.array([lengths[i] for i in order], dtype=np.float64)  # non-increasing
    # best[j]: the cheapest way to cover sorted rows [0, j); a group [i, j) costs (j-i)·L_i
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    starts = np.arange(n)
    for j in range(1, n + 1):
        costs = best[:j] + (j - starts[:j]) * longest[:j] + pass_cost
        cut[j] = int(np.argmin(costs))
        best[j] = costs[cut[j]]
    groups = []
    j = n
    while j > 0:
        i = int(cut[j])
        groups.append(order[i:j])
        j = i
    return groups[::-1]


def right_padded(attention_mask: Tensor) -> bool:
    """True when every row is its real tokens followed by padding (no left pads, no gaps)."""
    lengths = attention_mask.sum(dim=1, keepdim=True)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return bool(((positions < lengths) == attention_mask.bool()).all())


# Wrappers whose gradient hooks expect one forward pass per backward, by class name (FSDP2's
# `fully_shard` makes the module's class a subclass of FSDPModule; DeepSpeed may not be
# installed): the sharded engines the accelerate configurations of configs/accelerate set up.
_SHARDING_WRAPPERS = {"FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine"}


def _single_pass_only(model: nn.Module) -> bool:
    """DDP (its reducer refuses a second forward before the backward), FSDP and DeepSpeed
    (their hooks are written for one; not testable without GPUs, so not risked)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return True
    return any(c.__name__ in _SHARDING_WRAPPERS for c in type(model).__mro__)


def logits_of(model: nn.Module) -> Callable[[Tensor, Tensor | None], Tensor]:
    """The default pass of :func:`bucketed`: the model's logits (no KV cache: a scoring pass
    never continues, and activation checkpointing refuses one)."""
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def check_positions(model: nn.Module, length: int) -> None:
    """A model with learned positions (GPT-2's ``n_positions``) cannot read rows longer than
    its table: one RecipeError naming ``model.max_positions``, not an IndexError inside the
    embedding. Rotary models (Llama) have no such table and are not limited here."""
    limit = getattr(getattr(model, "config", None), "n_positions", None)
    if isinstance(limit, int) and length > limit:
        from tether.config import RecipeError

        raise RecipeError(
            f"model.max_positions: a batch row of {length} tokens does not fit the model's "
            f"{limit} learned positions; raise model.max_positions (or shorten the task's rows)"
        )


def bucketed(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    pass_cost: int | None = None,
    forward: Callable[[Tensor, Tensor | None], Tensor] | None = None,
) -> Tensor:
    """``fn(logits, input_ids)`` of every row ([B, L, ...], aligned with ``input_ids``; 0 at
    padded positions), computed group by group (module docstring). ``fn=None`` returns the
    logits themselves; ``forward(ids, mask)`` replaces the pass that gives them (default
    :func:`logits_of`; the mask is None in groups). For a batch that is not right-padded:
    one masked pass, unchanged."""
    check_positions(model, input_ids.shape[1])
    apply = fn if fn is not None else (lambda logits, _: logits)
    run = forward if forward is not None else logits_of(model)
    if not right_padded(attention_mask):
        return apply(run(input_ids, attention_mask), input_ids)
    width = input_ids.shape[1]

    def group(_: Tensor | None, ids: Tensor) -> Tensor:
        return _pad_to(apply(run(ids, None), ids), width)

    return _real_only(
        by_length_groups(model, input_ids, attention_mask, group, pass_cost), attention_mask
    )


def _first_loss_positions(loss_mask: Tensor) -> Tensor:
    """Each row's first loss position ([B]; 0 for a row without one: the whole row is
    scored)."""
    return loss_mask.ne(0).to(torch.int64).argmax(dim=1)


def _head_start(first: Tensor) -> int:
    """The column a group's LM head starts from (``logits_to_keep``): its logits predict
    the group's earliest loss token, ``first.min()``."""
    return max(int(first.min()) - 1, 0)


def loss_token_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor
) -> Tensor:
    """:func:`bucketed`'s ``shifted_token_logprobs`` of every row at its loss positions ([B, L]
    fp32, aligned with ``input_ids``; 0 at padding), for losses that read only the positions
    ``loss_mask`` marks (MLE on completions, DPO's sequence log-ratios). A model that takes
    ``logits_to_keep`` runs its LM head only from each length group's earliest loss position
    on, and the other columns before it are 0: on a chat model the prompt, template included,
    is much of each row, and the head over a 49k vocabulary and the log-softmax over its
    output are a large part of the step. Other models: :func:`bucketed`, every position."""
    if not keeps_logits(model) or not right_padded(attention_mask):
        return bucketed(model, input_ids, attention_mask, shifted_token_logprobs)
    check_positions(model, input_ids.shape[1])
    width = input_ids.shape[1]
    first = _first_loss_positions(loss_mask)

    def group(index: Tensor | None, ids: Tensor) -> Tensor:
        firsts = first if index is None else first.index_select(0, index)
        start = _head_start(firsts)
        keep = ids.shape[1] - start
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
        values = token_logprobs(logits[:, :-1], ids[:, start + 1 :])  # tokens start+1 ...
        return F.pad(values, (start + 1, width - ids.shape[1]))

    return _real_only(by_length_groups(model, input_ids, attention_mask, group), attention_mask)


def _common_prefix(input_ids: Tensor, attention_mask: Tensor, base: Tensor) -> Tensor:
    """[B]: how many tokens each right-padded row has in common with row ``base[b]`` from
    their start."""
    real = attention_mask.bool()
    same = (input_ids == input_ids[base]) & real & real[base]
    return same.to(torch.int64).cumprod(dim=1).sum(dim=1)


def shared_prefix_lengths(input_ids: Tensor, attention_mask: Tensor, pairs: int) -> Tensor:
    """[pairs]: how many tokens rows i and ``pairs`` + i (a pair's chosen and rejected rows,
    right-padded) have in common from their start."""
    base = torch.arange(pairs, device=input_ids.device).repeat(2)
    return _common_prefix(input_ids, attention_mask, base)[pairs:]


# Packed rows longer than this take the unpacked path: a packed row's attention needs an
# explicit [L, L] mask per row (a bool, and SDPA's float copy of it on the CPU).
PACKED_ROW_MAX = 1024


def packing_pays(row_len: Tensor, packed_len: Tensor) -> bool:
    """Whether rows of lengths ``row_len`` are worth packing into rows of lengths
    ``packed_len`` (:func:`pack_rows`): packing always computes fewer positions, but a packed
    row's attention covers its whole square, so rows that share little would cost more
    attention than alone (a pair sharing nothing: twice as much). Packed when the packed rows'
    squares add up to no more than the rows' own, and no packed row is longer than
    :data:`PACKED_ROW_MAX`."""
    squares = row_len.square().sum()
    return bool(packed_len.square().sum() <= squares) and int(packed_len.max()) <= PACKED_ROW_MAX


@dataclass(frozen=True)
class PackedRows:
    """Right-padded rows packed group by group (:func:`pack_rows`). Per packed column [G, W]:
    ``ids``, ``position`` (in its own row), ``source`` (its row, −1 on padding), ``cut`` (how
    many leading tokens its row shares with the group's first row; 0 in the first row),
    ``real`` and ``in_first`` (from the group's first row). Per row [B]: ``group``, ``slot``
    (its rank in its group), ``shared`` (its common prefix with the group's first row, 0 for
    the first row) and ``offset`` (the packed column of its token ``shared``)."""

    ids: Tensor
    position: Tensor
    source: Tensor
    cut: Tensor
    real: Tensor
    in_first: Tensor
    group: Tensor
    slot: Tensor
    shared: Tensor
    offset: Tensor

    def attention(self, packed: Tensor, cols: int) -> Tensor:
        """The 4D mask [n, 1, cols, cols] of the packed rows ``packed``: query q sees key k
        when k is real, k's position is at most q's, and k is in q's row or in the part of
        the group's first row that q's row shares with it; padding queries see column 0 (no
        empty softmax row)."""
        pos, src = self.position[packed, :cols], self.source[packed, :cols]
        ok, first = self.real[packed, :cols], self.in_first[packed, :cols]
        limit = self.cut[packed, :cols]
        sees = (pos[:, None, :] <= pos[:, :, None]) & ok[:, None, :]
        sees &= (src[:, None, :] == src[:, :, None]) | (
            first[:, None, :] & (pos[:, None, :] < limit[:, :, None])
        )
        sees[:, :, 0] |= ~ok
        return sees[:, None]

    def column(self, context: Tensor) -> Tensor:
        """The packed column whose output is each row's position ``context`` [B, T] (the
        first row's column while inside the shared prefix, else the row's own)."""
        shared, offset = self.shared[:, None], self.offset[:, None]
        return torch.where(context < shared, context, offset + context - shared)


def pack_rows(input_ids: Tensor, attention_mask: Tensor, group: Tensor) -> PackedRows | None:
    """The right-padded rows packed into one row per ``group`` [B] (ids 0 .. G−1): the group's
    first row, then each other row's tokens after the prefix it shares with the first row, at
    their own positions; under :meth:`PackedRows.attention` every token has exactly its own
    row's context. None where :func:`packing_pays` says no."""
    batch, width = input_ids.shape
    device = input_ids.device
    rows = torch.arange(batch, device=device)
    n_groups = int(group.max()) + 1
    first_row = torch.full((n_groups,), batch, device=device).scatter_reduce(
        0, group, rows, reduce="amin"
    )
    before = (group[:, None] == group[None, :]) & (rows[None, :] < rows[:, None])
    slot = before.sum(dim=1)  # [b, c]: row c is in b's group and comes before it
    base = first_row[group]
    lengths = attention_mask.sum(dim=1)
    shared = torch.where(base == rows, 0, _common_prefix(input_ids, attention_mask, base))
    own = lengths - shared  # the columns each row adds to its packed row
    offset = (before.to(torch.int64) * own[None, :]).sum(dim=1)  # its rows before it
    packed_len = torch.zeros(n_groups, dtype=torch.int64, device=device).index_add_(0, group, own)
    if not packing_pays(lengths, packed_len):
        return None
    # row b's tokens shared .. length - 1 at columns offset + (t - shared)
    packed_width = int(packed_len.max())
    source = torch.full((n_groups, packed_width), -1, dtype=torch.int64, device=device)
    position = torch.zeros((n_groups, packed_width), dtype=torch.int64, device=device)
    columns = torch.arange(width, device=device)
    placed = (columns[None, :] >= shared[:, None]) & attention_mask.bool()
    b, t = placed.nonzero(as_tuple=True)
    at = group[b] * packed_width + offset[b] + t - shared[b]
    source.view(-1)[at] = b
    position.view(-1)[at] = t
    real = source >= 0
    row = source.clamp(min=0)
    return PackedRows(
        ids=torch.where(real, input_ids[row, position], 0),
        position=position,
        source=source,
        cut=torch.where(real, shared[row], 0),
        real=real,
        in_first=real & (source == first_row[:, None]),
        group=group,
        slot=slot,
        shared=shared,
        offset=offset,
    )


def pair_token_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor
) -> Tensor:
    """:func:`loss_token_logprobs` of preference pairs, the B chosen rows then the B rejected
    rows of the same prompts, with the tokens the two rows of a pair share from their start
    (the prompt, and often the start of both responses) run once.

    Each pair becomes one packed row (:func:`pack_rows`): the chosen row, then the rejected
    row's tokens after the shared prefix of length c, at their own positions c, c+1, ...
    (``position_ids``), with a 4D attention mask under which every chosen token sees the chosen
    tokens before it and every rejected token sees the shared prefix and the rejected tokens
    before it: each token has exactly the context it has in its own row, so each log-prob is
    the unpacked one (to float rounding). Rejected token t is scored from packed position t − 1
    while t ≤ c (the shared prefix), from position L_w + t − 1 − c after it. Packed rows go
    through :func:`by_length_groups`, the LM head from each group's earliest loss position on.
    Models without ``logits_to_keep`` or custom attention masks (:func:`takes_4d_masks`),
    batches that are not right-padded and batches whose pairs share too little
    (:func:`packing_pays`) take :func:`loss_token_logprobs`."""
    packed = None
    pairs, width = input_ids.shape[0] // 2, input_ids.shape[1]
    if keeps_logits(model) and takes_4d_masks(model) and right_padded(attention_mask):
        pair = torch.arange(pairs, device=input_ids.device).repeat(2)
        packed = pack_rows(input_ids, attention_mask, pair)
    if packed is None:
        return loss_token_logprobs(model, input_ids, attention_mask, loss_mask)
    check_positions(model, width)
    lengths = attention_mask.sum(dim=1)
    # where each row's token t is predicted from: the column of its position t - 1
    t = torch.arange(width, device=input_ids.device)
    source = packed.column((t - 1).expand(2 * pairs, -1))
    first = _first_loss_positions(loss_mask)
    first = torch.minimum(first[:pairs], first[pairs:])

    def group(index: Tensor | None, ids: Tensor) -> tuple[Tensor, Tensor]:
        rows = torch.arange(pairs, device=input_ids.device) if index is None else index
        cols = ids.shape[1]
        start = _head_start(first[rows])
        logits = model(
            input_ids=ids,
            attention_mask=packed.attention(rows, cols),
            position_ids=packed.position[rows, :cols],
            use_cache=False,
            logits_to_keep=cols - start,
        ).logits
        # log π(token | context) = logit − logsumexp, one logsumexp per packed column (the
        # last prefix column serves both rows), gathered without copying [.., V] rows
        logits = at_least_fp32(logits)
        kept, vocab = logits.shape[1], logits.shape[2]
        normaliser = torch.logsumexp(logits, dim=-1)
        flat = logits.flatten(1)
        values = []
        for offset in (0, pairs):
            at = source[offset + rows] - start  # [n, width]: the column of `logits` for token t
            usable = (at >= 0) & (t[None, :] >= 1) & (t[None, :] < lengths[offset + rows, None])
            at = at.clamp(0, kept - 1)
            picked = flat.gather(1, at * vocab + input_ids[offset + rows])
            values.append(torch.where(usable, picked - normaliser.gather(1, at), 0.0))
        return values[0], values[1]

    packed_mask = packed.real.to(attention_mask.dtype)
    chosen, rejected = by_length_groups(model, packed.ids, packed_mask, group)
    return _real_only(torch.cat([chosen, rejected]), attention_mask)


def by_length_groups(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    run_group: Callable[[Tensor | None, Tensor], Any],
    pass_cost: int | None = None,
) -> Any:
    """The rows of a right-padded batch in length groups (:func:`length_buckets`; one group
    under a wrapper that allows one pass per backward): ``run_group(index, ids)`` gets a group's
    row indices (None: every row, in order) and its ids trimmed to its longest row, and returns
    one value per row ([n, ...]) or a tuple of such values; they come back in row order."""
    lengths = attention_mask.sum(dim=1).tolist()
    batch = input_ids.shape[0]
    groups = (
        [list(range(batch))] if _single_pass_only(model) else length_buckets(lengths, pass_cost)
    )
    if len(groups) == 1:
        # one layout: a compiled model's guards hold
        return run_group(None, input_ids[:, : max(lengths)].contiguous())
    parts, rows = [], []
    for group in groups:
        index = torch.tensor(group, device=input_ids.device)
        longest = max(lengths[i] for i in group)
        parts.append(run_group(index, input_ids.index_select(0, index)[:, :longest].contiguous()))
        rows.append(index)
    inverse = torch.empty(batch, dtype=torch.long, device=input_ids.device)
    inverse[torch.cat(rows)] = torch.arange(batch, device=input_ids.device)
    if isinstance(parts[0], tuple):  # several values per row: each in row order
        columns = zip(*parts, strict=True)
        return tuple(torch.cat(values).index_select(0, inverse) for values in columns)
    return torch.cat(parts).index_select(0, inverse)


def left_to_right_padded(
    input_ids: Tensor, attention_mask: Tensor, prompt_len: int, pad_id: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Sampler rows (prompt left-padded in the first ``prompt_len`` columns, completion
    right-padded after them) as right-padded rows: each row's real tokens moved to its start.
    Returns the ids and mask [B, W] and ``starts`` [B], the column of each row's first
    completion token (its real prompt length). Positions are 0.. in both layouts."""
    batch, width = input_ids.shape
    pads = prompt_len - attention_mask[:, :prompt_len].sum(dim=1)  # left pads of each row
    source = torch.arange(width, device=input_ids.device) + pads[:, None]
    inside = source < width
    source = source.clamp(max=width - 1)
    ids = torch.where(inside, input_ids.gather(1, source), pad_id)
    mask = torch.where(inside, attention_mask.gather(1, source), 0)
    return ids, mask, prompt_len - pads


def completion_window(values: Tensor, starts: Tensor, length: int) -> Tensor:
    """``values`` [B, W, ...] at the positions that predict each completion token of
    right-padded rows whose completions begin at ``starts`` [B]: [B, length, ...], row b's
    entry j taken from position starts[b] − 1 + j."""
    steps = torch.arange(length, device=values.device)
    index = (starts[:, None] - 1 + steps).clamp(max=values.shape[1] - 1)
    index = index.reshape(*index.shape, *([1] * (values.dim() - 2))).expand(
        -1, -1, *values.shape[2:]
    )
    return values.gather(1, index)


def _pad_to(values: Tensor, width: int) -> Tensor:
    """[n, l, ...] -> [n, width, ...], zeros after column l."""
    missing = width - values.shape[1]
    if missing == 0:
        return values
    pad = values.new_zeros(values.shape[0], missing, *values.shape[2:])
    return torch.cat([values, pad], dim=1)


def _real_only(values: Tensor, attention_mask: Tensor) -> Tensor:
    real = attention_mask.bool().reshape(*attention_mask.shape, *([1] * (values.dim() - 2)))
    return torch.where(real, values, torch.zeros((), dtype=values.dtype, device=values.device))


def grouped_completion_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    temperature: float,
    hidden: bool = False,
    raw: bool = False,
) -> Any:
    """Logits/T at the positions that predict each completion token, [B, T, V] fp32, of rows
    [B, P+T] with the prompt (left-padded) in the first ``prompt_len`` columns (``raw``: the
    logits as the model gives them, its dtype, not divided by T, for
    :func:`~tether.objectives.common.chunked_token_logprobs`). The rows are
    made right-padded and run in length groups without a mask (:mod:`tether.scoring`): the
    values of one masked pass at real completion tokens, up to float rounding, for less work
    (no pass over most padding, no [B, 1, L, L] mask); zeros at completion padding. With
    ``hidden`` also the last hidden states there, as fp32.

    A model that takes ``logits_to_keep`` (Hugging Face causal LMs) computes its LM head only
    from the first completion window of the group on (:func:`completion_window_logits`): on a
    chat model the prompt is most of each row, and the [B, L, V] logits over a 49k vocabulary
    (their head, casts, gathers and backward) were the biggest part of a scoring pass."""
    ids, mask, starts = left_to_right_padded(input_ids, attention_mask, prompt_len)
    length = input_ids.shape[1] - prompt_len
    if keeps_logits(model) and right_padded(mask):
        check_positions(model, ids.shape[1])
        # a group's shared prompt run once, where that applies and pays
        out = packed_completion_window_logits(model, ids, mask, starts, length, hidden)
        if out is None:
            out = completion_window_logits(model, ids, mask, starts, length, hidden=hidden)
        logits, states = out if hidden else (out, None)
        if not raw:
            logits = logits.float()
            logits = logits / temperature if temperature != 1.0 else logits
        return (logits, states) if hidden else logits
    forward, vocab = None, None
    if hidden:

        def forward(x: Tensor, m: Tensor | None) -> Tensor:
            nonlocal vocab
            out = model(input_ids=x, attention_mask=m, output_hidden_states=True, use_cache=False)
            vocab = out.logits.shape[-1]
            return torch.cat([out.logits.float(), out.hidden_states[-1].float()], dim=-1)

    values = bucketed(model, ids, mask, forward=forward)
    window = completion_window(values, starts, length)
    logits = window[..., :vocab].float() if hidden else window.float()
    if temperature != 1.0 and not raw:
        logits = logits / temperature
    return (logits, window[..., vocab:]) if hidden else logits


def completion_window_logits(
    model: nn.Module, ids: Tensor, mask: Tensor, starts: Tensor, length: int, hidden: bool = False
) -> Any:
    """The model's logits at the positions that predict each completion token of right-padded
    rows (completions beginning at ``starts``), [B, length, V] in the model's dtype, 0 past
    each row's end: :func:`completion_window` of :func:`bucketed`'s logits, with the LM head
    run only on the positions from the group's earliest window on (``logits_to_keep``). With
    ``hidden``, (logits, the last hidden states at the same positions [B, length, C] in
    fp32)."""
    row_lengths = mask.sum(dim=1)
    steps = torch.arange(length, device=ids.device)

    def window(index: Tensor | None, group_ids: Tensor) -> Any:
        first = starts if index is None else starts.index_select(0, index)
        ends = row_lengths if index is None else row_lengths.index_select(0, index)
        low = int(first.min()) - 1  # the group's first position that predicts a completion token
        keep = group_ids.shape[1] - low
        out = model(
            input_ids=group_ids, use_cache=False, logits_to_keep=keep, output_hidden_states=hidden
        )
        positions = first[:, None] - 1 + steps  # [n, length], in the row
        index_in = (positions - low).clamp(max=keep - 1)[..., None]
        real = (positions < ends[:, None])[..., None]

        def pick(values: Tensor) -> Tensor:  # [n, keep, ...] -> [n, length, ...], 0 past ends
            picked = values.gather(1, index_in.expand(-1, -1, values.shape[-1]))
            zero = torch.zeros((), dtype=picked.dtype, device=picked.device)
            return torch.where(real, picked, zero)

        logits = pick(out.logits)
        if not hidden:
            return logits
        return logits, pick(out.hidden_states[-1][:, low:].float())

    return by_length_groups(model, ids, mask, window)


def packed_completion_window_logits(
    model: nn.Module, ids: Tensor, mask: Tensor, starts: Tensor, length: int, hidden: bool = False
) -> Any:
    """:func:`completion_window_logits` with the prompt that a group's rows share run once,
    or None where that does not apply or pay (then the caller runs the rows as they are).

    The rows with the same prompt (the k completions of a GRPO or RLOO group) become one packed
    row (:func:`pack_rows`): the group's first row, then each other row's tokens after the
    prefix it shares with the first row (at least the prompt), at their own positions
    (``position_ids``), under a 4D attention mask in which a token sees its own row's tokens
    before it and the first row's tokens in their shared prefix, as in
    :func:`pair_token_logprobs`. Row b's token t is predicted from the first row's column
    t − 1 while t − 1 is inside their shared prefix, else from its own segment. Only for
    right-padded rows (:func:`left_to_right_padded`) of a model that takes ``logits_to_keep``
    and custom masks (:func:`takes_4d_masks`)."""
    if not takes_4d_masks(model):
        return None
    batch, width = ids.shape
    device = ids.device
    columns = torch.arange(width, device=device)
    prompts = torch.where(columns[None, :] < starts[:, None], ids, -1)
    _, group_of = torch.unique(prompts, dim=0, return_inverse=True)
    if int(group_of.max()) + 1 == batch:
        return None
    packed = pack_rows(ids, mask, group_of)
    if packed is None:
        return None
    n_groups, slots = packed.ids.shape[0], int(packed.slot.max()) + 1
    # row b's completion step j: token starts + j, predicted from position starts + j - 1
    context = starts[:, None] - 1 + torch.arange(length, device=device)
    window_real = context < mask.sum(dim=1)[:, None]  # as completion_window_logits: the last
    # real position's logits too (they predict the token after the row)
    # [groups, slots, length]: the column each slot's window reads, and where it is real
    read = torch.zeros((n_groups, slots, length), dtype=torch.int64, device=device)
    read[group_of, packed.slot] = packed.column(context)
    read_real = torch.zeros((n_groups, slots, length), dtype=torch.bool, device=device)
    read_real[group_of, packed.slot] = window_real

    def group(index: Tensor | None, group_ids: Tensor) -> Any:
        chosen = torch.arange(n_groups, device=device) if index is None else index
        n, cols = group_ids.shape
        where, live = read[chosen], read_real[chosen]
        low = int(where[live].min()) if bool(live.any()) else cols - 1
        keep = cols - low
        out = model(
            input_ids=group_ids,
            attention_mask=packed.attention(chosen, cols),
            position_ids=packed.position[chosen, :cols],
            use_cache=False,
            logits_to_keep=keep,
            output_hidden_states=hidden,
        )
        index_in = (where - low).clamp(0, keep - 1).view(n, slots * length, 1)

        def pick(values: Tensor) -> Tensor:  # [n, keep, ...] -> [n, slots, length, ...]
            picked = values.gather(1, index_in.expand(-1, -1, values.shape[-1]))
            picked = picked.view(n, slots, length, values.shape[-1])
            zero = torch.zeros((), dtype=picked.dtype, device=picked.device)
            return torch.where(live[..., None], picked, zero)

        logits = pick(out.logits)
        if not hidden:
            return logits
        return logits, pick(out.hidden_states[-1][:, low:].float())

    out = by_length_groups(model, packed.ids, packed.real.to(mask.dtype), group)
    values = out if isinstance(out, tuple) else (out,)
    per_row = tuple(v[group_of, packed.slot] for v in values)
    return per_row if hidden else per_row[0]


def unwrapped(model: nn.Module) -> Any:
    """The causal LM inside a DDP, DeepSpeed, ``torch.compile`` or PEFT wrapper, or a LoRA
    run's reference (:class:`~tether.models.lora.LoraReference`)."""
    inner: Any = model
    for _ in range(5):  # the wrappers' own module attributes, outermost first
        if isinstance(getattr(inner, "policy", None), nn.Module):  # tether.models.lora's
            inner = inner.policy
        elif hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "_orig_mod", None), nn.Module):
            inner = inner._orig_mod
        elif isinstance(getattr(inner, "module", None), nn.Module):
            inner = inner.module
        else:
            break
    return inner


def keeps_logits(model: nn.Module) -> bool:
    """Whether ``model`` (under any of :func:`unwrapped`'s wrappers) is a causal LM whose
    forward takes ``logits_to_keep`` (the LM head on the last positions only)."""
    return "logits_to_keep" in inspect.signature(unwrapped(model).forward).parameters


def takes_4d_masks(model: nn.Module) -> bool:
    """Whether ``model`` attends under a custom [B, 1, L, L] mask: Hugging Face's ``sdpa`` and
    ``eager`` attention do; FlashAttention and the kernels of other back ends take padding
    masks only."""
    config = getattr(unwrapped(model), "config", None)
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager")


@torch.no_grad()
def rescore(
    model: nn.Module,
    out: SampleOutput,
    temperature: float,
    allowed_token_ids: Sequence[int] | None = None,
) -> Tensor:
    """[B, T] fp32 log-probs of ``out``'s completion tokens under ``model`` at ``temperature``
    (1 for greedy, as :func:`~tether.generation.sampler.sample` reports them), renormalised over
    ``allowed_token_ids`` when given, 0 at padding: one forward pass over prompt + completion,
    laid out as the stages score rollouts."""
    from tether.scoring import grouped_completion_logits

    device = next(model.parameters()).device
    completion_ids = out.completion_ids.to(device)
    mask = out.completion_mask.to(device)
    if completion_ids.shape[1] == 0:
        return torch.zeros(completion_ids.shape, dtype=torch.float32, device=device)
    input_ids = torch.cat([out.prompt_ids.to(device), completion_ids], dim=1)
    attention_mask = torch.cat([out.prompt_mask.to(device), mask], dim=1)
    t = temperature if temperature > 0 else 1.0
    # the pass the stages' losses use (length groups, tether.scoring): the same arithmetic, so
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
