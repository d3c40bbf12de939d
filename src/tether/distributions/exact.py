"""Exact mode: every response of a small space, its probability, and the true KL, Z, TV...

On a small vocabulary and a short maximum length the whole response space can be enumerated,
and every expectation of docs/methods.md §2 and §5 becomes a finite sum: KL(π‖π_ref), the
partition function Z of the target EBM, the identity J = −β·KL(π‖p*) + β·log Z, the
acceptance rate of quasi-rejection sampling, the mean gradient of an estimator. This module
gives those sums; :mod:`tether.distributions.bayes` gives their estimates from samples.

The response space (given a prompt x, a vocabulary V ∋ EOS and a maximum length L)
---------------------------------------------------------------------------------
- every string y_1..y_k EOS with k < L and y_i ∈ V \\ {EOS}: a response that *terminated*
  (EOS is part of the response, as ``tether.generation.sampler.sample`` keeps it);
- with ``include_truncated=True`` (the default), every string y_1..y_L with no EOS: a response
  *truncated* at the length limit (docs/methods.md §1: cut, not terminal). It counts as one complete
  outcome, with probability Π_{t ≤ L} π(y_t | x, y_<t).

So the space is exactly what ``sample(..., max_new_tokens=L)`` can return, the probabilities
are those of its draws, and they sum to 1: the sampler's tree of choices, cut at depth L.
Without the truncated strings the log-probs are left as they are and sum to
P(EOS within L tokens) < 1 (:attr:`ExactDistribution.mass`); ``normalize`` them to condition
on termination. There are Σ_{k<L} m^k (+ m^L) responses, m = |V| − 1: keep m^L to a few
hundred thousand.

Restricting the vocabulary
--------------------------
``vocab_ids`` (a subset of the model's token ids, EOS among them) *defines* the policy over the
small space: at each state the model's next-token distribution is renormalised over the
allowed set, π_V(a|s) = softmax(ℓ(s, ·)/T)_a / Σ_{b∈V} softmax(ℓ(s, ·)/T)_b for a ∈ V, i.e. a
log-softmax over the allowed columns of the logits. It is the model conditioned, token by token,
on staying inside V; it is not the model's own distribution unless the model already puts all
its mass on V. Every policy compared on a space (π, π_ref) must use the same V. ``None`` keeps
the whole vocabulary.

All sums run in fp64. Functions taking a distribution accept its log-probs (a 1-D tensor over
the enumerated support, in :attr:`ExactDistribution.sequences` order) or an
:class:`ExactDistribution`; results are 0-d tensors, differentiable where the inputs are.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tether.distributions.bayes import constraint_log_target, reward_log_target
from tether.objectives.common import at_least_fp32

MASS_TOLERANCE = 1e-5


def enumerate_sequences(
    vocab_ids: Sequence[int], eos_id: int, max_len: int, include_truncated: bool = True
) -> list[tuple[int, ...]]:
    """Every response of length ≤ ``max_len`` over ``vocab_ids`` (see the module docstring):
    the terminated ones (…, EOS), shortest first, then the truncated ones (L tokens, no EOS)
    if ``include_truncated``. Within a length, in the order of ``vocab_ids`` (lexicographic).

    >>> enumerate_sequences([1, 5, 6], eos_id=1, max_len=2)
    [(1,), (5, 1), (6, 1), (5, 5), (5, 6), (6, 5), (6, 6)]
    """
    ids = list(dict.fromkeys(int(v) for v in vocab_ids))  # unique, order kept
    if eos_id not in ids:
        raise ValueError(f"eos_id {eos_id} must be one of vocab_ids {ids}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    body = [v for v in ids if v != eos_id]
    out = [
        (*prefix, eos_id) for k in range(max_len) for prefix in itertools.product(body, repeat=k)
    ]
    if include_truncated:
        out.extend(itertools.product(body, repeat=max_len))
    return out


def response_logprobs(
    model: Any,
    prompt_ids: Sequence[int] | Tensor,
    sequences: Sequence[Sequence[int]],
    vocab_ids: Sequence[int] | None = None,
    batch_size: int = 256,
    temperature: float = 1.0,
) -> Tensor:
    """log π(y|x) = Σ_t log π_V(y_t | x, y_<t) for each response, by teacher forcing: [N] fp64.

    One forward pass per chunk of ``batch_size`` responses, each row the prompt followed by
    the response, right-padded (a causal model's logits at real positions do not see the
    padding, so no attention mask is needed; positions count from the prompt's first token, as
    in ``sample`` for an unpadded prompt). π_V is the next-token distribution at temperature T,
    renormalised over ``vocab_ids`` (module docstring). Differentiable when grad mode is on;
    put the model in eval mode (or use no dropout).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # the model's device, read here: tether.models (model_device) sits above distributions
    device = next(model.parameters()).device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).to(device)
    if prompt.numel() == 0:
        raise ValueError("the prompt must hold at least one token (prepend BOS for none)")
    p = prompt.numel()
    allowed = None
    if vocab_ids is not None:  # unique ids, order kept
        allowed = torch.as_tensor(list(dict.fromkeys(int(v) for v in vocab_ids)), device=device)
    parts = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        if width == 0:
            parts.append(torch.zeros(len(chunk), dtype=torch.float64, device=device))
            continue
        # the padding after a response is masked out: any valid token id will do
        ids = torch.full((len(chunk), p + width), int(prompt[0]), dtype=torch.long, device=device)
        ids[:, :p] = prompt
        mask = torch.zeros(len(chunk), width, dtype=torch.bool, device=device)
        for row, seq in enumerate(chunk):
            ids[row, p : p + len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, : len(seq)] = True
        logits = at_least_fp32(model(input_ids=ids).logits[:, p - 1 : p + width - 1])
        if temperature != 1.0:
            logits = logits / temperature
        targets = ids[:, p:]
        if allowed is not None:
            # column of each target token among the allowed ones (−1: not allowed)
            lookup = torch.full((logits.shape[-1],), -1, dtype=torch.long, device=device)
            lookup[allowed] = torch.arange(allowed.numel(), device=device)
            logits = logits[..., allowed]
            targets = lookup[targets]
            if bool((mask & (targets < 0)).any()):
                raise ValueError("a response holds a token outside vocab_ids")
            targets = targets.clamp(min=0)
        token_lp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        token_lp = token_lp.to(torch.float64)
        parts.append(torch.where(mask, token_lp, torch.zeros_like(token_lp)).sum(-1))
    return torch.cat(parts)


