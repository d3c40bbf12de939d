"""Evaluation for IQLearn imitation (docs/methods.md §4): task score against diversity, and how well
a model's implicit reward tracks the task score.

The claim to reproduce is that, at equal or better task score, IQLearn's samples are more
diverse than MLE's, and that IQLearn's extracted reward correlates with the task metric. Both
are judged on samples, so everything here starts from :func:`tether.generation.texts.sample_rows`
called once over the problems' prompts, each repeated ``k`` times (a prompt's ``k`` samples are
adjacent rows), with a ``torch.Generator`` seeded from ``seed``.

- :func:`diversity_sweep`: one row per sampling temperature with accuracy (bootstrap CI), the
  graded score, Self-BLEU, distinct-1/2 and the policy's per-token entropy. docs/methods.md asks to
  decode every method over a temperature sweep before comparing: a method is better only if
  its curve lies above the other's, not at one hand-picked temperature.
- :func:`reward_correlation`: the sequence return R of each sample under the model's own
  implicit reward (:func:`tether.rewards.implicit.model_returns`) and its Spearman correlation with
  ``task.score``; :func:`per_token_rewards` shows r̂ token by token for one example.
- :func:`plot_score_vs_diversity`, :func:`plot_reward_vs_score`: the two figures (PNG, Agg).
- :func:`seeds_summary` / :func:`seeds_table`: a sweep repeated over training seeds, as mean
  and 95% Student-t interval across seeds per method and temperature.

Choices, stated once:

- **Token rows.** Returns and entropies are computed on the sampler's own token ids (the
  prompt's real ids, then the completion's real ids, EOS included when one was generated;
  right-padded, positions 0..L−1 as in training), not on re-tokenised text: decoding skips
  special tokens and a BPE tokenizer need not re-encode a decoded string to the same ids, so
  only the sampler's ids are guaranteed to be the actions the policy took. A row is terminated
  (V = 0 after its last token) iff the sampler reports it ``finished``; no stop strings are
  passed, so that is exactly "ended with EOS", and a row cut by ``max_new_tokens`` keeps its
  boundary term (docs/methods.md §4: truncation is never terminal).
- **Entropy.** The sampler returns only the chosen tokens' log-probabilities, not the full
  distribution, so the entropy comes from one teacher-forced forward pass over prompt +
  completion: H(softmax(logits)) at temperature 1 (the model's own distribution, whatever the
  sampling temperature) at each position that predicts a completion token (EOS included),
  pooled over all completion tokens of all samples (a token-weighted mean, in nats). Across a
  sweep it therefore changes only through the states the samples visit.
- **Accuracy CI.** A prompt's ``k`` samples are not independent, so the bootstrap resamples
  prompts (each with its mean correctness over its ``k`` samples), not samples. The point
  estimate is the same mean over all samples.
- **Temperature 0** (greedy) is allowed: the ``k`` samples of a prompt are then identical, so
  Self-BLEU is 100 (0 where the completion is empty) and distinct-n is that of one sample.
- **Reproducibility.** Each temperature's generator is seeded with ``seed`` itself, so a row
  does not depend on which other temperatures are in the sweep. Samples at a temperature > 0
  do depend on the order of the problems (one generator feeds the whole batch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tether.batches import TokenBatch, collate_pairs, collate_token_rows
from tether.eval.diversity import mean_distinct_n, mean_self_bleu, mean_token_entropy
from tether.eval.stats import bootstrap_ci, mean_ci
from tether.generation.texts import SampledRows, sample_rows
from tether.models.loading import eval_mode, model_device
from tether.rewards.implicit import model_returns, spearman, token_rewards
from tether.tasks import Task  # noqa: E402
from tether.tasks.prompts import PromptFormat, format_prompt

__all__ = [
    "SEED_METRICS",
    "SWEEP_KEYS",
    "diversity_sweep",
    "format_token_rewards",
    "per_token_rewards",
    "plot_reward_vs_score",
    "plot_score_vs_diversity",
    "reward_correlation",
    "seeds_summary",
    "seeds_table",
]

# The keys of one diversity_sweep row, in order.
SWEEP_KEYS = (
    "temperature",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "score",
    "self_bleu",
    "distinct_1",
    "distinct_2",
    "entropy",
    "mean_length",
    "unfinished",
    "n_prompts",
    "k",
)

# The sweep figures aggregated across seeds by seeds_summary.
SEED_METRICS = ("accuracy", "score", "self_bleu", "distinct_1", "distinct_2", "entropy")
# the range of each figure: its interval across seeds is cut to it (an accuracy stays in [0, 1])
SEED_METRIC_RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0),
    "score": (0.0, 1.0),
    "self_bleu": (0.0, 100.0),
    "distinct_1": (0.0, 1.0),
    "distinct_2": (0.0, 1.0),
    "entropy": (0.0, math.inf),
}


# ----------------------------------------------------------------------------- sampling


@dataclass
class _SampleBatch:
    """k samples of each problem: the sampled rows and the token batch built from them."""

    rows: SampledRows
    batch: TokenBatch  # prompt + completion (sampler ids), right-padded, on the model's device
    terminated: torch.Tensor  # [N] bool: the row ended with EOS
    problem_index: list[int]  # sample i answers problems[problem_index[i]]
    lengths: list[int]  # completion tokens per sample, EOS included


def _check(problems: Sequence[Any], k: int, batch_size: int) -> None:
    if not problems:
        raise ValueError("need at least one problem")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _draw(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    problems: Sequence[Any],
    *,
    k: int,
    temperature: float,
    seed: int,
    batch_size: int,
    max_new_tokens: int | None,
) -> _SampleBatch:
    """Every prompt repeated ``k`` times (adjacent rows), sampled from one generator seeded
    with ``seed``. The model must already be in eval mode."""
    budget = task.max_new_tokens() if max_new_tokens is None else max_new_tokens
    index = [i for i in range(len(problems)) for _ in range(k)]
    rows = sample_rows(
        model,
        tokenizer,
        [problems[i].prompt for i in index],
        max_new_tokens=budget,
        temperature=temperature,
        seed=seed,
        prompt_format=task.prompt_format,
        batch_size=batch_size,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model_device(model)
    batch = collate_token_rows(rows.prompt_rows, rows.completion_rows, int(pad)).to(device)
    terminated = torch.tensor(rows.finished, dtype=torch.bool, device=device)
    lengths = [len(c) for c in rows.completion_rows]
    return _SampleBatch(rows, batch, terminated, index, lengths)


def _sub_batch(batch: TokenBatch, rows: range) -> TokenBatch:
    """Rows ``rows`` of ``batch``, trimmed to their longest real row."""
    sl = slice(rows.start, rows.stop)
    attn = batch.attention_mask[sl]
    width = max(int(attn.sum(1).max()), 1) if attn.numel() else 1
    return TokenBatch(batch.input_ids[sl, :width], attn[:, :width], batch.loss_mask[sl, :width])


ENTROPY_ELEMENTS = 2**25  # logits per chunk of the entropy pass: 128 MiB in fp32


def _completion_entropy(model: torch.nn.Module, batch: TokenBatch, batch_size: int) -> float:
    """Mean entropy (nats) of the model's next-token distribution at temperature 1 over every
    position that predicts a completion token, pooled over all rows; NaN with none."""
    total, count = 0.0, 0.0
    # the logits of a chunk are [rows, width, V] fp32 and the entropy makes a few copies: keep
    # a chunk within ENTROPY_ELEMENTS (at V = 49k, 64 rows of 100 tokens would take ~5 GB)
    width = max(int(batch.attention_mask.sum(1).max()), 1) if batch.input_ids.numel() else 1
    vocab = int(model.get_output_embeddings().weight.shape[0])  # type: ignore[operator,union-attr]
    rows_per_chunk = max(1, min(batch_size, ENTROPY_ELEMENTS // (width * vocab)))
    for rows in _chunks(batch.input_ids.shape[0], rows_per_chunk):
        sub = _sub_batch(batch, rows)
        mask = sub.loss_mask[:, 1:]
        n = float(mask.sum())
        if n == 0:
            continue
        logits = model(input_ids=sub.input_ids, attention_mask=sub.attention_mask).logits
        total += float(mean_token_entropy(logits[:, :-1], mask)) * n
        count += n
    return total / count if count else math.nan


def _chunks(n: int, size: int) -> list[range]:
    """``range(0, n)`` cut into consecutive ranges of at most ``size``."""
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _groups(texts: Sequence[str], k: int) -> list[list[str]]:
    return [list(texts[i : i + k]) for i in range(0, len(texts), k)]


# ----------------------------------------------------------------------------- sweep


def diversity_sweep(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    problems: Sequence[Any],
    *,
    temperatures: Sequence[float],
    k: int,
    seed: int,
    batch_size: int = 256,
    max_new_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Task score against diversity at each temperature: ``k`` samples per problem.

    Returns one row per temperature (in the order given), with the keys of
    :data:`SWEEP_KEYS`:

    - ``accuracy``: mean ``task.is_correct`` over all samples, with a 95% percentile bootstrap
      CI over prompts (``accuracy_ci_low``/``_high``); ``score``: mean ``task.score``;
    - ``self_bleu``: mean over prompts of the Self-BLEU of its ``k`` samples (character
      tokens, :func:`tether.eval.diversity.self_bleu`), 0..100, lower = more diverse;
    - ``distinct_1``, ``distinct_2``: distinct character n-grams pooled over a prompt's samples,
      averaged over prompts (:func:`tether.eval.diversity.mean_distinct_n`), higher = more diverse;
    - ``entropy``: the model's per-token entropy at temperature 1 over the sampled completions
      (nats; module docstring);
    - ``mean_length`` (completion tokens, EOS included), ``unfinished`` (samples cut at the
      token budget), ``n_prompts``, ``k``.

    ``k`` >= 2 (Self-BLEU needs two samples). Temperature 0 is greedy, so its ``k`` samples
    are identical and Self-BLEU is 100. ``max_new_tokens`` defaults to
    ``task.max_new_tokens()``. Each temperature's generator is seeded with ``seed``.
    """
    _check(problems, k, batch_size)
    if k < 2:
        raise ValueError(f"k must be >= 2 for Self-BLEU, got {k}")
    temps = [float(t) for t in temperatures]
    if not temps:
        raise ValueError("need at least one temperature")
    if any(not math.isfinite(t) or t < 0 for t in temps):
        raise ValueError(f"temperatures must be finite and >= 0, got {temps}")

    rows: list[dict[str, Any]] = []
    with eval_mode(model), torch.inference_mode():
        for temperature in temps:
            s = _draw(
                model,
                tokenizer,
                task,
                problems,
                k=k,
                temperature=temperature,
                seed=seed,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
            )
            texts = s.rows.texts
            correct = np.array(
                [
                    float(task.is_correct(problems[i], t))
                    for i, t in zip(s.problem_index, texts, strict=True)
                ]
            )
            scores = [
                float(task.score(problems[i], t))
                for i, t in zip(s.problem_index, texts, strict=True)
            ]
            per_prompt = correct.reshape(len(problems), k).mean(axis=1)
            lo, hi = bootstrap_ci(per_prompt, seed=seed)
            groups = _groups(texts, k)
            rows.append(
                {
                    "temperature": temperature,
                    "accuracy": float(correct.mean()),
                    "accuracy_ci_low": lo,
                    "accuracy_ci_high": hi,
                    "score": float(np.mean(scores)),
                    "self_bleu": float(mean_self_bleu(groups)),
                    "distinct_1": float(mean_distinct_n(groups, 1)),
                    "distinct_2": float(mean_distinct_n(groups, 2)),
                    "entropy": _completion_entropy(model, s.batch, batch_size),
                    "mean_length": float(np.mean(s.lengths)),
                    "unfinished": sum(not f for f in s.rows.finished),
                    "n_prompts": len(problems),
                    "k": k,
                }
            )
    return rows


