"""IQLearn as TD-regularised MLE (docs/methods.md §4; Wulfmeier et al. 2024, arXiv 2409.01369).

The logits are soft Q-values: Q(s, a) = ℓ(s, a), V(s) = logsumexp_a ℓ(s, a), and
log π(a|s) = Q(s, a) − V(s). The implicit per-token reward is r̂_t = Q(s_t, a_t) − γ·V(s_{t+1}).
The offline loss over expert (dataset) response tokens is

    L = mean_t [ −log π(a_t|s_t) + λ·r̂_t² ]

(λ = 0 is exactly MLE; IQ-Learn's χ² divergence with λ = 1/(4α)). Gradients flow through both
V(s_t) and V(s_{t+1}): no detach, no target network.

Alignment (the same as :class:`tether.batches.TokenBatch` and ``shifted_token_logprobs``)
-------------------------------------------------------------------------------------
Every per-token tensor here is [B, L] and indexed by the *action position* t: the position of
the token a_t = ``input_ids[b, t]`` in the sequence, where ``loss_mask[b, t] = 1``. The logits at
position p are the model's output after reading tokens 0..p, i.e. the state that predicts token
p + 1. Hence, for a completion token at position t:

- s_t is the state at position t − 1:  Q_t = ``logits[b, t−1, input_ids[b, t]]``,
  V(s_t) = logsumexp ``logits[b, t−1, :]``, log π_t = Q_t − V(s_t);
- s_{t+1}, the state after a_t, is the state at position t − 1 of the *next* completion token
  t′ > t of the row: V(s_{t+1}) = logsumexp ``logits[b, t′−1, :]``. When the completion is
  contiguous t′ = t + 1, so V(s_{t+1}) = logsumexp ``logits[b, t, :]``. (Where the mask has a gap,
  e.g. environment tokens between two agent turns, the next *decision* state is the one before
  the next completion token; the tokens in between are transitions of the environment. This
  makes ``v_next`` at t equal ``v`` at t′, so sums telescope exactly.)
- after the last completion token t_T of a row:
    * ``terminated[b]`` True (the row ends with EOS, an absorbing state): V(s_{T+1}) = 0;
    * ``terminated[b]`` False (truncated at a length limit, *not* terminal): the state after
      a_T exists and its value is in the tensor: V(s_{T+1}) = logsumexp ``logits[b, t_T, :]``
      (the logits at the last real position; they predict the token that was never generated).
      We therefore *keep* the last TD term with γ·V of the next position rather than dropping
      it (docs/methods.md §4 allows either); truncation is never treated as terminal.

Position 0 has no predicting state, so a completion token there is ignored (``loss_mask[:, 0]``
is taken as 0; :func:`tether.batches.collate_pairs` never sets it).

Cost: a single logsumexp over the logits (the one MLE computes, plus the last position) gives
both log π and every V; the rest are [B, L] gathers. The backward pass is one softmax over the
logits, as for MLE.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tether.objectives.common import at_least_fp32, masked_mean


class SoftValues(NamedTuple):
    """Per-token soft-Q quantities, [B, L], aligned with ``input_ids`` at the action position.

    Entries where ``mask`` is 0 (prompt, padding, position 0) hold arbitrary finite values.
    """

    q: Tensor  # Q(s_t, a_t), the taken token's logit at the predicting position
    v: Tensor  # V(s_t) = logsumexp of the predicting position's logits
    v_next: Tensor  # V(s_{t+1}); 0 after the EOS of a terminated row
    logp: Tensor  # log π(a_t|s_t) = q − v
    reward: Tensor  # r̂_t = q − γ·v_next
    mask: Tensor  # float completion mask (``loss_mask`` with column 0 zeroed)


def _as_row_flag(flag: Tensor | bool, batch: int, device: torch.device) -> Tensor:
    """A per-row bool [B] from a bool tensor [B] or a Python bool (same for every row)."""
    if isinstance(flag, bool):
        return torch.full((batch,), flag, dtype=torch.bool, device=device)
    flag = flag.to(device=device, dtype=torch.bool)
    if flag.shape != (batch,):
        raise ValueError(f"expected a per-row flag of shape ({batch},), got {tuple(flag.shape)}")
    return flag


def _next_action_positions(real: Tensor) -> Tensor:
    """For each position t, the smallest t′ > t with ``real[b, t′]``; L where there is none."""
    length = real.shape[1]
    positions = torch.arange(length, device=real.device).expand_as(real)
    idx = torch.where(real, positions, torch.full_like(positions, length))
    after = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], length)], dim=1)
    # suffix minimum: cummin over the reversed row
    return torch.cummin(after.flip(1), dim=1).values.flip(1)


def terminated_from_eos(input_ids: Tensor, loss_mask: Tensor, eos_token_id: int) -> Tensor:
    """[B] bool: True where the row's last completion token is EOS (a terminated episode).

    Rows with no completion token are False. Use it when a batch holds no explicit flag, e.g.
    ``collate_pairs(..., add_eos=True)`` rows are all terminated.
    """
    real = loss_mask > 0
    length = real.shape[1]
    last = length - 1 - real.flip(1).long().argmax(dim=1)
    last_token = input_ids.gather(1, last.unsqueeze(1)).squeeze(1)
    return real.any(dim=1) & (last_token == eos_token_id)


def action_mask(loss_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The completion tokens the soft-Q losses score, as a float mask [B, L]: ``loss_mask``
    with position 0 zeroed (no state predicts it; module docstring). Its sum is the default
    denominator of their token means; a stage counts tokens with it (across processes)."""
    mask = loss_mask.to(dtype).clone()
    mask[:, 0] = 0.0
    return mask


