"""InfAlign's evaluation: the inference-time win rate of a policy against its reference
(docs/methods.md §8), plus the KL that bought it.

A model that will be decoded by best-of-N (keep the highest-reward of N samples) or attacked
by worst-of-N should be judged by how its *decoded* output fares against π_ref decoded the
same way, not by the win rate of a single sample. :func:`evaluate_winrate` draws ``samples``
completions per prompt from each model, scores them with a reward callable
(:mod:`tether.rewards.functions`), and reports for each N:

- **from the CDFs** (:func:`tether.distributions.infalign.win_rate_bon_from_cdf`): every N-tuple of the
  policy's samples against every N-tuple of the reference's, drawn with replacement from the
  two empirical reward distributions, in closed form. Uses all M samples for every N, so the
  variance is far lower than Monte Carlo's; the price is the plug-in (V-statistic) bias of
  order N/M, which pulls the estimate towards the N = 1 value as N approaches M. Prefer it
  when N ≪ M (say M ≥ 4N).
- **Monte Carlo** (:func:`tether.distributions.infalign.win_rate_mc`): the M samples of each side are cut
  into ⌊M/N⌋ disjoint groups of N and each group is one game, decoded exactly as it would
  be at inference. Unbiased for any N ≤ M, but with only ⌊M/N⌋ games per prompt it gets
  noisy fast: it is the check on the CDF estimate's bias at large N, not the headline.

Both are averaged over prompts (equal weight per prompt) and their standard errors are taken
across prompts: the prompt is the sampling unit, and games of one prompt share it.

The KL column is the k1 estimator of the sequence-level KL at the sampling temperature T,

    KL(π_T ‖ π_ref,T) ≈ mean over policy samples y ∼ π_T(·|x) of Σ_t [log π_T(y_t|·) − log π_ref,T(y_t|·)],

where π_T is softmax(logits/T) (T = 1: the models' own KL). It is unbiased (a single sample
can be negative) and is the quantity the win rate should be plotted against (InfAlign's
win-rate-vs-KL curves). Completions cut at ``max_new_tokens`` count as sequences of the
truncated distribution, so the figure is the KL between the truncated distributions.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from tether.batches import collate_token_rows
from tether.distributions.infalign import (
    DECODE_MODES,
    DecodeMode,
    WinRate,
    pick_of_n,
    standard_win_rate,
    win_rate_bon_from_cdf,
    win_rate_mc,
    win_scores,
)
from tether.generation.sampler import pad_id
from tether.generation.texts import sample_rows
from tether.models.loading import model_device
from tether.objectives.common import shifted_token_logprobs
from tether.tasks.prompts import PromptFormat

__all__ = [
    "Estimate",
    "WinRatePoint",
    "WinRateReport",
    "check_ns",
    "evaluate_winrate",
    "plot_winrate",
    "sequence_logprobs",
    "win_rate_curve",
]

RewardCallable = Callable[[Sequence[Any], Sequence[str]], Tensor]

# the largest logits tensor (rows × length × vocab floats) one scoring forward may build
_MAX_LOGIT_FLOATS = 2**26


@dataclass(frozen=True)
class Estimate:
    """A mean over prompts and its standard error across prompts."""

    mean: float
    stderr: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "stderr": self.stderr}


def across_prompts(values: Tensor) -> Estimate:
    """``values`` [P] (one figure per prompt) or [P, M] (averaged within each prompt first)
    → mean and standard error sd/√P across prompts (ddof 1; 0 for a single prompt).

    The prompt is the sampling unit: samples and games of one prompt share the prompt, so
    counting them as independent would understate the error whenever prompts differ.
    """
    v = values.detach().to(torch.float64)
    per_prompt = v.mean(dim=-1) if v.dim() == 2 else v
    p = per_prompt.numel()
    if p == 0:
        raise ValueError("no prompts to average over")
    stderr = float(per_prompt.std(unbiased=True) / math.sqrt(p)) if p > 1 else 0.0
    return Estimate(mean=float(per_prompt.mean()), stderr=stderr)


@dataclass(frozen=True)
class WinRatePoint:
    """The inference-time win rate at one N: from the CDFs (``cdf``, mean ± se across
    prompts) and by Monte Carlo (``mc``: rate, se across prompts, number of games; None when
    there are fewer samples per prompt than N)."""

    n: int
    cdf: Estimate
    mc: WinRate | None

    def to_dict(self) -> dict[str, Any]:
        mc = None
        if self.mc is not None:
            mc = {"rate": self.mc.rate, "stderr": self.mc.stderr, "games": self.mc.games}
        return {"n": self.n, "cdf": {"rate": self.cdf.mean, "stderr": self.cdf.stderr}, "mc": mc}


def check_ns(ns: Sequence[int]) -> list[int]:
    """The N values, validated (positive integers), de-duplicated and sorted."""
    out = []
    for n in ns:
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"N must be a positive integer, got {n!r}")
        out.append(int(n))
    if not out:
        raise ValueError("give at least one N")
    return sorted(set(out))


def win_rate_curve(
    policy_rewards: Tensor, reference_rewards: Tensor, ns: Sequence[int], mode: DecodeMode
) -> list[WinRatePoint]:
    """The aggregation behind :class:`WinRateReport`: rewards [P, M] of each side (M samples
    for each of P prompts, same prompts in the same order) → one :class:`WinRatePoint` per N.

    CDF estimate: ``win_rate_bon_from_cdf`` per prompt, averaged over prompts. Monte Carlo:
    samples ``[g·N, (g+1)·N)`` of each side form game g of the prompt (g < ⌊M/N⌋; leftover
    samples sit out), decoded with ``pick_of_n``; the rate is ``win_rate_mc`` over all P·⌊M/N⌋
    games (every prompt plays the same number, so it is also the mean of the per-prompt
    rates) and the standard error is taken across the per-prompt rates.
    """
    if policy_rewards.dim() != 2 or policy_rewards.shape != reference_rewards.shape:
        raise ValueError(
            "policy and reference rewards must both be [prompts, samples], got "
            f"{tuple(policy_rewards.shape)} and {tuple(reference_rewards.shape)}"
        )
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decoding mode {mode!r}: choose one of {DECODE_MODES}")
    prompts, samples = policy_rewards.shape
    points = []
    for n in check_ns(ns):
        cdf = across_prompts(win_rate_bon_from_cdf(policy_rewards, reference_rewards, n, mode))
        mc = None
        groups = samples // n
        if groups >= 1:
            decoded_policy = pick_of_n(
                policy_rewards[:, : groups * n].reshape(prompts, groups, n), mode
            )
            decoded_reference = pick_of_n(
                reference_rewards[:, : groups * n].reshape(prompts, groups, n), mode
            )
            games = win_rate_mc(decoded_policy, decoded_reference)
            stderr = across_prompts(win_scores(decoded_policy, decoded_reference)).stderr
            mc = WinRate(rate=games.rate, stderr=stderr, games=games.games)
        points.append(WinRatePoint(n=n, cdf=cdf, mc=mc))
    return points


@dataclass
class WinRateReport:
    """What :func:`evaluate_winrate` measured. ``info`` is free for the caller (the CLI records
    the checkpoints, task and reward there); ``label`` names the curve in :func:`plot_winrate`.
    The raw rewards [P, M] are kept (not in :meth:`to_dict`) so a study can re-aggregate,
    e.g. the other decoding mode, with :func:`win_rate_curve` and no new samples."""

    mode: DecodeMode
    temperature: float
    prompts: int
    samples: int
    seed: int
    coupled: bool
    max_new_tokens: int
    points: list[WinRatePoint]
    standard: Estimate  # the plain-sampling (N = 1) win rate, from the CDFs
    kl: Estimate  # k1 estimate of KL(π_T ‖ π_ref,T) per sequence, nats
    reward_policy: Estimate
    reward_reference: Estimate
    accuracy_policy: Estimate  # share of samples task.is_correct accepts
    accuracy_reference: Estimate
    truncated_policy: float  # share of samples cut at max_new_tokens
    truncated_reference: float
    label: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    policy_rewards: Tensor | None = field(default=None, repr=False)
    reference_rewards: Tensor | None = field(default=None, repr=False)

    def point(self, n: int) -> WinRatePoint:
        for p in self.points:
            if p.n == n:
                return p
        raise KeyError(f"no win rate for N = {n} (have {[p.n for p in self.points]})")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (floats, ints, strings, None): ``info``'s entries, then the
        settings and figures (which win over an ``info`` key of the same name)."""
        return {
            **self.info,
            "label": self.label,
            "mode": self.mode,
            "temperature": self.temperature,
            "prompts": self.prompts,
            "samples": self.samples,
            "seed": self.seed,
            "coupled": self.coupled,
            "max_new_tokens": self.max_new_tokens,
            "win_rate": [p.to_dict() for p in self.points],
            "standard_win_rate": {"rate": self.standard.mean, "stderr": self.standard.stderr},
            "kl": self.kl.to_dict(),
            "mean_reward": {
                "policy": self.reward_policy.to_dict(),
                "reference": self.reward_reference.to_dict(),
            },
            "accuracy": {
                "policy": self.accuracy_policy.to_dict(),
                "reference": self.accuracy_reference.to_dict(),
            },
            "truncated": {"policy": self.truncated_policy, "reference": self.truncated_reference},
        }


