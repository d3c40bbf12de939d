"""KL between the policy and the frozen reference, per token (docs/methods.md §1 and §3).

Tensors are [B, T] over completion tokens with a float ``mask`` [B, T] (1 = real token,
0 = padding). ``logp`` = log π_θ(a_t|s_t) and ``ref_logp`` = log π_ref(a_t|s_t) of the sampled
token; the log-ratio is ρ = logp − ref_logp. All math in fp32 (fp64 inputs stay fp64).

Where the KL goes is the caller's choice (docs/methods.md §1, "Placement"): into the reward with
``policy_gradient.shape_rewards_with_kl``, or into the loss as
``kl_coef * masked_mean(kl_penalty(...), mask)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from tether.objectives.common import (
    CertaintyForm,
    CertaintyNormalization,
    at_least_fp32,
    certainty,
)

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[KLEstimator, ...] = ("k1", "k2", "k3")


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: KLEstimator) -> Tensor:
    """Single-sample estimate of KL(π‖π_ref) at each sampled token (Schulman, "Approximating KL").

    With ρ = log π(a|s) − log π_ref(a|s), a ∼ π, and r = π_ref/π = exp(−ρ):

    - ``"k1"``: k1 = ρ                      unbiased, high variance, can be negative;
    - ``"k2"``: k2 = ½ρ²                    biased (E_π[k2] = KL + O(ρ³)), ≥ 0;
    - ``"k3"``: k3 = (r − 1) − log r = exp(−ρ) − 1 + ρ    unbiased and ≥ 0.

    Elementwise; returns the broadcast shape of the inputs. docs/methods.md §1.
    """
    log_ratio = at_least_fp32(logp) - at_least_fp32(ref_logp)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        # expm1(−ρ) ≥ −ρ holds after rounding too, so k3 ≥ 0 exactly; exp(−ρ) − 1 + ρ can round
        # below zero for small ρ.
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}: choose one of {KL_ESTIMATORS}")


def exact_kl(logits: Tensor, ref_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Full-vocabulary KL(π‖π_ref) = Σ_a π(a)·(log π(a) − log π_ref(a)) at each position.

    π = softmax(logits / T), π_ref = softmax(ref_logits / T); logits [..., V] → KL [...].
    Tokens with π(a) = 0 (logit −inf) contribute 0, not NaN. Differentiable w.r.t. both.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p = torch.log_softmax(at_least_fp32(logits) / temperature, dim=-1)
    log_q = torch.log_softmax(at_least_fp32(ref_logits) / temperature, dim=-1)
    return exact_kl_from_log_softmax(log_p, log_q)


def exact_kl_from_log_softmax(log_p: Tensor, log_q: Tensor) -> Tensor:
    """:func:`exact_kl` from log π and log π_ref [..., V] already normalised (log-softmax), so
    a step that has them does not normalise the logits again. Differentiable w.r.t. both."""
    p = log_p.exp()
    # 0·log 0 = 0: zero the log-ratio where π(a) = 0 so neither the value nor its gradient is NaN
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * log_ratio).sum(dim=-1)


def prioritized_kl_weights(
    ref_logits: Tensor,
    certainty_exponent: float,
    form: CertaintyForm = "entropy",
    certainty_temperature: float | None = None,
    normalization: CertaintyNormalization = "vocabulary",
    typical: Tensor | float | None = None,
) -> Tensor:
    """Per-token weights of the prioritised KL: w(s) = Ĵ(s)^β_c, no gradient (docs/methods.md §3).

    Ĵ = 1 − u/S is the reference's certainty at the state
    (:func:`tether.objectives.common.certainty`): u its entropy (``form="entropy"``, the paper)
    or min-entropy (``"max_prob"``, the released code, at ``certainty_temperature``, None: 4),
    S = log V (``normalization="vocabulary"``, the paper) or κ·ū (``"typical"``: ū =
    ``typical``, the reference's mean uncertainty over the batch's real completion tokens, which
    the caller computes with :func:`tether.objectives.common.uncertainty`; None: the mean over
    every position given). β_c = ``certainty_exponent`` (the paper's 150; good range 10–500).
    The KL is kept where the reference is sure and released where it hesitates: the critical
    tokens. docs/rl.md ("The certainty's scale") says why the default is ``typical``.

    ref_logits [..., V] → weights [...], detached.
    """
    if not certainty_exponent >= 0:
        raise ValueError(f"certainty_exponent must be >= 0, got {certainty_exponent}")
    with torch.no_grad():
        reference_certainty = certainty(
            ref_logits.detach(), form, certainty_temperature, normalization, typical
        )
        return reference_certainty.pow(certainty_exponent)


def kl_penalty(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    kind: KLEstimator,
    weights: Tensor | None = None,
) -> Tensor:
    """Per-token KL penalty [B, T]: w_t · k(ρ_t) on real tokens, exactly 0 at padding.

    ``weights`` (e.g. :func:`prioritized_kl_weights`) multiply the estimate; ``None`` means
    w = 1. Padding entries of the inputs may hold anything (even ±inf): they are replaced before
    the estimate, so neither the value nor the gradient there is NaN. Reduce with a masked mean
    and add ``kl_coef ·`` it to the loss, or pass it to ``shape_rewards_with_kl``.
    """
    real = mask > 0
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    per_token = kl_estimate(torch.where(real, logp, zero), torch.where(real, ref_logp, zero), kind)
    if weights is not None:
        per_token = per_token * weights
    return torch.where(real, per_token, torch.zeros_like(per_token))
