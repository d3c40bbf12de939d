"""Objectives: pure functions of token tensors, testable with no model at all."""

from tether.objectives.common import certainty, shifted_token_logprobs, token_logprobs
from tether.objectives.iqlearn import (
    SoftValues,
    iqlearn_loss,
    iqlearn_online_term,
    lambda_schedule,
    mle_entropy_loss,
    soft_values,
    terminated_from_eos,
)
from tether.objectives.kl import (
    KL_ESTIMATORS,
    KLEstimator,
    exact_kl,
    kl_estimate,
    kl_penalty,
    prioritized_kl_weights,
)
from tether.objectives.mle import mle_loss
from tether.objectives.policy_gradient import (
    discounted_returns,
    entropy_bonus,
    gae,
    masked_mean,
    ppo_clip_loss,
    reinforce_loss,
    rloo_baseline,
    shape_rewards_with_kl,
    terminal_rewards,
    value_loss,
)

__all__ = [
    "KL_ESTIMATORS",
    "KLEstimator",
    "SoftValues",
    "certainty",
    "discounted_returns",
    "entropy_bonus",
    "exact_kl",
    "gae",
    "iqlearn_loss",
    "iqlearn_online_term",
    "kl_estimate",
    "kl_penalty",
    "lambda_schedule",
    "masked_mean",
    "mle_entropy_loss",
    "mle_loss",
    "ppo_clip_loss",
    "prioritized_kl_weights",
    "reinforce_loss",
    "rloo_baseline",
    "shape_rewards_with_kl",
    "shifted_token_logprobs",
    "soft_values",
    "terminal_rewards",
    "terminated_from_eos",
    "token_logprobs",
    "value_loss",
]
