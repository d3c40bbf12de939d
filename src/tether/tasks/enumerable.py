"""The enumerable task: a response space small enough to list in full (docs/methods.md §2, §5).

Every claim of the Bayesian view (KL-RL's optimum is p* ∝ π_ref·exp(r/β); DPG's gradient is
unbiased; β → 0 collapses onto argmax r) is a statement about sums over *all* responses. This
task makes those sums finite: one fixed prompt, a vocabulary of four digits plus EOS, and at
most N digits per answer, so :mod:`tether.distributions.exact` can enumerate every response and give the
true KL, Z, entropy and reward of a policy, not estimates.

The space (N = ``max_digits``; L = N + 1 tokens is the generation budget):

- every string of 0..N digits from ``0123`` followed by EOS: an answer that *stopped*;
- every string of L digits without EOS: an answer cut at the budget (docs/methods.md §1: truncated,
  not terminal), which counts as one outcome of its own.

That is exactly what ``sample(..., max_new_tokens=L, allowed_token_ids=...)`` can return, so
the sampled policy is the enumerated one: Σ_{k≤N} 4^k + 4^(N+1) responses, 341 for N = 3.
The decoded text tells a stopped answer from a cut one by its length alone (≤ N digits vs L).

The reward is graded, r(y) ∈ {0, ¼, ½, ¾, 1}, a quarter for each of

1. the answer contains a ``1``;
2. it contains a ``2``;
3. some ``1`` comes before some ``2`` (an ordering, so r is not a sum over tokens);
4. it stopped (ended with EOS within the budget) instead of running into the limit.

``is_correct`` is the top level r = 1 (11 answers for N = 3: ``12``, ``012``, ``120``, ...).
Several levels make π_ref·exp(r/β) a non-trivial target at every β: a blend of π_ref and the
reward at β ≈ ¼, close to π_ref restricted to the 11 best answers at β → 0 (collapse). Any
character outside the vocabulary scores 0 (such text is not in the space: it can only come
from sampling without the vocabulary restriction).

The reference is whatever ``model.init`` is: a random tiny model is a fine one for the
collapse study (the target is π_ref·exp(r/β), whatever π_ref is); ``pretrain_problem`` draws
uniform digit strings of 0..N digits, so a brief MLE run gives a reference that already keeps
to the vocabulary.

With ``demonstrations="expert"`` (``task.demonstrations: expert``) ``pretrain_problem`` draws
from a fixed expert instead, for demonstration-regularised RL (docs/methods.md §6: behaviour cloning
on N_E demonstrations, ``task.train_size``, then KL-RL toward the clone). The expert is good but
imperfect, so that the RL after the clone has something to gain: with probability s, the best
share (``task.expert_share``, default :data:`EXPERT_BEST_SHARE` = 0.9), a best answer (r = 1)
uniformly among them, otherwise a uniform answer as above. Every demonstration ends with EOS (a
stopped answer). Its exact E[r] is s + (1 − s)·E_uniform[r], E_uniform[r] = 0.422 for N = 3:
0.942 at s = 0.9, 0.769 at s = 0.6 (:func:`expert_reward`). Why 0.9 by default: Tiapkin et al.'s
analysis assumes a (near-)optimal expert, so that the clone's error, and with it the price of a
tight tether, shrinks with N_E; an expert far from optimal makes the tether a bias that no
number of demonstrations removes (docs/bayesian.md measures both).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import ClassVar

from tether.tasks.base import Task

PROMPT = "Digits:"
VOCABULARY = "0123"  # the allowed characters; EOS is allowed as well
# the most responses exact mode enumerates (exact.py: "keep m^L to a few hundred thousand"; a
# step's exact evaluation is one forward pass per 256 of them)
MAX_RESPONSES = 100_000
DEMONSTRATIONS = ("uniform", "expert")  # task.demonstrations: who writes pretrain_problem's answers
# the expert's default share of best answers (r = 1); the rest of its answers are uniform ones
EXPERT_BEST_SHARE = 0.9


def space_size(max_digits: int, vocabulary: str = VOCABULARY) -> int:
    """Responses in the space: Σ_{k≤N} m^k stopped + m^(N+1) cut, m = |vocabulary|."""
    m = len(vocabulary)
    return sum(m**k for k in range(max_digits + 1)) + m ** (max_digits + 1)


def largest_max_digits(vocabulary: str = VOCABULARY) -> int:
    """The largest N whose space stays within :data:`MAX_RESPONSES` (7 for four digits)."""
    n = 1
    while space_size(n + 1, vocabulary) <= MAX_RESPONSES:
        n += 1
    return n


def check_space(max_digits: int) -> None:
    """ValueError, one line naming ``task.max_digits``, when the space is too large to list."""
    size = space_size(max_digits)
    if size > MAX_RESPONSES:
        raise ValueError(
            f"task.max_digits {max_digits}: the enumerable space holds {size} responses, more "
            f"than the {MAX_RESPONSES} exact mode lists (use max_digits <= {largest_max_digits()})"
        )


@dataclass(frozen=True)
class Problem:
    prompt: str = PROMPT
    target: str = ""  # a demonstration for MLE; the reward needs none


def score(completion: str, max_digits: int) -> float:
    """r(y) ∈ {0, ¼, ½, ¾, 1}: the four checks of the module docstring, a quarter each."""
    if not isinstance(completion, str) or any(c not in VOCABULARY for c in completion):
        return 0.0
    has_one, has_two = "1" in completion, "2" in completion
    ordered = has_one and has_two and completion.index("1") < completion.rindex("2")
    stopped = len(completion) <= max_digits  # L = N + 1 digits means it ran into the limit
    return (has_one + has_two + ordered + stopped) / 4.0


def stopped_answers(max_digits: int, vocabulary: str = VOCABULARY) -> list[str]:
    """Every answer of 0..N digits (the ones that end with EOS), shortest first."""
    return [
        "".join(digits)
        for k in range(max_digits + 1)
        for digits in itertools.product(vocabulary, repeat=k)
    ]


def best_answers(max_digits: int) -> list[str]:
    """The answers with r = 1 (all of them stopped): 11 for N = 3."""
    return [a for a in stopped_answers(max_digits) if score(a, max_digits) == 1.0]


def uniform_answer(rng: random.Random, max_digits: int) -> str:
    """0..N digits (length uniform), each uniform over the vocabulary."""
    length = rng.randint(0, max_digits)
    return "".join(rng.choice(VOCABULARY) for _ in range(length))


def expert_answer(
    rng: random.Random, max_digits: int, best_share: float = EXPERT_BEST_SHARE
) -> str:
    """The expert of the module docstring: a best answer with probability ``best_share``, else
    a uniform answer."""
    if rng.random() < best_share:
        return rng.choice(best_answers(max_digits))
    return uniform_answer(rng, max_digits)


def expert_distribution(max_digits: int, best_share: float = EXPERT_BEST_SHARE) -> dict[str, float]:
    """The expert's exact probability of every stopped answer (they sum to 1): what its
    demonstrations are drawn from, so tests and studies can judge a clone against it."""
    m, n = len(VOCABULARY), max_digits + 1
    best = set(best_answers(max_digits))
    rest = 1.0 - best_share
    return {
        a: rest / (n * m ** len(a)) + (best_share / len(best) if a in best else 0.0)
        for a in stopped_answers(max_digits)
    }


def expert_reward(max_digits: int, best_share: float = EXPERT_BEST_SHARE) -> float:
    """The expert's exact E[r] (N = 3: 0.942 at the default share 0.9, 0.769 at 0.6)."""
    dist = expert_distribution(max_digits, best_share)
    return sum(p * score(a, max_digits) for a, p in dist.items())


