"""Critical tokens of any model: where the reference is uncertain *and* its choice decides the
answer (``tether eval --certainty`` on a task other than the scratchpad addition).

The scratchpad task marks its critical tokens by position (:func:`tether.tasks.addition.
critical_positions`); a real model answers in its own format, so here they are found by
branching. For each problem the model answers greedily; for each position j of an answer the
checker accepts, the greedy token is swapped for the model's second choice and the rest is
completed greedily again. Position j is **decisive** when that one different choice makes the
answer wrong. Then, as Table 1 asks of the scratchpad positions:

- the certainty Ĵ (and the prioritised weight w = Ĵ^β_c) at decisive and at other positions,
  Δ = mean Ĵ(decisive) − mean Ĵ(other) per problem, with a bootstrap 95% interval;
- how often a wrong answer follows the different choice, by quartile of the certainty: if the
  uncertain positions are the decisive ones, the prioritised KL frees exactly those.

Certainty is :func:`tether.objectives.common.certainty` in the entropy form at T = 1, under both
normalisations (``vocabulary``: log V; ``typical``: κ × the mean entropy over the positions
scored, as the RL stage computes it per batch).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tether.eval.stats import bootstrap_ci, wilson_ci
from tether.generation.sampler import stop_token_ids
from tether.models.loading import model_device
from tether.objectives.common import certainty, uncertainty
from tether.tasks.base import Task

NORMALIZATIONS = ("vocabulary", "typical")


@dataclass
class Branch:
    """One position of a correct greedy answer: its token, the model's certainty there, and
    whether swapping the token for the second choice (then greedy) gives a wrong answer."""

    problem: int
    offset: int
    token: str
    alternative: str
    entropy: float
    certainty: dict[str, float]
    wrong_after_swap: bool


def _greedy(
    model: Any, rows: list[list[int]], max_new_tokens: int, pad_id: int, eos_ids: list[int]
) -> list[list[int]]:
    """Greedy continuations of token rows (left-padded batch), EOS kept, nothing after it."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    device = model_device(model)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
    )[:, width:]
    result = []
    for row in out.tolist():
        kept = []
        for t in row:
            kept.append(t)
            if t in eos_ids:
                break
        result.append(kept)
    return result


def decisive_positions(
    model: Any,
    tokenizer: Any,
    task: Task,
    problems: Sequence[Any],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[list[bool], list[Branch]]:
    """Greedy answers to ``problems`` (prompts through :meth:`Task.model_input`) judged by the
    task, and one :class:`Branch` per position of every correct answer (its EOS included).
    Returns (correct per problem, branches)."""
    budget = max_new_tokens or task.max_new_tokens()
    stops = stop_token_ids(tokenizer, model)
    if stops is None:
        raise ValueError(
            "decisive positions need an end-of-sequence token (the tokenizer has none)"
        )
    eos_ids = stops.tolist()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    prompts = [
        tokenizer(task.model_input(tokenizer, p), add_special_tokens=False)["input_ids"]
        for p in problems
    ]
    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        answers += _greedy(model, prompts[start : start + batch_size], budget, pad_id, eos_ids)
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    correct = [bool(task.is_correct(p, t)) for p, t in zip(problems, texts, strict=True)]

    branches: list[Branch] = []
    chosen = [i for i, ok in enumerate(correct) if ok]
    for i in tqdm(chosen, desc="branches", disable=not progress, leave=False):
        prompt, answer = prompts[i], answers[i]
        with torch.inference_mode():
            ids = torch.tensor([prompt + answer], device=model_device(model))
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) + len(answer) - 1]
        logits = logits.float()
        top2 = logits.topk(2, dim=-1).indices  # [L, 2]
        u = uncertainty(logits, "entropy", 1.0)
        certain = {
            "vocabulary": certainty(logits, "entropy", 1.0, "vocabulary"),
            "typical": certainty(logits, "entropy", 1.0, "typical", typical=None),
        }
        rows, alternatives = [], []
        for j in range(len(answer)):
            alt = int(top2[j, 1] if int(top2[j, 0]) == answer[j] else top2[j, 0])
            alternatives.append(alt)
            rows.append(prompt + answer[:j] + [alt])
        continued: list[list[int]] = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            left = [max(budget - (len(r) - len(prompt)), 0) for r in chunk]
            if max(left) == 0:
                continued += [[] for _ in chunk]
                continue
            continued += _greedy(model, chunk, max(left), pad_id, eos_ids)
        for j, alt in enumerate(alternatives):
            if alt in eos_ids:
                tail: list[int] = []
            else:
                tail = continued[j][: max(budget - j - 1, 0)]
            text = tokenizer.decode(answer[:j] + [alt] + tail, skip_special_tokens=True)
            branches.append(
                Branch(
                    problem=i,
                    offset=j,
                    token=tokenizer.decode([answer[j]]),
                    alternative=tokenizer.decode([alt]),
                    entropy=float(u[j]),
                    certainty={k: float(v[j]) for k, v in certain.items()},
                    wrong_after_swap=not task.is_correct(problems[i], text),
                )
            )
    return correct, branches


