"""``tether study imitation``: MLE vs MLE + entropy vs IQLearn (offline, a λ sweep, and online)
on the multistep-sums task, the CPU-scale version of Wulfmeier et al. 2024 (docs/methods.md §4).

Two parts, each over several training seeds, every arm from the packaged recipe
``imitation-multistep`` with overrides:

- ``tradeoff``: the full (generated, unlimited) data. Each final model is decoded over a sweep
  of temperatures on the same held-out prompts (accuracy and score against Self-BLEU, distinct-n
  and entropy), and its extracted reward is correlated with the task score (Spearman).
- ``small-data``: a fixed training set of ``task.train_size`` problems, where MLE overfits:
  accuracy and the expert's negative log-likelihood on the training pool and on held-out
  problems.

Finished runs (those with ``summary.json``) are not trained again, so an interrupted study
continues where it stopped. The report is ``OUT/PART/report.md`` with its figures.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from tether.batches import collate_pairs
from tether.config import load_recipe
from tether.eval.diversity import mean_distinct_n, mean_self_bleu
from tether.eval.during_training import task_accuracy
from tether.eval.imitation import (
    diversity_sweep,
    plot_reward_vs_score,
    plot_score_vs_diversity,
    reward_correlation,
    seeds_summary,
    seeds_table,
)
from tether.eval.stats import UNIT_INTERVAL
from tether.models.loading import load_model_and_tokenizer
from tether.objectives import mle_loss, shifted_token_logprobs
from tether.studies.common import (
    finished,
    interval_cell,
    refuse_controlled_keys,
    stem,
    train_once,
)
from tether.tasks import FixedPool, Task, get_task, task_from_config
from tether.tasks.multistep import expert_solution

RECIPE = "imitation-multistep"
IQ = ["train.stage=iqlearn"]
TRADEOFF_ARMS: dict[str, list[str]] = {
    "MLE": [],
    "MLE + entropy (0.1)": ["imitation.entropy_coef=0.1"],
    "IQLearn λ=0.1": [*IQ, "imitation.lam=0.1"],
    "IQLearn λ=1": [*IQ, "imitation.lam=1.0"],
    "IQLearn online (λ=0.1, α=0.1)": [*IQ, "imitation.lam=0.1", "imitation.online_fraction=0.1"],
}
SMALL_DATA_ARMS: dict[str, list[str]] = {
    "MLE": [],
    "IQLearn λ=0.1": [*IQ, "imitation.lam=0.1"],
}
PARTS = ("tradeoff", "small-data")
_PER_ARM = "sets it per arm (MLE, MLE + entropy, IQLearn); it cannot be overridden"
# keys the study sets per run or arm: a --set of them would break the comparison
CONTROLLED = {
    "seed": "sets each run's seed; use --seeds",
    "train.steps": "sets the steps of every run; use --steps",
    "task.train_size": "sets the small-data training set; use --train-size",
    "train.stage": _PER_ARM,
    "imitation.entropy_coef": _PER_ARM,
    "imitation.lam": _PER_ARM,
    "imitation.online_fraction": _PER_ARM,
}
TEMPERATURES = (0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def expert_nll(model: Any, tokenizer: Any, problems: list[Any], batch_size: int = 128) -> float:
    """Mean per-token negative log-likelihood of the expert's solutions (teacher forcing)."""
    total, tokens = 0.0, 0.0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        batch = collate_pairs(tokenizer, [p.prompt for p in chunk], [p.target for p in chunk])
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss, stats = mle_loss(shifted_token_logprobs(logits, batch.input_ids), batch.loss_mask)
        total += float(loss) * stats["tokens"]
        tokens += stats["tokens"]
    return total / tokens


def expert_diversity(n_prompts: int, k: int, max_digits: int) -> dict[str, float]:
    """Self-BLEU and distinct-2 of the expert itself: k fresh expert solutions of each
    held-out prompt (the diversity a perfect imitator would show at T = 1)."""
    task = get_task("multistep", max_digits)
    rng = random.Random("tether-study/heldout")
    problems = [task.rl_problem(rng) for _ in range(n_prompts)]
    solver = random.Random("tether-study/expert")
    groups = [[expert_solution(p.operands, solver) for _ in range(k)] for p in problems]
    return {"self_bleu": mean_self_bleu(groups), "distinct_2": mean_distinct_n(groups, 2)}


