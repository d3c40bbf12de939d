"""Exact evaluation on the enumerable task: every response listed, and the policy, the
reference and the target p* compared by exact sums instead of samples (``tether eval --exact``).

The target is one of the three the dpg stage trains toward:

- reward: p* ∝ π_ref·exp(r/β);
- constraint (β = None): p* ∝ π_ref·[correct];
- moments: p* ∝ π_ref·exp(λ·φ), with λ solved exactly over the enumerated space so that the
  feature means under p* are the given ones (:func:`tether.distributions.bayes.fit_moments`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tether.distributions.bayes import fit_moments, moment_log_target
from tether.distributions.enumeration import (
    ExactTarget,
    exact_figures,
    exact_space,
    top_responses,
)
from tether.tasks.features import feature_matrix

__all__ = ["exact_evaluation"]


def exact_evaluation(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    task: Any,
    *,
    beta: float | None,
    moments: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The exact figures (:func:`tether.distributions.enumeration.exact_figures`) of the
    policy, the reference and the target itself against the target, over every response of
    ``task`` (the enumerable task) under ``tokenizer``.

    ``moments`` (feature name → target mean) selects the moment target; otherwise ``beta``
    the reward target, or None the hard constraint. Returns a JSON-ready dict: ``responses``
    (the size of the space), ``target`` ("moments", "reward" or "constraint"), ``moments``,
    ``beta``, ``log_z``, ``figures`` (per column: policy, reference, target) and
    ``top_responses`` (the policy's most probable responses). NotEnumerableError where the
    tokenizer cannot spell the space.
    """
    space = exact_space(task, tokenizer)
    log_ref = space.distribution(reference).log_probs
    if moments:  # λ solved exactly over the enumerated space
        phi = feature_matrix(list(moments), space.texts)
        targets = torch.tensor(list(moments.values()), dtype=torch.float64)
        lam = fit_moments(phi, targets, log_weights=log_ref.detach().double()).lam
        target = ExactTarget.from_log_target(log_ref, moment_log_target(log_ref, phi, lam))
    else:
        target = ExactTarget.build(space, log_ref, beta)
    log_pi = space.distribution(policy).log_probs
    columns = {"policy": log_pi, "reference": target.log_ref, "target": target.log_target}
    return {
        "responses": len(space),
        "target": "moments" if moments else "reward" if beta is not None else "constraint",
        "moments": dict(moments) if moments else None,
        "beta": beta,
        "log_z": target.log_z,
        "figures": {name: exact_figures(lp, space, target) for name, lp in columns.items()},
        "top_responses": top_responses(log_pi, space, target),
    }