@dataclass
class ExactDistribution:
    """A policy over an enumerated response space: sequences and their log-probs."""

    sequences: list[tuple[int, ...]]  # token ids of each response (EOS included if terminated)
    log_probs: Tensor  # [N] fp64, log π(y|x) in ``sequences`` order
    eos_id: int
    _index: dict[tuple[int, ...], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {seq: i for i, seq in enumerate(self.sequences)}

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def probs(self) -> Tensor:
        return self.log_probs.exp()

    @property
    def mass(self) -> float:
        """Σ_y π(y): 1 when truncated responses are included, P(EOS within L) otherwise."""
        return float(torch.logsumexp(self.log_probs.detach(), dim=0).exp())

    @property
    def terminated(self) -> Tensor:
        """[N] bool: the response ended with EOS (False: truncated at the length limit)."""
        return torch.tensor([bool(s) and s[-1] == self.eos_id for s in self.sequences])

    def index(self, sequence: Sequence[int]) -> int:
        """Position of a response (a token-id sequence, EOS included if terminated)."""
        return self._index[tuple(int(t) for t in sequence)]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n indices drawn i.i.d. from the distribution (normalised first): [n] long, on CPU."""
        probs = torch.softmax(self.log_probs.detach().cpu(), dim=0)
        return torch.multinomial(probs, n, replacement=True, generator=generator)

    def texts(self, tokenizer: Any) -> list[str]:
        """The responses decoded, special tokens (EOS) skipped."""
        return [tokenizer.decode(list(s), skip_special_tokens=True) for s in self.sequences]


def exact_distribution(
    model: Any,
    prompt_ids: Sequence[int] | Tensor,
    vocab_ids: Sequence[int],
    eos_id: int,
    max_len: int,
    batch_size: int = 256,
    *,
    temperature: float = 1.0,
    include_truncated: bool = True,
    requires_grad: bool = False,
) -> ExactDistribution:
    """π(·|x) over every response of length ≤ ``max_len`` over ``vocab_ids`` (module docstring
    for the conventions: EOS kept, truncated responses complete, vocabulary renormalised).

    With ``include_truncated`` the total mass is checked to be 1 within 1e-5 (a RuntimeError
    otherwise: misaligned logits would show here). ``requires_grad=True`` keeps the autograd
    graph, so exact expectations can be differentiated with respect to the model's parameters
    (cast the model to fp64 for gradient checks at 1e-6).
    """
    sequences = enumerate_sequences(vocab_ids, eos_id, max_len, include_truncated)
    with torch.set_grad_enabled(requires_grad):
        log_probs = response_logprobs(
            model, prompt_ids, sequences, vocab_ids, batch_size=batch_size, temperature=temperature
        )
    dist = ExactDistribution(sequences=sequences, log_probs=log_probs, eos_id=eos_id)
    if include_truncated and abs(dist.mass - 1.0) > MASS_TOLERANCE:
        raise RuntimeError(
            f"the enumerated distribution sums to {dist.mass:.8f}, not 1: the model's "
            "next-token log-probs are not aligned with the responses"
        )
    return dist


# ----------------------------------------------------------------------------- exact quantities

Dist = Tensor | ExactDistribution


def _log(p: Dist) -> Tensor:
    lp = p.log_probs if isinstance(p, ExactDistribution) else p
    return lp if lp.dtype == torch.float64 else lp.to(torch.float64)


def normalize(log_weights: Dist) -> Tensor:
    """log w − logsumexp(log w): unnormalised log-weights → log-probs."""
    lw = _log(log_weights)
    return lw - torch.logsumexp(lw, dim=0)


def expectation(p: Dist, f: Tensor) -> Tensor:
    """E_p[f] = Σ_y p(y)·f(y); f [N] → [], f [N, F] → [F]. Outcomes with p = 0 add nothing
    (even where f is ±inf)."""
    prob = _log(p).exp()
    f64 = f.to(torch.float64)
    if f64.dim() > 1:
        prob = prob.unsqueeze(-1)
    return torch.where(prob > 0, prob * f64, torch.zeros_like(f64)).sum(0)


def kl(p: Dist, q: Dist) -> Tensor:
    """KL(p‖q) = Σ_y p(y)·(log p(y) − log q(y)); 0·log 0 = 0, +inf where q = 0 < p."""
    lp, lq = _log(p), _log(q)
    prob = lp.exp()
    log_ratio = torch.where(prob > 0, lp - lq, torch.zeros_like(lp))
    return (prob * log_ratio).sum()


def entropy(p: Dist) -> Tensor:
    """H(p) = −Σ_y p(y)·log p(y)."""
    lp = _log(p)
    prob = lp.exp()
    return -(prob * torch.where(prob > 0, lp, torch.zeros_like(lp))).sum()


def total_variation(p: Dist, q: Dist) -> Tensor:
    """TV(p, q) = ½·Σ_y |p(y) − q(y)| ∈ [0, 1]."""
    return 0.5 * (_log(p).exp() - _log(q).exp()).abs().sum()


def jensen_shannon(p: Dist, q: Dist) -> Tensor:
    """JS(p, q) = ½·KL(p‖m) + ½·KL(q‖m), m = (p + q)/2; ∈ [0, log 2], symmetric."""
    lp, lq = _log(p), _log(q)
    log_m = torch.logaddexp(lp, lq) - math.log(2.0)
    return 0.5 * kl(lp, log_m) + 0.5 * kl(lq, log_m)


def _log_target(
    log_ref: Dist, reward: Tensor | None, beta: float | None, constraint: Tensor | None
) -> Tensor:
    lr = _log(log_ref)
    if (reward is None) == (constraint is None):
        raise ValueError("give either a reward (with beta) or a hard constraint, not both")
    if reward is not None:
        if beta is None:
            raise ValueError("a reward target needs beta")
        return reward_log_target(lr, reward.to(torch.float64), beta)
    assert constraint is not None
    return constraint_log_target(lr, constraint)


def log_partition(
    log_ref: Dist,
    reward: Tensor | None = None,
    beta: float | None = None,
    *,
    constraint: Tensor | None = None,
) -> Tensor:
    """log Z = log Σ_y π_ref(y)·exp(r(y)/β), or log Σ_y π_ref(y)·b(y) = log π_ref(b = 1)."""
    return torch.logsumexp(_log_target(log_ref, reward, beta, constraint), dim=0)


def target_distribution(
    log_ref: Dist,
    reward: Tensor | None = None,
    beta: float | None = None,
    *,
    constraint: Tensor | None = None,
) -> Tensor:
    """log p*(y) = log π_ref(y) + r(y)/β − log Z, the optimum of KL-RL (docs/methods.md §2); or,
    with ``constraint`` b ∈ {0, 1}, log π_ref(y) + log b(y) − log Z (π_ref given b = 1)."""
    return normalize(_log_target(log_ref, reward, beta, constraint))


def qrs_acceptance_rate(log_P: Dist, log_q: Dist, beta_qrs: float) -> Tensor:
    """Acceptance rate of quasi-rejection sampling with proposal q (normalised) and target P
    (unnormalised): Σ_y min(q(y), P(y)/β) = E_q[min(P/q, β)]/β."""
    lq = _log(log_q)
    return torch.minimum(lq, _log(log_P) - math.log(beta_qrs)).exp().sum()


def qrs_distribution(log_P: Dist, log_q: Dist, beta_qrs: float) -> Tensor:
    """Log-probs of what quasi-rejection sampling outputs: p_β(y) ∝ min(q(y), P(y)/β).
    = p where β ≥ max P/q; → q as β → 0 (on q's support, wherever P > 0)."""
    return normalize(torch.minimum(_log(log_q), _log(log_P) - math.log(beta_qrs)))