def soft_values(
    logits: Tensor,
    input_ids: Tensor,
    loss_mask: Tensor,
    terminated: Tensor | bool,
    gamma: float = 1.0,
) -> SoftValues:
    """Q, V(s), V(s′), log π and r̂ per completion token, in fp32 (fp64 stays fp64).

    ``logits`` [B, L, V] over the full sequence, ``input_ids`` and ``loss_mask`` [B, L] as in
    :class:`tether.batches.TokenBatch`, ``terminated`` [B] bool (or one bool for all rows). See the
    module docstring for the alignment. Differentiable w.r.t. the logits through Q, V(s) and V(s′).
    """
    x = at_least_fp32(logits)
    batch, length, _ = x.shape
    # The same ops on the same views as shifted_token_logprobs, so that log π (and λ = 0) is
    # bit-for-bit the MLE one. lse_all[b, p] = V of the state at position p.
    picked = x[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    lse_main = torch.logsumexp(x[:, :-1], dim=-1)
    lse_last = torch.logsumexp(x[:, -1:], dim=-1)
    lse_all = torch.cat([lse_main, lse_last], dim=1)

    q = torch.nn.functional.pad(picked, (1, 0))
    v = torch.nn.functional.pad(lse_main, (1, 0))
    logp = torch.nn.functional.pad(picked - lse_main, (1, 0))

    mask = action_mask(loss_mask, x.dtype)
    real = mask > 0
    terminated = _as_row_flag(terminated, batch, x.device)

    next_action = _next_action_positions(real)
    has_next = next_action < length
    own = torch.arange(length, device=x.device).expand(batch, length)
    # the state before the next action; after the last action, the state right after it
    state_after = torch.where(has_next, next_action - 1, own)
    v_next = lse_all.gather(1, state_after)
    absorbing = ~has_next & terminated.unsqueeze(1)
    v_next = torch.where(absorbing, torch.zeros_like(v_next), v_next)
    reward = q - gamma * v_next
    return SoftValues(q=q, v=v, v_next=v_next, logp=logp, reward=reward, mask=mask)


def iqlearn_online_term(
    v: Tensor,
    v_next: Tensor,
    mask: Tensor,
    is_expert: Tensor,
    *,
    alpha_mix: float,
    gamma: float = 1.0,
    policy_token_count: Tensor | None = None,
    expert_token_count: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The online IQLearn value-difference term, to be *added* to the loss:

        α_mix · ( mean_{policy tokens}[V(s) − γ·V(s′)] − mean_{expert tokens}[V(s) − γ·V(s′)] ).

    ``v``, ``v_next``, ``mask`` [B, L] as in :class:`SoftValues` (``v_next`` already 0 after a
    terminal EOS); ``is_expert`` [B] bool marks dataset rows, the others are policy samples.
    Gradients flow through V(s) and V(s′).

    Sign: this is IQ-Learn's E_{ρ_mix}[V(s) − γV(s′)] with ρ_mix = (1 − α)·expert + α·policy,
    minus the expert part already inside the offline loss. Minimising it pushes V(s) − γV(s′)
    *down* on policy states and *up* on expert states: the policy's own states are made less
    valuable than the expert's. With γ = 1 the sum over a terminated row telescopes to
    V(s_1), so only the first state of each row moves; with γ < 1 every state of a terminated
    row has a positive weight (policy V goes down, expert V up); the state after a truncated
    row's last token has weight −γ (its V moves the other way).

    With no policy token or no expert token in the batch the term is 0 (a tensor, no sync).
    The two means divide by ``policy_token_count`` and ``expert_token_count`` (default: the
    batch's policy and expert tokens in ``mask``; across processes the stage passes N / W).
    """
    expert = is_expert.to(device=mask.device, dtype=torch.bool).unsqueeze(1)
    gap = v - gamma * v_next
    policy_mask = mask * (~expert).to(mask.dtype)
    expert_mask = mask * expert.to(mask.dtype)
    policy_gap = masked_mean(gap, policy_mask, policy_token_count)
    expert_gap = masked_mean(gap, expert_mask, expert_token_count)
    both = (policy_mask.sum() > 0) & (expert_mask.sum() > 0)
    term = torch.where(both, alpha_mix * (policy_gap - expert_gap), torch.zeros_like(policy_gap))
    with torch.no_grad():
        values = torch.stack(
            [term, policy_gap, expert_gap, policy_mask.sum(), expert_mask.sum()]
        ).tolist()
    keys = ("online_term", "value_gap_policy", "value_gap_expert", "policy_tokens", "expert_tokens")
    return term, dict(zip(keys, values, strict=True))


def iqlearn_loss(
    logits: Tensor,
    input_ids: Tensor,
    loss_mask: Tensor,
    terminated: Tensor | bool,
    *,
    lam: float,
    gamma: float = 1.0,
    is_expert: Tensor | None = None,
    alpha_mix: float = 0.1,
    token_count: Tensor | None = None,
    policy_token_count: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """IQLearn loss L = mean_t [−log π(a_t|s_t) + λ·r̂_t²] over expert response tokens.

    ``logits`` [B, L, V] from the model on the full sequence; ``input_ids``, ``loss_mask`` [B, L]
    as in :class:`tether.batches.TokenBatch`; ``terminated`` [B] bool (True: the row ends with EOS
    and V = 0 after it; False: truncated, the last TD term keeps γ·V of the state after the last
    token — see the module docstring). r̂_t = Q(s_t, a_t) − γ·V(s_{t+1}); gradients flow through
    both V(s_t) and V(s_{t+1}).

    ``is_expert`` [B] bool (optional) marks dataset rows in a mixed batch; the other rows are
    policy samples. NLL and TD terms then use the expert rows only, and the loss gains the online
    term :func:`iqlearn_online_term` with coefficient ``alpha_mix`` (the paper's 0.1; the caller
    fills that fraction of the batch with policy samples). ``None``: every row is expert and
    there is no online term (the offline loss).

    At λ = 0 (and no policy rows) the loss is bit-for-bit
    ``mle_loss(shifted_token_logprobs(logits, input_ids), loss_mask)``. Computed in fp32.

    Token means divide by ``token_count`` (default: the expert tokens of :func:`action_mask`)
    and, in the online term, ``policy_token_count`` (default: the policy rows' tokens); across
    processes the stage passes N / W of each (``tether.distributed.mean_count``).

    Stats: ``loss``, ``nll``, ``td`` (mean r̂²), ``reward_mean`` (mean r̂), ``value_mean``
    (mean V(s_t)), ``logp_mean`` (mean log π), ``tokens`` (expert tokens), and with
    ``is_expert`` also those of :func:`iqlearn_online_term`.
    """
    sv = soft_values(logits, input_ids, loss_mask, terminated, gamma)
    mask = sv.mask
    if is_expert is not None:
        expert = _as_row_flag(is_expert, mask.shape[0], mask.device)
        mask = mask * expert.unsqueeze(1).to(mask.dtype)
    n = (mask.sum() if token_count is None else token_count).clamp_min(1.0)
    real = mask > 0
    zero = torch.zeros_like(sv.logp)
    # −Σ m·log π / Σ m, as mle_loss computes it (the where only guards garbage at padding)
    nll = -(torch.where(real, sv.logp, zero) * mask).sum() / n
    reward = torch.where(real, sv.reward, zero)
    td = (reward.square() * mask).sum() / n
    loss = nll if lam == 0 else nll + lam * td

    online_stats: dict[str, float] = {}
    if is_expert is not None:
        term, online_stats = iqlearn_online_term(
            sv.v,
            sv.v_next,
            sv.mask,
            expert,
            alpha_mix=alpha_mix,
            gamma=gamma,
            policy_token_count=policy_token_count,
            expert_token_count=token_count,
        )
        loss = loss + term

    with torch.no_grad():
        values = torch.stack(
            [
                loss,
                nll,
                td,
                (reward * mask).sum() / n,
                masked_mean(sv.v, mask, token_count),
                -nll,
                n,
            ]
        ).tolist()
    keys = ("loss", "nll", "td", "reward_mean", "value_mean", "logp_mean", "tokens")
    stats = dict(zip(keys, values, strict=True))
    stats.update(online_stats)
    return loss, stats


def lambda_schedule(step: int, lam: float, warmup_steps: int) -> float:
    """λ warmed up linearly from 0 at step 0 to ``lam`` at ``warmup_steps`` (then constant).

    ``warmup_steps <= 0`` gives ``lam`` from the start. docs/methods.md §4: start λ at 0 (or from an
    SFT checkpoint) so the TD term does not fight an untrained policy.
    """
    if warmup_steps <= 0:
        return float(lam)
    return float(lam) * min(1.0, max(0.0, step / warmup_steps))


def mle_entropy_loss(
    logits: Tensor,
    input_ids: Tensor,
    loss_mask: Tensor,
    entropy_coef: float,
    token_count: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The MLE + entropy-bonus baseline (docs/methods.md §4): L = NLL − coef · mean_t H(π(·|s_t)).

    Both means are over completion tokens; H is the entropy at each one's predicting position
    (position t − 1 for the token at t). At ``entropy_coef = 0`` the loss is bit-for-bit
    ``mle_loss(shifted_token_logprobs(logits, input_ids), loss_mask)``. One logsumexp serves
    log π and H = logsumexp(ℓ) − Σ_a π(a)·ℓ(a). Both means divide by ``token_count`` (default:
    the tokens of :func:`action_mask`). Stats: ``loss``, ``nll``, ``entropy``, ``tokens``.
    """
    x = at_least_fp32(logits)
    states = x[:, :-1]
    picked = states.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    lse = torch.logsumexp(states, dim=-1)
    logp = torch.nn.functional.pad(picked - lse, (1, 0))
    mask = action_mask(loss_mask, x.dtype)
    real = mask > 0
    n = (mask.sum() if token_count is None else token_count).clamp_min(1.0)
    nll = -(torch.where(real, logp, torch.zeros_like(logp)) * mask).sum() / n

    p = torch.exp(states - lse.unsqueeze(-1))
    # 0·(−inf) = 0 for masked-out logits, in the value and the gradient
    p_x = p * torch.where(p > 0, states, torch.zeros_like(states))
    entropy = torch.nn.functional.pad(lse - p_x.sum(dim=-1), (1, 0))
    mean_entropy = masked_mean(entropy, mask, token_count)
    loss = nll if entropy_coef == 0 else nll - entropy_coef * mean_entropy
    with torch.no_grad():
        values = torch.stack([loss, nll, mean_entropy, n]).tolist()
    return loss, dict(zip(("loss", "nll", "entropy", "tokens"), values, strict=True))
