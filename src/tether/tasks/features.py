"""Text features φ(y) of completions, for moment-constraint targets (docs/methods.md §5).

A moment constraint asks the fine-tuned distribution for given feature means, E_p[φ_f] = μ_f,
while staying as close as possible to the reference: p ∝ π_ref·exp(λ·φ) (the I-projection,
GDC's distributional constraints), λ fitted by self-normalised importance sampling
(:func:`tether.distributions.bayes.fit_moments`). Features are named in recipes as strings:

- ``contains:S``: 1 if the completion contains the string S, else 0;
- ``startswith:S``, ``endswith:S``: 1 if it starts (ends) with S;
- ``length``: the number of characters;
- ``count:S``: how many times S occurs (non-overlapping).

``dpg.moments: {"contains:1": 0.5, "length": 2.0}`` asks for half the answers to contain a 1 and
a mean length of 2 characters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

KINDS = ("contains", "startswith", "endswith", "count")


class FeatureError(ValueError):
    """A feature name that cannot be parsed; the message names it."""


def feature_function(name: str) -> Callable[[str], float]:
    """The function of one feature name (module docstring)."""
    if name == "length":
        return lambda text: float(len(text))
    kind, sep, arg = name.partition(":")
    if not sep or kind not in KINDS or not arg:
        raise FeatureError(
            f"unknown feature {name!r}: use length, or contains:S, startswith:S, endswith:S, "
            "count:S with a non-empty string S"
        )
    if kind == "contains":
        return lambda text: float(arg in text)
    if kind == "startswith":
        return lambda text: float(text.startswith(arg))
    if kind == "endswith":
        return lambda text: float(text.endswith(arg))
    return lambda text: float(text.count(arg))


def feature_matrix(names: Sequence[str], texts: Sequence[str]) -> Tensor:
    """φ of each text, [len(texts), len(names)] float64."""
    fns = [feature_function(n) for n in names]
    return torch.tensor([[f(t) for f in fns] for t in texts], dtype=torch.float64).reshape(
        len(texts), len(names)
    )