@dataclass
class EnumerableTask(Task):
    """One prompt, digits ``0123`` and EOS, answers of at most ``max_digits`` digits;
    demonstrations (``pretrain_problem``) from the uniform writer or the expert."""

    max_digits: int = 3
    demonstrations: str = "uniform"
    expert_share: float = EXPERT_BEST_SHARE  # the expert's share of best answers
    # what exact mode needs besides ``max_len``: the prompt and the allowed characters
    prompt: ClassVar[str] = PROMPT
    vocabulary: ClassVar[str] = VOCABULARY

    def __post_init__(self) -> None:
        if self.max_digits < 1:
            raise ValueError(f"task.max_digits must be >= 1, got {self.max_digits}")
        check_space(self.max_digits)
        if self.demonstrations not in DEMONSTRATIONS:
            raise ValueError(
                f"task.demonstrations must be one of {', '.join(DEMONSTRATIONS)}, "
                f"got {self.demonstrations!r}"
            )
        if not 0.0 <= self.expert_share <= 1.0:
            raise ValueError(f"task.expert_share must lie in [0, 1], got {self.expert_share}")

    @property
    def max_len(self) -> int:
        """L, the generation budget in tokens: N digits and EOS."""
        return self.max_digits + 1

    def pretrain_problem(self, rng: random.Random) -> Problem:
        """A demonstration: a uniform random answer (0..N digits, each uniform over the
        vocabulary), or the expert's answer with ``demonstrations="expert"``."""
        if self.demonstrations == "expert":
            return Problem(target=expert_answer(rng, self.max_digits, self.expert_share))
        return Problem(target=uniform_answer(rng, self.max_digits))

    def rl_problem(self, rng: random.Random) -> Problem:
        return Problem()

    def is_correct(self, problem: Problem, completion: str) -> bool:
        return self.score(problem, completion) == 1.0

    def score(self, problem: Problem, completion: str) -> float:
        return score(completion, self.max_digits)

    def max_new_tokens(self) -> int:
        return self.max_len