def summarise_decisive(
    correct: Sequence[bool], branches: Sequence[Branch], exponent: float = 150.0, seed: int = 0
) -> dict[str, Any]:
    """The figures of the module docstring from :func:`decisive_positions`' output."""
    n = len(correct)
    n_correct = int(sum(correct))
    lo, hi = wilson_ci(n_correct, n)
    result: dict[str, Any] = {
        "n": n,
        "greedy_accuracy": n_correct / n if n else float("nan"),
        "greedy_accuracy_ci": [lo, hi],
        "positions": len(branches),
        "decisive": int(sum(b.wrong_after_swap for b in branches)),
        "exponent": exponent,
    }
    if not branches:
        return result
    share = result["decisive"] / len(branches)
    result["decisive_share"] = share
    result["decisive_share_ci"] = list(wilson_ci(result["decisive"], len(branches)))
    by_problem: dict[int, list[Branch]] = {}
    for b in branches:
        by_problem.setdefault(b.problem, []).append(b)
    forms: dict[str, Any] = {}
    for norm in NORMALIZATIONS:
        deltas, w_dec, w_other, c_dec, c_other = [], [], [], [], []
        for rows in by_problem.values():
            dec = [b.certainty[norm] for b in rows if b.wrong_after_swap]
            other = [b.certainty[norm] for b in rows if not b.wrong_after_swap]
            if dec and other:
                deltas.append(float(np.mean(dec)) - float(np.mean(other)))
            c_dec += dec
            c_other += other
            w_dec += [c**exponent for c in dec]
            w_other += [c**exponent for c in other]
        entry: dict[str, Any] = {
            "certainty_decisive": _mean(c_dec),
            "certainty_other": _mean(c_other),
            "weight_decisive": _mean(w_dec),
            "weight_other": _mean(w_other),
            "problems_with_both": len(deltas),
        }
        if deltas:
            d_lo, d_hi = bootstrap_ci(np.array(deltas), seed=seed)
            entry |= {"delta_mean": float(np.mean(deltas)), "delta_ci": [d_lo, d_hi]}
        forms[norm] = entry
    result["forms"] = forms
    # P(wrong after the swap) by quartile of the certainty (vocabulary form; the typical one
    # ranks the positions the same way within a batch)
    values = np.array([b.certainty["vocabulary"] for b in branches])
    edges = np.quantile(values, [0.25, 0.5, 0.75])
    bins = np.digitize(values, edges)
    quartiles = []
    for q in range(4):
        members = [b for b, k in zip(branches, bins, strict=True) if k == q]
        wrong = sum(b.wrong_after_swap for b in members)
        q_lo, q_hi = wilson_ci(wrong, len(members)) if members else (float("nan"),) * 2
        quartiles.append(
            {
                "quartile": q + 1,
                "certainty_low": float(min(b.certainty["vocabulary"] for b in members))
                if members
                else float("nan"),
                "certainty_high": float(max(b.certainty["vocabulary"] for b in members))
                if members
                else float("nan"),
                "positions": len(members),
                "wrong_after_swap": wrong / len(members) if members else float("nan"),
                "ci": [q_lo, q_hi],
            }
        )
    result["quartiles"] = quartiles
    kinds = Counter(_kind(b.token) for b in branches if b.wrong_after_swap)
    all_kinds = Counter(_kind(b.token) for b in branches)
    result["decisive_by_kind"] = {
        k: {"decisive": kinds.get(k, 0), "positions": all_kinds[k]} for k in sorted(all_kinds)
    }
    return result


def _kind(token: str) -> str:
    """A position's token as a kind: a digit, the end of the answer, or other text."""
    stripped = token.strip()
    if stripped.isdigit():
        return "digit"
    if stripped == "":
        return "space or end"
    return "other"


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def decisive_table(result: dict[str, Any]) -> str:
    """Markdown: greedy accuracy, the decisive share, certainty and weight at decisive and
    other positions with Δ's interval (per normalisation), and P(wrong after a swap) by
    certainty quartile."""
    lo, hi = result["greedy_accuracy_ci"]
    lines = [
        f"Greedy accuracy {100 * result['greedy_accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
        f"on {result['n']} problems; {result['positions']} positions of correct answers, "
        f"{result['decisive']} decisive (a swap to the second choice makes the answer wrong)",
        "",
    ]
    if "forms" not in result:
        return "\n".join(lines) + "\n"
    b = result["exponent"]
    lines += [
        f"| normalisation | Ĵ decisive | Ĵ other | Δ decisive − other [95% CI] "
        f"| w = Ĵ^{b:g} decisive | w other | problems |",
        "|---|---|---|---|---|---|---|",
    ]
    for norm, f in result["forms"].items():
        delta = (
            f"{f['delta_mean']:+.3f} [{f['delta_ci'][0]:+.3f}, {f['delta_ci'][1]:+.3f}]"
            if "delta_mean" in f
            else "–"
        )
        lines.append(
            f"| {norm} | {f['certainty_decisive']:.3f} | {f['certainty_other']:.3f} | {delta} "
            f"| {f['weight_decisive']:.3f} | {f['weight_other']:.3f} | {f['problems_with_both']} |"
        )
    lines += [
        "",
        "| certainty quartile (vocabulary) | Ĵ range | positions | wrong after a swap [95% CI] |",
        "|---|---|---|---|",
    ]
    for q in result["quartiles"]:
        lines.append(
            f"| {q['quartile']} | {q['certainty_low']:.3f}–{q['certainty_high']:.3f} "
            f"| {q['positions']} | {100 * q['wrong_after_swap']:.1f}% "
            f"[{100 * q['ci'][0]:.1f}, {100 * q['ci'][1]:.1f}] |"
        )
    lines += ["", "| token kind | decisive / positions |", "|---|---|"]
    for kind, c in result["decisive_by_kind"].items():
        lines.append(f"| {kind} | {c['decisive']} / {c['positions']} |")
    return "\n".join(lines) + "\n"
