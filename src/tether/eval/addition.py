"""Evaluation for the critical-token paper (Vassoyan et al. 2025; docs/methods.md §3).

Three things live here:

- **Addition accuracy** (the paper's Tables 4 and 5): for every operand length ``d``, ``n``
  problems whose operands both have ``d`` digits ("identical") and ``n`` whose longer operand has
  ``d`` digits and the other 1..d ("varying"). Greedy decoding by default, sampled Pass@1 at a
  temperature > 0. Each cell carries a percentile-bootstrap 95% CI; :func:`accuracy_table`
  renders the cells as the paper lays them out.
- **Certainty** of a next-token distribution, a number in [0, 1] (1 = one-hot, 0 = uniform) in
  the two forms the paper and its released code use (:func:`tether.objectives.common.certainty`); the same function
  gives the prioritised-KL token weights ``w = certainty ** beta_c`` elsewhere.
- **Critical-token certainty** (the paper's Table 1): the model answers (N+1)-digit problems,
  one forward pass scores its certainty at each completion position, and the mean certainty at
  the critical positions (``tasks.addition.critical_positions``) is compared with the mean at
  all other positions. Generation (:func:`critical_certainty`) and scoring
  (:func:`score_critical_certainty`, on hand-made completions) are separate entry points;
  :func:`certainty_table` renders the result.

Every result is a JSON-serialisable dict (digit lengths as ``str`` keys).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tether.batches import collate_pairs
from tether.eval.stats import bootstrap_ci
from tether.generation.sampler import sample
from tether.models.loading import eval_mode, model_device
from tether.objectives import shifted_token_logprobs
from tether.objectives.common import (
    CERTAINTY_FORMS,
    DEFAULT_CERTAINTY_TEMPERATURE,
    CertaintyForm,
    certainty,
)
from tether.tasks.addition import (
    Problem,
    critical_positions,
    equal_length_problem,
    is_correct,
    max_completion_tokens,
    rl_problem,
    varying_length_problem,
)

# The per-form figures of a Table 1 result, after "n_prompts".
FIGURE_KEYS = (
    "delta_mean",
    "delta_std",
    "delta_ci_low",
    "delta_ci_high",
    "control_mean",
    "control_ci_low",
    "control_ci_high",
    "certainty_critical",
    "certainty_other",
)


ACCURACY_KINDS: dict[str, Callable[[random.Random, int], Problem]] = {
    "identical": equal_length_problem,  # Table 4
    "varying": varying_length_problem,  # Table 5
}


# ----------------------------------------------------------------------------- helpers


def _chunks(n: int, size: int) -> list[range]:
    """``range(0, n)`` cut into consecutive ranges of at most ``size``."""
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _problems(kind: str, digits: int, n: int, seed: int) -> list[Problem]:
    """``n`` problems of one kind and length from their own seeded stream, so the problems at a
    given length are the same whichever other lengths are evaluated alongside."""
    rng = random.Random(f"tether-eval/{seed}/{kind}/{digits}")
    make = ACCURACY_KINDS[kind]
    return [make(rng, digits) for _ in range(n)]


# ----------------------------------------------------------------------------- accuracy


def addition_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    digits: range | Sequence[int],
    n: int,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 256,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Exact-match accuracy on scratchpad addition, per operand length (Tables 4 and 5).

    For each ``d`` in ``digits``: ``n`` "identical" problems (both operands have ``d`` digits)
    and ``n`` "varying" ones (one has ``d``, the other 1..d). The problems depend only on
    ``seed``, ``d`` and the kind, so every model is scored on the same problems. Greedy when
    ``temperature == 0``; otherwise one sample per problem at that temperature (Pass@1) from a
    ``torch.Generator`` seeded with ``seed``. ``max_new_tokens`` defaults to the longest
    scratchpad of length ``d`` plus a margin.

    Returns ``{"temperature", "n", "seed", "identical": {str(d): cell}, "varying": {...}}`` with
    ``cell = {"accuracy", "ci_low", "ci_high", "n", "unfinished"}`` (fractions in [0, 1];
    ``unfinished`` counts generations cut at the token budget).
    """
    digit_list = [int(d) for d in digits]
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=model_device(model)).manual_seed(seed)

    result: dict[str, Any] = {"temperature": float(temperature), "n": n, "seed": seed}
    total_chunks = len(digit_list) * len(ACCURACY_KINDS) * len(_chunks(n, batch_size))
    bar = tqdm(total=total_chunks, desc="addition accuracy", disable=not progress, leave=False)
    with eval_mode(model), torch.inference_mode():
        for kind in ACCURACY_KINDS:
            cells: dict[str, dict[str, Any]] = {}
            for d in digit_list:
                problems = _problems(kind, d, n, seed)
                budget = max_new_tokens if max_new_tokens is not None else max_completion_tokens(d)
                correct = np.zeros(n, dtype=np.float64)
                unfinished = 0
                for rows in _chunks(n, batch_size):
                    out = sample(
                        model,
                        tokenizer,
                        [problems[i].prompt for i in rows],
                        max_new_tokens=budget,
                        temperature=temperature,
                        generator=generator,
                        batch_size=batch_size,
                    )
                    for i, text, done in zip(rows, out.texts, out.finished, strict=True):
                        correct[i] = float(is_correct(problems[i], text))
                        unfinished += int(not done)
                    bar.update(1)
                lo, hi = bootstrap_ci(correct, seed=seed)
                cells[str(d)] = {
                    "accuracy": float(correct.mean()),
                    "ci_low": lo,
                    "ci_high": hi,
                    "n": n,
                    "unfinished": unfinished,
                }
            result[kind] = cells
    bar.close()
    return result