def evaluate_run(
    run: Path,
    task: Task,
    problems: list[Any],
    seed: int,
    temperatures: tuple[float, ...],
    k: int,
    pool: list[Any] | None,
) -> dict[str, Any]:
    """Sweep, reward correlation and (small data) train/held-out figures of a finished run."""
    model, tokenizer = load_model_and_tokenizer(str(run))
    recipe = load_recipe(run / "config.yaml")
    result: dict[str, Any] = {
        "sweep": diversity_sweep(
            model, tokenizer, task, problems, temperatures=list(temperatures), k=k, seed=seed
        ),
        "rewards": reward_correlation(
            model, tokenizer, task, problems, k=k, temperature=1.0, seed=seed
        ),
        "heldout_nll": expert_nll(model, tokenizer, problems),
        "heldout_accuracy": task_accuracy(model, tokenizer, task, problems, recipe)[0],
    }
    if pool is not None:
        result["train_nll"] = expert_nll(model, tokenizer, pool)
        result["train_accuracy"] = task_accuracy(model, tokenizer, task, pool, recipe)[0]
    (run / "imitation_eval.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_imitation_study(
    out: Path,
    parts: tuple[str, ...] = PARTS,
    seeds: int = 3,
    steps: int | None = None,
    train_size: int = 256,
    n_prompts: int = 64,
    k: int = 4,
    temperatures: tuple[float, ...] = TEMPERATURES,
    overrides: list[str] | None = None,
    progress: bool = True,
    echo: Any = print,
) -> list[Path]:
    """Train and evaluate every arm of each part over ``seeds`` seeds; returns the reports."""
    refuse_controlled_keys(overrides or [], CONTROLLED, "tether study imitation")
    t0 = time.perf_counter()
    reports = []
    for part in parts:
        arms = TRADEOFF_ARMS if part == "tradeoff" else SMALL_DATA_ARMS
        extra = [f"task.train_size={train_size}"] if part == "small-data" else []
        results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
        for seed in range(seeds):
            for arm, arm_overrides in arms.items():
                run = out / part / f"{stem(arm)}-seed{seed}"
                recipe = load_recipe(
                    RECIPE,
                    [
                        f"seed={seed}",
                        *([f"train.steps={steps}"] if steps else []),
                        *extra,
                        *(overrides or []),
                        *arm_overrides,
                    ],
                )
                if not finished(run):
                    echo(f"[{time.perf_counter() - t0:6.0f}s] {part}: {arm}, seed {seed}")
                train_once(recipe, run, progress)  # a finished run: checked, then reused
                cached = run / "imitation_eval.json"
                if cached.is_file():
                    results[arm].append(json.loads(cached.read_text()))
                    continue
                task = task_from_config(recipe.task.model_copy(update={"train_size": None}))
                rng = random.Random("tether-study/heldout")  # the same prompts for every run
                problems = [task.rl_problem(rng) for _ in range(n_prompts)]
                pool = None
                if part == "small-data":
                    pool_task = task_from_config(recipe.task, recipe.seed)
                    assert isinstance(pool_task, FixedPool)
                    pool = pool_task.problems[:n_prompts]
                results[arm].append(evaluate_run(run, task, problems, seed, temperatures, k, pool))
        expert = expert_diversity(n_prompts, k, recipe.task.max_digits)
        reports.append(write_report(out / part, part, results, steps, train_size, expert))
        echo(f"[{time.perf_counter() - t0:6.0f}s] {part}: report in {reports[-1]}")
    return reports


CORRELATION = (-1.0, 1.0)  # the range of Spearman's ρ


def write_report(
    folder: Path,
    part: str,
    results: dict[str, list[dict[str, Any]]],
    steps: int | None,
    train_size: int,
    expert: dict[str, float],
) -> Path:
    seeds = min(len(v) for v in results.values())
    sweeps = {arm: [r["sweep"] for r in runs] for arm, runs in results.items()}
    lines = [
        f"# Imitation study: {part}",
        "",
        f"Recipe `{RECIPE}`"
        + (f", {steps} steps" if steps else "")
        + (f", a fixed training set of {train_size} problems" if part == "small-data" else "")
        + f"; {seeds} seeds per arm; mean ± 95% t-interval across seeds ([low, high] where "
        "the interval is cut to the range of an accuracy or a correlation).",
        "",
        "## Held-out figures (greedy accuracy; expert NLL per token)",
        "",
    ]
    small = part == "small-data"
    header = "| arm | greedy accuracy | expert NLL |"
    if small:
        header += " train accuracy | train NLL |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for arm, runs in results.items():
        accuracy = [r["heldout_accuracy"] for r in runs]
        row = f"| {arm} | {interval_cell(accuracy, bounds=UNIT_INTERVAL)} | "
        row += f"{interval_cell([r['heldout_nll'] for r in runs])} |"
        if small:
            train_accuracy = [r["train_accuracy"] for r in runs]
            row += f" {interval_cell(train_accuracy, bounds=UNIT_INTERVAL)} |"
            row += f" {interval_cell([r['train_nll'] for r in runs])} |"
        lines.append(row)
    lines += [
        "",
        "## Task score against diversity over sampling temperatures",
        "",
        "Self-BLEU among k samples of a prompt (lower = more diverse). The expert itself "
        f"(k fresh solutions of each prompt): Self-BLEU {expert['self_bleu']:.1f}, "
        f"distinct-2 {expert['distinct_2']:.3f}.",
        "",
        seeds_table(sweeps),
        "",
        "![score vs diversity](score_vs_diversity.png)",
        "",
        "## Extracted reward against the task score (T = 1)",
        "",
        "Spearman ρ between each sample's return R = Σ r̂ and its graded score; 'within' "
        "centres both on each prompt's mean first.",
        "",
        "| arm | ρ | ρ within prompts |",
        "|---|---|---|",
    ]
    for arm, runs in results.items():
        rho = [r["rewards"]["spearman_rho"] for r in runs]
        within = [r["rewards"]["spearman_rho_within"] for r in runs]
        rho_cell = interval_cell(rho, bounds=CORRELATION)
        lines.append(f"| {arm} | {rho_cell} | {interval_cell(within, bounds=CORRELATION)} |")
    lines += ["", "![reward vs score](reward_vs_score.png)", ""]
    folder.mkdir(parents=True, exist_ok=True)
    curves = {arm: rows for arm, rows in seeds_summary(sweeps).items()}
    plot_score_vs_diversity(curves, folder / "score_vs_diversity.png", title=f"{part}")
    plot_reward_vs_score(
        {arm: runs[0]["rewards"] for arm, runs in results.items()},
        folder / "reward_vs_score.png",
        title=f"{part}, seed 0",
    )
    report = folder / "report.md"
    report.write_text("\n".join(lines))
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return report
