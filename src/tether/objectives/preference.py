"""Preference objectives: DPO, IPO, XPO, and the Bradley–Terry reward model (docs/methods.md §7).

Every loss here is a function of *sequence-level* quantities, one number per response:

    h_θ(x, y) = Σ_t m_t·(log π_θ(y_t|s_t) − log π_ref(y_t|s_t))        (:func:`sequence_logratios`)

with the chosen response y_w ("winner", y+) and the rejected one y_l ("loser", y−) of a pair.
β·h_θ(x, y) is DPO's *implicit reward*: the KL-RL optimum π* ∝ π_ref·exp(r/β) (docs/methods.md §2)
satisfies r(x, y) = β·log(π*/π_ref)(y|x) + β·log Z(x), and Z(x) cancels in a pairwise
difference. So a preference loss on Δ = h_θ(y_w) − h_θ(y_l) fits the KL-RL optimum directly,
with β the KL strength, no reward model and no sampling.

Tensors: token tensors are [B, T] over completion tokens with a float mask (1 = real token,
0 = padding); sequence tensors are [B], one entry per pair. Losses are means over the batch.
All math in fp32 (fp64 inputs stay fp64, for gradient checks). Each loss returns
``(loss, stats)`` with plain-float stats.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tether.objectives.common import at_least_fp32

PreferenceLoss = Literal["sigmoid", "ipo"]
PREFERENCE_LOSSES: tuple[PreferenceLoss, ...] = ("sigmoid", "ipo")


# ----------------------------------------------------------------------------- sequence sums


def sequence_logprobs(logp: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """log π(y|x) = Σ_t m_t·log π(y_t|s_t) per row: [B, T] → [B] (the mean over real tokens
    with ``average=True``; a row with no real token gives 0).

    Padding may hold anything (even ±inf): it is replaced by 0 before the sum, so neither the
    value nor the gradient is NaN there.
    """
    logp = at_least_fp32(logp)
    mask = mask.to(logp.dtype)
    total = (torch.where(mask > 0, logp, torch.zeros_like(logp)) * mask).sum(dim=-1)
    return total / mask.sum(dim=-1).clamp_min(1.0) if average else total


def sequence_logratios(
    policy_logp: Tensor, ref_logp: Tensor, mask: Tensor, average: bool = False
) -> Tensor:
    """h(x, y) = Σ_t m_t·(log π_θ(y_t|s_t) − log π_ref(y_t|s_t)) per row: [B, T] → [B].

    The reference is frozen: ``ref_logp`` is detached. ``average=True`` divides by the number
    of real tokens (a length-normalised log-ratio; TRL does this for its IPO loss, whereas
    Azar et al. state IPO with sequence log-probs, the default here).
    """
    log_ratio = at_least_fp32(policy_logp) - at_least_fp32(ref_logp).detach()
    return sequence_logprobs(log_ratio, mask, average=average)


# ----------------------------------------------------------------------------- pair losses


def _pair_stats(
    loss: Tensor, chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float
) -> dict[str, float]:
    """Shared stats of a pair loss: implicit rewards β·h and the reward margin β·(h_w − h_l)."""
    with torch.no_grad():
        chosen_reward = beta * chosen_logratio.detach()
        rejected_reward = beta * rejected_logratio.detach()
        margin = chosen_reward - rejected_reward
        return {
            "loss": loss.item(),
            "reward_margin": margin.mean().item(),
            # a tie (margin exactly 0) is not counted as a correct ranking
            "reward_accuracy": (margin > 0).to(margin.dtype).mean().item(),
            "chosen_reward": chosen_reward.mean().item(),
            "rejected_reward": rejected_reward.mean().item(),
        }


def _check_pair(chosen: Tensor, rejected: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen and rejected must have the same shape, got {tuple(chosen.shape)} "
            f"and {tuple(rejected.shape)}"
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return at_least_fp32(chosen), at_least_fp32(rejected)


def dpo_loss(
    chosen_logratio: Tensor,
    rejected_logratio: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Sigmoid DPO (Rafailov et al. 2023, arXiv 2305.18290), mean over pairs:

        L = −(1 − ε)·log σ(β·Δ) − ε·log σ(−β·Δ),        Δ = h_θ(y_w) − h_θ(y_l),

    the Bradley–Terry negative log-likelihood of the preference under the implicit reward
    β·h_θ. ε = ``label_smoothing`` ∈ [0, ½) is conservative DPO (Mitchell 2023): the label is
    taken to be flipped with probability ε, so the loss stops pushing once σ(βΔ) = 1 − ε
    instead of driving Δ to infinity. ε = 0 is plain DPO, −log σ(βΔ).

    ``chosen_logratio``, ``rejected_logratio`` [B] from :func:`sequence_logratios`.
    Stats: ``loss``, ``reward_margin`` (mean β·Δ), ``reward_accuracy`` (fraction with
    β·Δ > 0), ``chosen_reward`` and ``rejected_reward`` (mean β·h).
    """
    chosen, rejected = _check_pair(chosen_logratio, rejected_logratio, beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    logits = beta * (chosen - rejected)
    # log σ via logsigmoid: stable for large |βΔ| where log(sigmoid(·)) underflows to −inf
    losses = -F.logsigmoid(logits)
    if label_smoothing > 0:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    loss = losses.mean()
    return loss, _pair_stats(loss, chosen, rejected, beta)


def ipo_loss(
    chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float
) -> tuple[Tensor, dict[str, float]]:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv 2310.12036: their sampled IPO loss), mean over pairs:

        L = (Δ − 1/(2β))²,        Δ = h_θ(y_w) − h_θ(y_l),

    with β the paper's regularisation strength τ. Δ is the unscaled log-ratio difference (as in
    the paper and TRL's ``loss_type="ipo"``); the target 1/(2β) is finite, so unlike DPO the
    loss does not push a deterministic preference to Δ → ∞: the KL tether holds. Stats as in
    :func:`dpo_loss` (implicit rewards β·h).
    """
    chosen, rejected = _check_pair(chosen_logratio, rejected_logratio, beta)
    loss = ((chosen - rejected) - 1.0 / (2.0 * beta)).square().mean()
    return loss, _pair_stats(loss, chosen, rejected, beta)


def preference_loss(
    chosen_logratio: Tensor,
    rejected_logratio: Tensor,
    beta: float,
    kind: PreferenceLoss = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """:func:`dpo_loss` (``kind="sigmoid"``) or :func:`ipo_loss` (``kind="ipo"``)."""
    if kind == "sigmoid":
        return dpo_loss(chosen_logratio, rejected_logratio, beta, label_smoothing)
    if kind == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only")
        return ipo_loss(chosen_logratio, rejected_logratio, beta)
    raise ValueError(f"unknown preference loss {kind!r}: choose one of {PREFERENCE_LOSSES}")


def xpo_loss(
    chosen_logratio: Tensor,
    rejected_logratio: Tensor,
    ref_sample_logp: Tensor | None,
    beta: float,
    alpha: float,
    kind: PreferenceLoss = "sigmoid",
    label_smoothing: float = 0.0,
    keep: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """XPO (Xie et al. 2024, "Exploratory Preference Optimization", arXiv 2405.21046;
    docs/methods.md §7): online DPO plus an exploration bonus, minimised:

        L = −log σ(β·Δ) + α·log π_θ(ỹ|x),        ỹ ∼ π_ref(·|x),

    mean over the batch. ``ref_sample_logp`` [B] is log π_θ(ỹ|x), the *policy's* summed
    sequence log-prob (with gradient) of a response sampled from the *reference*
    (:func:`sequence_logprobs`). Minimising α·log π_θ(ỹ) lowers the policy's probability of
    what the reference would say, pushing mass toward responses π_ref rarely produces: the
    optimism that gives XPO its exploration guarantee. The bonus is a summed sequence
    log-prob, so α is tiny (TRL's default 1e-5, with β = 0.1). ``ref_sample_logp=None`` is
    online DPO: the pair loss alone, without the bonus or its stat. ``kind="ipo"`` replaces
    the sigmoid term by :func:`ipo_loss`.

    ``keep`` [B] bool (optional) names the pairs whose preference counts (online pairs with
    ``ties: drop`` leave tied pairs out): the pair loss is their mean, and 0 when none is
    kept (the batch then carries no preference signal). The bonus is over every ỹ.

    Stats: those of the pair loss (its ``loss`` renamed ``preference_loss``; only
    ``preference_loss`` = 0 when no pair is kept), ``xpo_bonus`` (mean log π_θ(ỹ|x)) and
    ``loss`` (the total).
    """
    if keep is None:
        pair_loss, stats = preference_loss(
            chosen_logratio, rejected_logratio, beta, kind=kind, label_smoothing=label_smoothing
        )
    elif bool(keep.any()):
        pair_loss, stats = preference_loss(
            chosen_logratio[keep],
            rejected_logratio[keep],
            beta,
            kind=kind,
            label_smoothing=label_smoothing,
        )
    else:  # every pair left out: a zero that keeps the graph (every parameter gets grad 0)
        pair_loss = (chosen_logratio.sum() + rejected_logratio.sum()) * 0.0
        stats = {"loss": 0.0}
    stats["preference_loss"] = stats.pop("loss")
    loss = pair_loss
    if ref_sample_logp is not None:
        ref_sample_logp = at_least_fp32(ref_sample_logp)
        if ref_sample_logp.shape != chosen_logratio.shape:
            raise ValueError(
                f"ref_sample_logp must have one entry per pair {tuple(chosen_logratio.shape)}, "
                f"got {tuple(ref_sample_logp.shape)}"
            )
        bonus = ref_sample_logp.mean()
        loss = pair_loss + alpha * bonus
        stats["xpo_bonus"] = bonus.item()
    stats["loss"] = loss.item()
    return loss, stats


# ----------------------------------------------------------------------------- online pairs


class PreferencePairs(NamedTuple):
    """Which of two responses per prompt is chosen, from their rewards: [B] bool tensors."""

    a_is_chosen: Tensor  # True where response a is y_w (the chosen one)
    tie: Tensor  # True where the rewards are equal (resolved toward the policy sample)

    def order(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """``(chosen, rejected)`` from per-response values of a and b ([B] or [B, ...]), e.g.
        their sequence log-ratios, token log-probs or token ids."""
        pick = self.a_is_chosen.reshape(self.a_is_chosen.shape + (1,) * (a.dim() - 1))
        return torch.where(pick, a, b), torch.where(pick, b, a)


def preference_pairs(
    rewards_a: Tensor, rewards_b: Tensor, *, policy_sample: Literal["a", "b"]
) -> PreferencePairs:
    """Label online pairs by reward: the higher-reward response is chosen (y_w).

    Two responses per prompt, a and b, scored by a reward model or checker ([B] each).
    ``policy_sample`` names the one sampled from the policy π_θ: a tie goes to it, as in XPO
    (y ∼ π_θ vs ỹ ∼ π_ref, "ties → policy sample", docs/methods.md §7). Preferring the policy's
    response on a tie leaves the reference's sample rejected, in line with XPO's optimism:
    a tie never pulls the policy toward what π_ref says. When both responses come from the
    policy (online DPO with two policy samples) the choice is arbitrary: pass ``"a"``. Tied
    pairs carry no preference signal; ``tie`` lets a caller drop or count them.
    """
    if rewards_a.shape != rewards_b.shape:
        raise ValueError(
            f"rewards_a and rewards_b must have the same shape, got {tuple(rewards_a.shape)} "
            f"and {tuple(rewards_b.shape)}"
        )
    if policy_sample not in ("a", "b"):
        raise ValueError(f"policy_sample must be 'a' or 'b', got {policy_sample!r}")
    if torch.isnan(rewards_a).any() or torch.isnan(rewards_b).any():
        raise ValueError("rewards must not be NaN")
    tie = rewards_a == rewards_b
    a_is_chosen = rewards_a > rewards_b
    if policy_sample == "a":
        a_is_chosen = a_is_chosen | tie
    return PreferencePairs(a_is_chosen=a_is_chosen, tie=tie)


# ----------------------------------------------------------------------------- reward model


def bradley_terry_loss(
    score_chosen: Tensor, score_rejected: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Reward-model loss under the Bradley–Terry model P(y_w ≻ y_l) = σ(s_w − s_l):

        L = −mean log σ(s_w − s_l),

    the negative log-likelihood of the observed preferences (Bradley & Terry 1952; Christiano
    et al. 2017; Ouyang et al. 2022). Scores are [B], one per response. Only differences
    matter: the loss is invariant to adding a constant to every score. Stats: ``loss``,
    ``accuracy`` (fraction with s_w > s_l; a tie counts as wrong), ``margin`` (mean s_w − s_l).
    """
    if score_chosen.shape != score_rejected.shape:
        raise ValueError(
            f"score_chosen and score_rejected must have the same shape, got "
            f"{tuple(score_chosen.shape)} and {tuple(score_rejected.shape)}"
        )
    margin = at_least_fp32(score_chosen) - at_least_fp32(score_rejected)
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        stats = {
            "loss": loss.item(),
            "accuracy": (margin > 0).to(margin.dtype).mean().item(),
            "margin": margin.mean().item(),
        }
    return loss, stats