def accuracy_table(result: dict[str, Any], decimals: int = 1) -> str:
    """Markdown table of an :func:`addition_accuracy` result in the layout of Tables 4/5: one row
    per kind (identical, varying), one column per digit length, cells ``acc [lo, hi]`` in %."""
    kinds = [k for k in ACCURACY_KINDS if k in result]
    digits = sorted({d for k in kinds for d in result[k]}, key=int)

    def cell(c: dict[str, Any] | None) -> str:
        if c is None:
            return "–"
        pct = [100.0 * c[key] for key in ("accuracy", "ci_low", "ci_high")]
        return f"{pct[0]:.{decimals}f} [{pct[1]:.{decimals}f}, {pct[2]:.{decimals}f}]"

    lines = [
        "| operands | " + " | ".join(f"{d} digits" for d in digits) + " |",
        "|---|" + "---|" * len(digits),
    ]
    for kind in kinds:
        row = [cell(result[kind].get(d)) for d in digits]
        lines.append(f"| {kind} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- Table 1


def completion_certainty(
    model: torch.nn.Module,
    prompt_rows: Sequence[Sequence[int]],
    completion_rows: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    batch_size: int = 64,
    forms: Sequence[CertaintyForm] = CERTAINTY_FORMS,
) -> list[dict[str, np.ndarray]]:
    """Certainty of the model's next-token distribution at every completion position.

    Row ``b`` is laid out as in training (prompt then completion, no padding in between, padded
    on the right), so position ids are plain 0..L−1. Entry ``j`` of the returned arrays is the
    certainty of p(· | x, y_<j), the distribution the model samples completion token ``j``
    from: the logits at column ``len(prompt) + j − 1``. One forward pass per chunk, fp32.
    """
    out: list[dict[str, np.ndarray]] = []
    device = model_device(model)
    with eval_mode(model), torch.inference_mode():
        for rows in _chunks(len(prompt_rows), batch_size):
            seqs = [list(prompt_rows[i]) + list(completion_rows[i]) for i in rows]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
            attn = torch.zeros((len(seqs), width), dtype=torch.long)
            for k, s in enumerate(seqs):
                ids[k, : len(s)] = torch.tensor(s, dtype=torch.long)
                attn[k, : len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
            cert = {f: certainty(logits, f).cpu().numpy() for f in forms}  # [B, L] each
            for k, i in enumerate(rows):
                start = len(prompt_rows[i]) - 1
                stop = start + len(completion_rows[i])
                out.append({f: cert[f][k, start:stop].astype(np.float64) for f in forms})
    return out


def _summarise_critical(
    problems: Sequence[Problem],
    completion_rows: Sequence[Sequence[int]],
    target_rows: Sequence[Sequence[int]],
    certainties: Sequence[dict[str, np.ndarray]],
    texts: Sequence[str],
    max_digits: int,
    seed: int,
) -> dict[str, Any]:
    """Per prompt: Δ = mean Ĵ at usable critical positions − mean Ĵ at all other completion
    positions, and the control = mean Ĵ at other positions − mean Ĵ at all positions; then the
    mean, spread and bootstrap CI of both across prompts, for each certainty form.

    A critical offset ``pos`` of the reference target is usable in a completion only if the
    completion is at least ``pos + 1`` tokens long and its first ``pos`` tokens equal the
    target's: then position ``pos`` is the same decision point as in the reference.
    """
    forms = list(certainties[0]) if certainties else list(CERTAINTY_FORMS)
    per_prompt: dict[str, dict[str, list[float]]] = {
        f: {"delta": [], "control": [], "critical": [], "other": []} for f in forms
    }
    n_critical = n_usable = 0
    for problem, comp, target, cert in zip(
        problems, completion_rows, target_rows, certainties, strict=True
    ):
        comp, target = list(comp), list(target)
        positions = critical_positions(problem, max_digits)
        usable = [p for p in positions if p < len(comp) and comp[:p] == target[:p]]
        n_critical += len(positions)
        n_usable += len(usable)
        is_critical = np.zeros(len(comp), dtype=bool)
        is_critical[usable] = True
        if not usable or is_critical.all():
            continue
        for f in forms:
            c = cert[f]
            crit, other, overall = c[is_critical].mean(), c[~is_critical].mean(), c.mean()
            stats = per_prompt[f]
            stats["delta"].append(crit - other)
            stats["control"].append(other - overall)
            stats["critical"].append(crit)
            stats["other"].append(other)

    def describe(stats: dict[str, list[float]]) -> dict[str, Any]:
        delta, control = np.array(stats["delta"]), np.array(stats["control"])
        if delta.size == 0:  # no prompt reached a critical token: same keys, no figures
            return {"n_prompts": 0} | dict.fromkeys(FIGURE_KEYS)
        d_lo, d_hi = bootstrap_ci(delta, seed=seed)
        c_lo, c_hi = bootstrap_ci(control, seed=seed)
        return {
            "n_prompts": int(delta.size),
            "delta_mean": float(delta.mean()),
            "delta_std": float(delta.std(ddof=1)) if delta.size > 1 else 0.0,
            "delta_ci_low": d_lo,
            "delta_ci_high": d_hi,
            "control_mean": float(control.mean()),
            "control_ci_low": c_lo,
            "control_ci_high": c_hi,
            "certainty_critical": float(np.mean(stats["critical"])),
            "certainty_other": float(np.mean(stats["other"])),
        }

    n = len(problems)
    accuracy = (
        sum(is_correct(p, t) for p, t in zip(problems, texts, strict=True)) / n if n else math.nan
    )
    return {
        "max_digits": max_digits,
        "n": n,
        "accuracy": float(accuracy),
        "n_critical": n_critical,
        "n_critical_usable": n_usable,
        "certainty_temperature": {f: DEFAULT_CERTAINTY_TEMPERATURE[f] for f in forms},
        "forms": {f: describe(per_prompt[f]) for f in forms},
    }


def _target_rows(tokenizer: Any, problems: Sequence[Problem]) -> list[list[int]]:
    """Reference targets as token ids; critical offsets are characters, so one token per char."""
    rows = tokenizer([p.target for p in problems], add_special_tokens=False)["input_ids"]
    for p, row in zip(problems, rows, strict=True):
        if len(row) != len(p.target):
            raise ValueError(
                "critical-token certainty needs a character-level tokenizer (one token per "
                f"character); the target of {p.a}+{p.b} has {len(p.target)} characters but "
                f"{len(row)} tokens"
            )
    return rows


def score_critical_certainty(
    model: torch.nn.Module,
    tokenizer: Any,
    problems: Sequence[Problem],
    completions: Sequence[str],
    max_digits: int,
    *,
    add_eos: bool = True,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """The scoring step of :func:`critical_certainty` on given completion texts (e.g. the
    reference targets, or a model's outputs saved earlier). ``add_eos`` appends EOS to each
    completion, as a finished generation has it. Same result layout as
    :func:`critical_certainty` (``temperature`` is None: nothing was generated here)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    prompt_rows = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos else []
    completion_rows = [
        row + eos for row in tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    ]
    certainties = completion_certainty(
        model,
        prompt_rows,
        completion_rows,
        pad_token_id=tokenizer.pad_token_id or 0,
        batch_size=batch_size,
    )
    result = _summarise_critical(
        problems,
        completion_rows,
        _target_rows(tokenizer, problems),
        certainties,
        list(completions),
        max_digits,
        seed,
    )
    return {"temperature": None, **result}


def critical_certainty(
    model: torch.nn.Module,
    tokenizer: Any,
    max_digits: int,
    n: int,
    seed: int = 0,
    temperature: float = 0.0,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Table 1: is the model less certain at the critical tokens than elsewhere?

    Draws ``n`` problems from the RL distribution on N+1 digits (``rl_problem``, N =
    ``max_digits``, seeded), lets the model answer them (greedy by default), then scores the
    certainty of its next-token distribution at every completion position in one forward pass
    over prompt + completion, in both forms of :func:`certainty`. Per form the result holds
    ``delta_mean`` (critical − other; the paper: −0.33/−0.21/−0.13 for N = 3/5/7), its std
    across prompts and bootstrap CI, the ``control_mean`` (other − all; the paper: ≈ +0.001),
    the mean certainty at critical and other positions, and how many prompts had a usable
    critical position; ``n_critical``/``n_critical_usable`` count positions.
    """
    rng = random.Random(f"tether-certainty/{seed}/{max_digits}")
    problems = [rl_problem(rng, max_digits) for _ in range(n)]
    budget = max_new_tokens if max_new_tokens is not None else max_completion_tokens(max_digits + 1)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=model_device(model)).manual_seed(seed)

    prompt_rows: list[list[int]] = []
    completion_rows: list[list[int]] = []
    texts: list[str] = []
    chunks = _chunks(n, batch_size)
    with eval_mode(model), torch.inference_mode():
        for rows in tqdm(chunks, desc="critical certainty", disable=not progress, leave=False):
            out = sample(
                model,
                tokenizer,
                [problems[i].prompt for i in rows],
                max_new_tokens=budget,
                temperature=temperature,
                generator=generator,
                batch_size=batch_size,
            )
            # back from the sampler's padded layout to plain token lists
            for k in range(len(rows)):
                prompt_rows.append(out.prompt_ids[k][out.prompt_mask[k].bool()].tolist())
                completion_rows.append(
                    out.completion_ids[k][out.completion_mask[k].bool()].tolist()
                )
                texts.append(out.texts[k])
    certainties = completion_certainty(
        model,
        prompt_rows,
        completion_rows,
        pad_token_id=tokenizer.pad_token_id or 0,
        batch_size=batch_size,
    )
    result = _summarise_critical(
        problems,
        completion_rows,
        _target_rows(tokenizer, problems),
        certainties,
        texts,
        max_digits,
        seed,
    )
    return {"temperature": float(temperature), **result}


def certainty_table(results: dict[str, Any] | Sequence[dict[str, Any]], decimals: int = 3) -> str:
    """Markdown table of one or more :func:`critical_certainty` results (one per N, as in
    Table 1): per N and certainty form, Δ = critical − other with its std and 95% CI, the
    non-critical control, the mean certainty at critical and at other tokens, prompts used."""
    if isinstance(results, dict):
        results = [results]

    def fmt(x: float | None) -> str:
        return "–" if x is None else f"{x:+.{decimals}f}"

    lines = [
        "| N | certainty | Δ critical − other | std | 95% CI | control (other − all) "
        "| Ĵ critical | Ĵ other | prompts used | critical tokens usable |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        usable = f"{result['n_critical_usable']}/{result['n_critical']}"
        for form, s in result["forms"].items():
            t = result.get("certainty_temperature", {}).get(form)
            name = f"{form} (T={t:g})" if t is not None else form
            ci = (
                "–"
                if s["delta_mean"] is None
                else f"[{fmt(s['delta_ci_low'])}, {fmt(s['delta_ci_high'])}]"
            )
            cells = [
                str(result["max_digits"]),
                name,
                fmt(s["delta_mean"]),
                "–" if s["delta_std"] is None else f"{s['delta_std']:.{decimals}f}",
                ci,
                fmt(s["control_mean"]),
                "–"
                if s["certainty_critical"] is None
                else f"{s['certainty_critical']:.{decimals}f}",
                "–" if s["certainty_other"] is None else f"{s['certainty_other']:.{decimals}f}",
                f"{s['n_prompts']}/{result['n']}",
                usable,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- critical-token probe


@torch.no_grad()
def critical_token_probabilities(
    model: torch.nn.Module, tokenizer: Any, problems: Sequence[Problem], max_digits: int
) -> dict[str, float]:
    """The paper's Fig. 4/7 probe: the model's probability of the correct token at each critical
    position, given the correct prefix (teacher forcing on the reference target).

    Returns the mean over all critical positions, and separately over the comma-vs-``]``
    decisions and over the digits that follow them (NaN when no problem has a critical token).
    """
    device = model_device(model)
    batch = collate_pairs(tokenizer, [p.prompt for p in problems], [p.target for p in problems]).to(
        device
    )
    with eval_mode(model), torch.inference_mode():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    probs = shifted_token_logprobs(logits, batch.input_ids).exp().cpu()
    commas: list[float] = []
    digits: list[float] = []
    for row, p in enumerate(problems):
        start = len(tokenizer(p.prompt, add_special_tokens=False)["input_ids"])
        for pos in critical_positions(p, max_digits):
            (commas if p.target[pos] == "," else digits).append(float(probs[row, start + pos]))
    everything = commas + digits
    return {
        "p_critical": float(np.mean(everything)) if everything else float("nan"),
        "p_critical_comma": float(np.mean(commas)) if commas else float("nan"),
        "p_critical_digit": float(np.mean(digits)) if digits else float("nan"),
    }
