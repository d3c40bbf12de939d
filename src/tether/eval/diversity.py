"""Diversity of a policy's samples: Self-BLEU, distinct-n and per-token entropy.

IQLearn's claim over MLE is that imitating with an inverse-RL objective keeps more of the
expert's diversity. These are the measures that claim is judged with (the IQLearn paper reports
Self-BLEU over several samples per prompt, Zhu et al. 2018):

- :func:`self_bleu` / :func:`mean_self_bleu`: how alike k samples for the same prompt are,
  0 (nothing shared) to 100 (identical); lower is more diverse;
- :func:`distinct_n` / :func:`mean_distinct_n`: the share of n-grams that are unique
  (Li et al. 2016); higher is more diverse;
- :func:`mean_token_entropy`: the policy's own uncertainty per generated token, in nats.

Self-BLEU and distinct-n take text and never raise on its content (empty strings included).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import torch
from sacrebleu.metrics import BLEU
from torch import Tensor

from tether.objectives.common import at_least_fp32

NgramLevel = Literal["char", "word"]


@lru_cache(maxsize=8)
def _bleu(tokenize: str) -> BLEU:
    return BLEU(effective_order=True, tokenize=tokenize)


def self_bleu(samples: Sequence[str], tokenize: str = "char") -> float:
    """Self-BLEU in [0, 100] of k >= 2 samples: each sample's sentence BLEU with the other
    k − 1 as references (sacrebleu: clipped n-gram counts up to 4-grams over all references,
    brevity penalty from the closest reference length, ``effective_order`` so that short
    samples are not zeroed by their missing 4-grams), averaged over the k samples.

    ``tokenize="char"`` (the default) makes every non-space character a token. The built-in
    tasks are character strings like ``12+30=42,42+5=47``, which a word tokenizer such as
    ``13a`` splits erratically (``42,42`` stays one token, ``+`` and ``=`` split off), so
    that nearly every "word" is unique. With characters, the 4-grams span a step's local
    structure (``2+30``), and two orderings of the same sums score high but below 100. Pass
    ``"13a"`` for natural-language samples. Values are comparable only at the same tokenizer.

    Raises ValueError for fewer than two samples (Self-BLEU is undefined); empty samples
    score 0 as hypotheses and match nothing as references.
    """
    if len(samples) < 2:
        raise ValueError(f"self_bleu needs at least 2 samples, got {len(samples)}")
    bleu = _bleu(tokenize)
    total = 0.0
    for i, hyp in enumerate(samples):
        refs = [s for j, s in enumerate(samples) if j != i]
        total += min(max(bleu.sentence_score(hyp, refs).score, 0.0), 100.0)
    return total / len(samples)


def mean_self_bleu(groups: Sequence[Sequence[str]], tokenize: str = "char") -> float:
    """Mean of :func:`self_bleu` over groups (one group of k samples per prompt): diversity
    within a prompt, which is what a mode-collapsing policy loses. NaN for no groups."""
    if not groups:
        return math.nan
    return sum(self_bleu(g, tokenize) for g in groups) / len(groups)


def _ngrams(sample: str, n: int, level: NgramLevel) -> list[tuple[str, ...]]:
    units: Sequence[str] = sample.split() if level == "word" else sample
    return [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]


def distinct_n(samples: Sequence[str], n: int, level: NgramLevel = "char") -> float:
    """Unique n-grams / total n-grams, pooled over all samples, in [0, 1].

    ``level="char"``: n-grams of characters, spaces included (suits the char-level tasks);
    ``level="word"``: n-grams of whitespace-separated words. A sample shorter than n
    contributes none; with no n-grams at all the result is 0.0 (nothing to be diverse).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if level not in ("char", "word"):
        raise ValueError(f"level must be 'char' or 'word', got {level!r}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for s in samples:
        grams = _ngrams(s, n, level)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def mean_distinct_n(groups: Sequence[Sequence[str]], n: int, level: NgramLevel = "char") -> float:
    """Mean of :func:`distinct_n` over groups (one per prompt). NaN for no groups."""
    if not groups:
        return math.nan
    return sum(distinct_n(g, n, level) for g in groups) / len(groups)


def mean_token_entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked positions of H(softmax(logits)) in nats; a 0-dim fp32 tensor.

    ``logits [..., V]``, ``mask [...]`` with the same leading shape: 1 where the position
    counts (a float mask acts as weights). Align them yourself: with a TokenBatch, the
    logits at position t predict token t + 1, so pass ``logits[:, :-1]`` with
    ``loss_mask[:, 1:]``. Computed in fp32 (fp64 stays fp64) as H = logsumexp(ℓ) − Σ p·ℓ, so
    uniform logits give log V, a one-hot distribution 0, and −inf logits no NaN. NaN when the
    mask selects nothing. Differentiable; detach the logits for a pure metric.
    """
    if logits.shape[:-1] != mask.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must match the logits' leading shape "
            f"{tuple(logits.shape[:-1])}"
        )
    z = at_least_fp32(logits)
    p = torch.softmax(z, dim=-1)
    p_z = torch.where(p > 0, p * z, torch.zeros_like(z))
    entropy = torch.logsumexp(z, dim=-1) - p_z.sum(dim=-1)
    weights = mask.to(entropy.dtype)
    # positions outside the mask (padding) never contribute, not even a NaN of their own
    weighted = torch.where(weights != 0, entropy * weights, torch.zeros_like(entropy))
    return weighted.sum() / weights.sum()