# ----------------------------------------------------------------------------- rewards


def _within_prompt_spearman(
    returns: Sequence[float], scores: Sequence[float], k: int
) -> tuple[float, float]:
    """Spearman of returns and scores after subtracting each prompt's mean from both, so that
    differences between prompts (length, difficulty: V(s_1) differs per prompt) drop out."""
    if k < 2:
        return math.nan, math.nan
    r = np.asarray(returns, dtype=np.float64).reshape(-1, k)
    s = np.asarray(scores, dtype=np.float64).reshape(-1, k)
    return spearman((r - r.mean(1, keepdims=True)).ravel(), (s - s.mean(1, keepdims=True)).ravel())


def reward_correlation(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    problems: Sequence[Any],
    *,
    k: int,
    temperature: float,
    seed: int,
    gamma: float = 1.0,
    batch_size: int = 256,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Does the model's implicit reward track the task score? ``k`` samples per problem at
    ``temperature``, each scored by ``task.score`` and by its sequence return
    R = Σ_t γ^(t−1) r̂_t under the model itself (:func:`tether.rewards.implicit.model_returns` on the
    sampler's token rows, terminated iff the sample ended with EOS; module docstring).

    Returns a JSON-serialisable dict: ``spearman_rho``, ``p_value`` (NaN when either side is
    constant, e.g. every score equal), ``n`` samples, ``n_prompts``, ``k``, ``temperature``,
    ``gamma``, ``mean_return``, ``mean_score``, ``accuracy``, ``unfinished``;
    ``spearman_rho_within``/``p_value_within``, the same after centring returns and scores on
    each prompt's mean (differences between prompts removed; NaN for k = 1); and per sample,
    in order (problem 0's k samples first): ``returns``, ``scores``, ``completions`` (text),
    ``finished`` and ``prompt_index`` (index into ``problems``).
    """
    _check(problems, k, batch_size)
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    with eval_mode(model), torch.inference_mode():
        s = _draw(
            model,
            tokenizer,
            task,
            problems,
            k=k,
            temperature=temperature,
            seed=seed,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )
        parts = [
            model_returns(
                model,
                _sub_batch(s.batch, rows),
                s.terminated[rows.start : rows.stop],
                gamma,
            )
            for rows in _chunks(len(s.problem_index), batch_size)
        ]
    returns = [float(r) for r in torch.cat(parts).double().cpu().tolist()]
    texts = s.rows.texts
    scores = [
        float(task.score(problems[i], t)) for i, t in zip(s.problem_index, texts, strict=True)
    ]
    correct = [
        float(task.is_correct(problems[i], t)) for i, t in zip(s.problem_index, texts, strict=True)
    ]
    rho, p = spearman(returns, scores)
    rho_w, p_w = _within_prompt_spearman(returns, scores, k)
    return {
        "temperature": float(temperature),
        "k": k,
        "gamma": float(gamma),
        "n": len(returns),
        "n_prompts": len(problems),
        "spearman_rho": rho,
        "p_value": p,
        "spearman_rho_within": rho_w,
        "p_value_within": p_w,
        "mean_return": float(np.mean(returns)),
        "mean_score": float(np.mean(scores)),
        "accuracy": float(np.mean(correct)),
        "unfinished": sum(not f for f in s.rows.finished),
        "returns": returns,
        "scores": scores,
        "completions": list(texts),
        "finished": list(s.rows.finished),
        "prompt_index": list(s.problem_index),
    }


def per_token_rewards(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    completion: str,
    prompt_format: PromptFormat,
    *,
    add_eos: bool = True,
    gamma: float = 1.0,
) -> list[tuple[str, float]]:
    """r̂_t for each completion token of one example: ``[(token text, r̂), ...]``.

    The prompt is formatted as in training (:func:`tether.tasks.prompts.format_prompt` in ``prompt_format``: the chat
    template where the tokenizer has one). The pair is tokenised with
    :func:`tether.batches.collate_pairs` (prompt and completion
    separately, no special tokens); ``add_eos`` appends EOS and makes the row terminated
    (V = 0 after it), as for a sample that ``finished``; without it the row is truncated and
    its last reward keeps the γ·V boundary term. The returns of :func:`reward_correlation` come
    from the sampler's ids; for a character tokenizer those are the same tokens, so the r̂
    here sum (γ = 1) to that sample's return.
    """
    device = model_device(model)
    text = format_prompt(tokenizer, prompt, prompt_format)
    batch = collate_pairs(tokenizer, [text], [completion], add_eos=add_eos).to(device)
    terminated = torch.tensor([add_eos], dtype=torch.bool, device=device)
    with eval_mode(model), torch.inference_mode():
        rewards = token_rewards(model, batch, terminated, gamma)[0].cpu()
    ids = batch.input_ids[0].cpu().tolist()
    positions = (batch.loss_mask[0].cpu() > 0).nonzero().flatten().tolist()
    return [(_token_text(tokenizer, ids[p]), float(rewards[p])) for p in positions]


def _token_text(tokenizer: Any, token_id: int) -> str:
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if not text:
        text = str(tokenizer.convert_ids_to_tokens(token_id))
    return str(text)


def format_token_rewards(pairs: Sequence[tuple[str, float]], decimals: int = 2) -> str:
    """One line per example for a terminal: ``token[r̂]`` for each token, e.g.
    ``1[+0.31] ' '[-1.20] <eos>[+2.05]``; a token that is all whitespace is shown quoted
    (``repr``), so spaces and newlines stay visible."""

    def show(token: str) -> str:
        return token if token.strip() else repr(token)

    return " ".join(f"{show(t)}[{r:+.{decimals}f}]" for t, r in pairs)


# ----------------------------------------------------------------------------- seeds


def seeds_summary(
    rows_by_method: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
) -> dict[str, list[dict[str, Any]]]:
    """A sweep repeated over seeds, aggregated: ``rows_by_method[method]`` is one
    :func:`diversity_sweep` result (a list of rows) per seed. For each method, one row per
    temperature (ascending; temperatures matched by value, so a seed missing one simply
    contributes nothing to it) with ``temperature``, ``n_seeds`` and, for each key of
    :data:`SEED_METRICS`, the mean across seeds and its 95% Student-t interval as
    ``<key>_ci_low``/``<key>_ci_high`` (degenerate for one seed; NaN where no seed has the key).
    The rows have the keys :func:`plot_score_vs_diversity` reads, so a summary can be plotted."""
    out: dict[str, list[dict[str, Any]]] = {}
    for method, seeds in rows_by_method.items():
        by_temp: dict[float, list[Mapping[str, Any]]] = {}
        for rows in seeds:
            for row in rows:
                by_temp.setdefault(float(row["temperature"]), []).append(row)
        summary = []
        for temperature in sorted(by_temp):
            group = by_temp[temperature]
            agg: dict[str, Any] = {"temperature": temperature, "n_seeds": len(group)}
            for key in SEED_METRICS:
                values = [float(r[key]) for r in group if r.get(key) is not None]
                m, lo, hi = mean_ci(values, bounds=SEED_METRIC_RANGES[key])
                agg[key], agg[f"{key}_ci_low"], agg[f"{key}_ci_high"] = m, lo, hi
            summary.append(agg)
        out[method] = summary
    return out


def _pm(mean: float, low: float, high: float, n: int, decimals: int) -> str:
    """``mean ± h``, or ``mean [low, high]`` where the interval was cut to the figure's range."""
    if not math.isfinite(mean):
        return "–"
    if n < 2 or not math.isfinite(high):
        return f"{mean:.{decimals}f}"
    if not math.isclose(high - mean, mean - low, rel_tol=1e-9, abs_tol=1e-12):
        return f"{mean:.{decimals}f} [{low:.{decimals}f}, {high:.{decimals}f}]"
    return f"{mean:.{decimals}f} ± {high - mean:.{decimals}f}"


def seeds_table(rows_by_method: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]) -> str:
    """Markdown table of :func:`seeds_summary`: one line per method and temperature, each
    figure as mean ± half-width of its 95% t-interval across seeds, or mean [low, high] where
    that interval was cut to the figure's range (the mean alone for one seed). Accuracy and score are fractions, Self-BLEU is 0..100 (lower = more diverse),
    entropy is in nats."""
    summary = seeds_summary(rows_by_method)
    columns = (
        ("accuracy", "accuracy", 3),
        ("score", "score", 3),
        ("self_bleu", "Self-BLEU", 1),
        ("distinct_2", "distinct-2", 3),
        ("entropy", "entropy", 3),
    )
    lines = [
        "| method | temperature | seeds | " + " | ".join(c[1] for c in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for method, rows in summary.items():
        for row in rows:
            n = row["n_seeds"]
            cells = [
                _pm(row[key], row[f"{key}_ci_low"], row[f"{key}_ci_high"], n, d)
                for key, _, d in columns
            ]
            lines.append(f"| {method} | {row['temperature']:g} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _err(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray | None:
    """[2, n] asymmetric error bars from ``<key>_ci_low``/``_high``, or None if absent."""
    lo_key, hi_key = f"{key}_ci_low", f"{key}_ci_high"
    if not all(_finite(r.get(lo_key)) and _finite(r.get(hi_key)) for r in rows):
        return None
    mid = np.array([r[key] for r in rows], dtype=np.float64)
    lo = np.array([r[lo_key] for r in rows], dtype=np.float64)
    hi = np.array([r[hi_key] for r in rows], dtype=np.float64)
    return np.stack([np.clip(mid - lo, 0, None), np.clip(hi - mid, 0, None)])


def plot_score_vs_diversity(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    metric: str = "accuracy",
    title: str | None = None,
) -> Path:
    """One line per method through its sweep rows (:func:`diversity_sweep` or
    :func:`seeds_summary` rows): x = Self-BLEU, y = ``metric`` ("accuracy" or "score"), each
    point labelled with its temperature, error bars where the rows carry ``_ci_low/_ci_high``.

    The x axis is reversed so that further right is more diverse (lower Self-BLEU): better
    methods sit towards the upper right. Writes a PNG to ``path`` (parents created); returns it.
    """
    if not curves:
        raise ValueError("plot_score_vs_diversity needs at least one method")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, (method, rows) in enumerate(curves.items()):
        pts = sorted(
            (r for r in rows if _finite(r.get("self_bleu")) and _finite(r.get(metric))),
            key=lambda r: float(r["temperature"]),
        )
        if not pts:
            continue
        xs = [float(r["self_bleu"]) for r in pts]
        ys = [float(r[metric]) for r in pts]
        color = f"C{i}"
        ax.errorbar(
            xs,
            ys,
            xerr=_err(pts, "self_bleu"),
            yerr=_err(pts, metric),
            marker="o",
            ms=4,
            capsize=2,
            color=color,
            label=method,
        )
        for x, y, r in zip(xs, ys, pts, strict=True):
            ax.annotate(
                f"T={float(r['temperature']):g}",
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=color,
            )
    ax.invert_xaxis()
    ax.set_xlabel("Self-BLEU among a prompt's samples (reversed: more diverse →)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs diversity over a temperature sweep", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reward_vs_score(
    results: Mapping[str, Mapping[str, Any]], path: str | Path, *, title: str | None = None
) -> Path:
    """One panel per method (:func:`reward_correlation` results): each sample's return R
    against its task score, Spearman's ρ and n in the legend, and the mean return at each
    distinct score (black diamonds) where there are few distinct scores (graded tasks give a
    handful of levels, so the points stack). Panels have their own y scale: returns of
    different models are not on a common scale. Writes a PNG to ``path``; returns it."""
    if not results:
        raise ValueError("plot_reward_vs_score needs at least one method")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(results)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    for i, (ax, (method, res)) in enumerate(zip(axes.flat, results.items(), strict=False)):
        scores = np.asarray(res.get("scores", []), dtype=np.float64)
        returns = np.asarray(res.get("returns", []), dtype=np.float64)
        rho = res.get("spearman_rho", math.nan)
        rho_text = f"ρ = {rho:.2f}" if _finite(rho) else "ρ undefined"
        ax.scatter(
            scores,
            returns,
            s=10,
            alpha=0.4,
            color=f"C{i}",
            label=f"{method}: {rho_text}, n = {len(returns)}",
        )
        levels = np.unique(scores)
        if 0 < levels.size <= 25:
            means = [returns[scores == v].mean() for v in levels]
            ax.plot(levels, means, "kD", ms=4, label="mean return per score")
        ax.set_xlim(-0.05, 1.05)  # task scores are in [0, 1]
        ax.set_xlabel("task score")
        ax.set_ylabel("return R (implicit reward)")
        ax.set_title(method, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title or "Extracted return vs task score (Spearman ρ)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