# ----------------------------------------------------------------------------- sampling, scoring


def _stream_seed(seed: int, side: str) -> int:
    """A 63-bit generator seed per (seed, side): the two sides get unrelated streams."""
    digest = hashlib.blake2b(f"tether-winrate/{seed}/{side}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@torch.no_grad()
def sequence_logprobs(
    model: Any,
    prompt_rows: Sequence[Sequence[int]],
    completion_rows: Sequence[Sequence[int]],
    *,
    pad_id: int,
    temperature: float = 1.0,
    batch_size: int = 64,
    bar: Any = None,
) -> Tensor:
    """log π_T(completion | prompt) = Σ_t log softmax(logits_t / T)[y_t] over each
    completion's tokens (EOS included), from one teacher-forced forward pass per chunk.
    Returns [B] float64 on the CPU.

    Chunks hold at most ``batch_size`` rows and at most ~2^26 logits, so a large vocabulary
    (SmolLM2's 49k) does not blow the memory on long completions.
    """
    device = model_device(model)
    vocab = int(getattr(model.config, "vocab_size", None) or 2**16)
    out: list[Tensor] = []
    start = 0
    while start < len(prompt_rows):
        width = max(
            len(prompt_rows[i]) + len(completion_rows[i])
            for i in range(start, min(start + batch_size, len(prompt_rows)))
        )
        rows = max(1, min(batch_size, _MAX_LOGIT_FLOATS // max(1, width * vocab)))
        stop = min(start + rows, len(prompt_rows))
        batch = collate_token_rows(prompt_rows[start:stop], completion_rows[start:stop], pad_id).to(
            device
        )
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        lp = shifted_token_logprobs(logits, batch.input_ids, temperature)
        out.append((lp.double() * batch.loss_mask.double()).sum(dim=-1).cpu())
        if bar is not None:
            bar.update(stop - start)
        start = stop
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


# ----------------------------------------------------------------------------- the evaluation


def evaluate_winrate(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    task: Any,
    reward: RewardCallable,
    *,
    ns: Sequence[int] = (1, 2, 4, 8, 16),
    mode: DecodeMode = "best",
    prompts: int = 64,
    samples: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int | None = None,
    progress: bool = False,
    batch_size: int = 64,
    coupled: bool = False,
    prompt_format: PromptFormat | None = None,
) -> WinRateReport:
    """InfAlign's inference-time win rate of ``policy`` against ``reference``, with the KL.

    ``prompts`` problems are drawn with ``task.rl_problem(random.Random(f"tether-winrate/{seed}"))``
    (the same prompts for every model evaluated with this seed), formatted with
    :func:`tether.tasks.prompts.format_prompt` in ``prompt_format`` (None: the task's own,
    ``task.prompt_format``), and each model samples ``samples`` completions per prompt
    at ``temperature`` (``max_new_tokens``: default ``task.max_new_tokens()``), ``batch_size``
    rows at a time. ``reward(problems, completions)`` scores them ([P, M] per side, the raw
    reward: the win rate depends on the reward only through comparisons within a prompt, and
    calibration keeps their order, at most merging some into ties). ``tokenizer`` must serve
    both models.

    Returns a :class:`WinRateReport`: per N in ``ns`` the win rate of decoding ``mode``
    (``"best"``/``"worst"`` of N) from the CDFs and by Monte Carlo (:func:`win_rate_curve`),
    the standard win rate, mean rewards and accuracies (``task.is_correct``) of both sides,
    and the k1 estimate of the sequence-level KL(π_T ‖ π_ref,T) from the policy's samples
    (see the module docstring). Both sides' log-probabilities come from the same
    teacher-forced forward code (:func:`sequence_logprobs`), not the sampler's own, so
    identical models give a KL of exactly 0 instead of the few 1e-5 nats by which the fast
    sampler's arithmetic differs from ``forward``.

    The two sides draw from independent generators by default, as the win rate's definition
    assumes. ``coupled=True`` seeds both the same way (common random numbers): identical
    models then produce identical samples and a win rate of exactly ½, a sanity check. For
    *different* models coupled samples are correlated (the sampler draws each token by an
    exponential race, so two close distributions fed the same random numbers mostly pick the
    same token): the games are then no longer between independent draws, which the win rate
    assumes, so do not use it to measure.

    Both models are put in eval mode for the duration and restored afterwards.
    """
    ns = check_ns(ns)
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decoding mode {mode!r}: choose one of {DECODE_MODES}")
    if prompts < 2:
        raise ValueError(
            f"prompts must be >= 2 (standard errors are across prompts), got {prompts}"
        )
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not temperature > 0:
        raise ValueError(
            f"temperature must be > 0, got {temperature}: best-of-N needs distinct samples"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    budget = task.max_new_tokens() if max_new_tokens is None else int(max_new_tokens)
    if budget < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {budget}")

    rng = random.Random(f"tether-winrate/{seed}")
    problems = [task.rl_problem(rng) for _ in range(prompts)]
    rows = [p for p in problems for _ in range(samples)]  # prompt-major: M rows per prompt
    texts = [p.prompt for p in rows]
    policy_seed = _stream_seed(seed, "policy")
    reference_seed = policy_seed if coupled else _stream_seed(seed, "reference")

    was_training = [(m, m.training) for m in (policy, reference)]
    bar = tqdm(total=4 * len(rows), desc="win rate", unit="row", disable=not progress)
    try:
        policy.eval()
        reference.eval()
        sides = {}
        for side, model, side_seed in (
            ("policy", policy, policy_seed),
            ("reference", reference, reference_seed),
        ):
            bar.set_description(f"win rate: {side} samples")
            sides[side] = sample_rows(
                model,
                tokenizer,
                texts,
                seed=side_seed,
                temperature=temperature,
                prompt_format=prompt_format or task.prompt_format,
                max_new_tokens=budget,
                batch_size=batch_size,
                on_batch=bar.update,
            )
        pol, ref = sides["policy"], sides["reference"]
        bar.set_description("win rate: KL")
        logp = [
            sequence_logprobs(
                model,
                pol.prompt_rows,
                pol.completion_rows,
                pad_id=pad_id(tokenizer),
                temperature=temperature,
                batch_size=batch_size,
                bar=bar,
            )
            for model in (policy, reference)
        ]
    finally:
        bar.close()
        for m, training in was_training:
            m.train(training)

    shape = (prompts, samples)
    policy_rewards = _rewards(reward, rows, pol.texts, shape)
    reference_rewards = _rewards(reward, rows, ref.texts, shape)
    correct_policy = torch.tensor(
        [float(task.is_correct(p, c)) for p, c in zip(rows, pol.texts, strict=True)]
    ).reshape(shape)
    correct_reference = torch.tensor(
        [float(task.is_correct(p, c)) for p, c in zip(rows, ref.texts, strict=True)]
    ).reshape(shape)
    kl = (logp[0] - logp[1]).reshape(shape)
    return WinRateReport(
        mode=mode,
        temperature=float(temperature),
        prompts=prompts,
        samples=samples,
        seed=seed,
        coupled=coupled,
        max_new_tokens=budget,
        points=win_rate_curve(policy_rewards, reference_rewards, ns, mode),
        standard=across_prompts(standard_win_rate(policy_rewards, reference_rewards)),
        kl=across_prompts(kl),
        reward_policy=across_prompts(policy_rewards),
        reward_reference=across_prompts(reference_rewards),
        accuracy_policy=across_prompts(correct_policy),
        accuracy_reference=across_prompts(correct_reference),
        truncated_policy=1.0 - sum(pol.finished) / len(rows),
        truncated_reference=1.0 - sum(ref.finished) / len(rows),
        policy_rewards=policy_rewards,
        reference_rewards=reference_rewards,
    )


def _rewards(
    reward: RewardCallable, problems: list[Any], completions: list[str], shape: tuple[int, int]
) -> Tensor:
    values = torch.as_tensor(reward(problems, completions)).detach()
    if values.numel() != shape[0] * shape[1]:
        raise ValueError(
            f"the reward returned {values.numel()} values for {len(completions)} completions"
        )
    return values.reshape(shape).to(device="cpu", dtype=torch.float64)


# ----------------------------------------------------------------------------- plot


def plot_winrate(
    report_or_reports: WinRateReport | Sequence[WinRateReport], path: str | Path
) -> Path:
    """Win rate against N (log2 axis) with ±1 standard-error bars, one colour per report: the
    CDF estimate as a solid line, Monte Carlo as open markers on a dotted line, and ½ (no
    better than the reference) dashed. The legend gives each report's label and KL. Written
    with matplotlib's Agg canvas: no display, no global pyplot state."""
    reports = (
        [report_or_reports] if isinstance(report_or_reports, WinRateReport) else report_or_reports
    )
    if not reports:
        raise ValueError("nothing to plot: no reports")
    fig = Figure(figsize=(6.0, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    all_ns: set[int] = set()
    for i, rep in enumerate(reports):
        colour = f"C{i % 10}"
        name = rep.label or (f"policy {i + 1}" if len(reports) > 1 else "policy")
        name = f"{name} (KL {rep.kl.mean:.3g} nats)"
        ns = [p.n for p in rep.points]
        all_ns.update(ns)
        ax.errorbar(
            ns,
            [p.cdf.mean for p in rep.points],
            yerr=[p.cdf.stderr for p in rep.points],
            color=colour,
            marker="o",
            capsize=3,
            label=f"{name}: from CDFs",
        )
        mc = [p for p in rep.points if p.mc is not None]
        if mc:
            ax.errorbar(
                [p.n * 1.04 for p in mc],  # nudged right so the error bars do not overlap
                [p.mc.rate for p in mc if p.mc is not None],
                yerr=[p.mc.stderr for p in mc if p.mc is not None],
                color=colour,
                marker="s",
                markerfacecolor="none",
                linestyle=":",
                capsize=3,
                label=f"{name}: Monte Carlo",
            )
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_ns))
    ax.set_xticklabels([str(n) for n in sorted(all_ns)])
    modes = sorted({r.mode for r in reports})
    ax.set_xlabel("N (" + " / ".join(f"{m}-of-N" for m in modes) + ")")
    ax.set_ylabel("win rate against the reference")
    ax.set_title("Inference-time win rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    if not out.suffix:  # matplotlib adds .png to a name without one: say where it went
        out = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
