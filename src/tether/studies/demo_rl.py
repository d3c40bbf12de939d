"""``tether study demo-rl``: demonstration-regularised RL on the enumerable task (docs/methods.md §6).

Tiapkin et al. (2023) clone N_E expert demonstrations with a support-preserving smoothing, then
run KL-regularised RL toward the clone (π_ref := π_BC), and show that the best KL strength grows
with N_E (λ ≈ ε·N_E / poly): the more demonstrations, the closer the clone is to the expert and
the less a tight tether costs, while it still saves the RL from its own noise.

The study runs that recipe over a grid, every figure exact (341 responses enumerated):

1. behaviour cloning (recipe ``demo-bc-enumerable``): label-smoothed MLE (ε = ``smoothing``) of
   a fresh tiny model on N_E demonstrations of the task's expert (``task.demonstrations:
   expert``; ``task.expert_share`` s: a best answer with probability s, else a uniform answer),
   one clone per N_E, expert share and seed (the seed also draws the demonstrations);
2. KL-RL from the clone toward it (recipe ``demo-rl-enumerable``: ``train.stage: dpg`` with
   ``dpg.divergence: reverse_kl``, which is KL-RL with kl_coef β), one run per β and RL seed,
   with a deliberately small budget (``rl_steps`` steps of ``samples`` samples): with unlimited
   exact RL the smallest β always wins on reward, and the tether only pays off against noise;
3. the final policy judged exactly: E_π[r], entropy, KL(π‖π_BC), π(best answers); the clone
   judged against the expert: KL(expert‖π_BC), its own E[r].

For each N_E the report names the β with the best mean final E[r] (over seeds × RL seeds) and
whether that best β grows with N_E. Two expert shares by default: 0.9 (near the theory's
optimal expert) and 0.6 (far from it: the tether is then a bias no N_E removes).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tether.config import Recipe, RecipeError, load_recipe
from tether.distributions.enumeration import ExactSpace, ExactTarget, exact_figures, exact_space
from tether.models.loading import load_model_and_tokenizer
from tether.studies.common import finished, refuse_controlled_keys, train_once
from tether.tasks import get_task
from tether.tasks.enumerable import expert_distribution, expert_reward, space_size

NUM_DEMOS = (8, 32, 128, 512)
BETAS = (0.01, 0.03, 0.1, 0.3, 1.0)
EXPERT_SHARES = (0.9, 0.6)
SMOOTHING = 0.05
BC_STEPS = 200
RL_STEPS = 40
RL_SAMPLES = 4  # per step: 160 samples in all, the "limited budget"
RL_LR = 1e-3


@dataclass(frozen=True)
class Grid:
    """What the study sweeps and how much each run trains."""

    num_demos: tuple[int, ...] = NUM_DEMOS
    betas: tuple[float, ...] = BETAS
    expert_shares: tuple[float, ...] = EXPERT_SHARES
    seeds: int = 4  # demonstration draws (one clone each)
    rl_seeds: int = 3  # KL-RL runs per clone and β
    smoothing: float = SMOOTHING
    bc_steps: int = BC_STEPS
    rl_steps: int = RL_STEPS
    samples: int = RL_SAMPLES
    rl_lr: float = RL_LR


def bc_recipe(grid: Grid, n_demos: int, share: float, seed: int, overrides: list[str]) -> Recipe:
    """Stage 1: label-smoothed MLE on ``n_demos`` demonstrations of the expert at ``share``."""
    return load_recipe(
        "demo-bc-enumerable",
        [
            f"seed={seed}",
            f"task.train_size={n_demos}",
            f"task.expert_share={share}",
            f"imitation.label_smoothing={grid.smoothing}",
            f"train.steps={grid.bc_steps}",
            f"train.eval_every={grid.bc_steps}",
            *overrides,
        ],
    )


def rl_recipe(grid: Grid, clone: Path, beta: float, seed: int, overrides: list[str]) -> Recipe:
    """Stage 2: KL-RL (reverse-KL DPG) from the clone at ``clone``, toward it, at KL coefficient
    ``beta``, on the study's limited budget."""
    return load_recipe(
        "demo-rl-enumerable",
        [
            f"seed={seed}",
            f"model.init={clone}",
            f"dpg.beta={beta}",
            f"dpg.samples_per_step={grid.samples}",
            f"optim.lr={grid.rl_lr}",
            f"train.steps={grid.rl_steps}",
            f"train.eval_every={grid.rl_steps}",
            *overrides,
        ],
    )


# keys the study sets per run: a --set of them would break the sweep
CONTROLLED = {
    "seed": "sets each run's seed; use --seeds and --rl-seeds",
    "train.steps": "sets the steps of each stage; use --bc-steps and --rl-steps",
    "task.train_size": "sweeps the number of demonstrations; use --num-demos",
    "task.expert_share": "sweeps it; use --expert-shares",
    "imitation.label_smoothing": "sets the cloning's smoothing; use --smoothing",
    "dpg.beta": "sweeps it; use --betas",
    "dpg.samples_per_step": "sets the KL-RL samples per step; use --samples",
    "model.init": "starts each KL-RL run from its own clone",
}


def check_grid(grid: Grid, overrides: list[str]) -> None:
    """Validate every recipe the study will train before anything runs (one-line RecipeError)."""
    refuse_controlled_keys(overrides, CONTROLLED, "tether study demo-rl")
    if not (grid.num_demos and grid.betas and grid.expert_shares):
        raise RecipeError("study demo-rl: give at least one N_E, one β and one expert share")
    for share in grid.expert_shares:
        for n in grid.num_demos:
            bc_recipe(grid, n, share, 0, overrides)
    for beta in grid.betas:
        rl_recipe(grid, Path("clone"), beta, 0, overrides)


def clone_folder(out: Path, share: float, n_demos: int, seed: int) -> Path:
    return out / f"share-{share:g}" / f"n{n_demos}-s{seed}"


def judge_clone(
    clone: Path, max_digits: int, share: float
) -> tuple[ExactSpace, Any, dict[str, float]]:
    """The clone's exact figures (E[r], entropy, π(best)) and KL(expert‖π_BC); with the space
    and the clone's log-probs, which every RL run from it is judged against."""
    model, tokenizer = load_model_and_tokenizer(str(clone))
    space = exact_space(get_task("enumerable", max_digits), tokenizer)
    log_bc = space.distribution(model.eval()).log_probs.double()
    figures = exact_figures(log_bc, space, ExactTarget.build(space, log_bc, 1.0))
    expert = expert_distribution(max_digits, share)
    # the expert's answers all stop (≤ N digits), so the text names the response
    kl_expert = sum(
        p * (math.log(p) - float(log_bc[i]))
        for i, text in enumerate(space.texts)
        if len(text) <= max_digits and (p := expert.get(text, 0.0)) > 0
    )
    return (
        space,
        log_bc,
        {
            "reward": figures["reward"],
            "entropy": figures["entropy"],
            "accuracy": figures["accuracy"],
            "kl_expert_clone": kl_expert,
        },
    )


def judge_policy(run: Path, space: ExactSpace, log_bc: Any, beta: float) -> dict[str, float]:
    """The final policy of a KL-RL run, exactly: E[r], entropy, π(best), KL(π‖π_BC), J."""
    model, _ = load_model_and_tokenizer(str(run / "model"))
    log_pi = space.distribution(model.eval()).log_probs
    figures = exact_figures(log_pi, space, ExactTarget.build(space, log_bc, beta))
    keys = ("reward", "entropy", "accuracy", "kl_policy_ref", "objective")
    return {k: figures[k] for k in keys if k in figures}


def run_demo_rl_study(
    out: Path,
    grid: Grid = Grid(),
    overrides: list[str] | None = None,
    progress: bool = True,
    echo: Any = print,
) -> Path:
    """Train every clone and every KL-RL run of the grid (reusing finished runs), judge each
    final policy exactly, write ``out/report.md`` with ``demo_rl.png`` and ``results.json``."""
    overrides = list(overrides or [])
    check_grid(grid, overrides)
    t0 = time.perf_counter()
    first = bc_recipe(grid, grid.num_demos[0], grid.expert_shares[0], 0, overrides)
    max_digits = first.task.max_digits
    clones: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for share in grid.expert_shares:
        for n in grid.num_demos:
            for seed in range(grid.seeds):
                folder = clone_folder(out, share, n, seed)
                recipe = bc_recipe(grid, n, share, seed, overrides)
                if not finished(folder / "bc"):
                    echo(
                        f"[{time.perf_counter() - t0:6.0f}s] demo-rl: clone, share {share:g}, "
                        f"N_E {n}, seed {seed}"
                    )
                train_once(recipe, folder / "bc", progress)  # finished: checked, then reused
                space, log_bc, figures = judge_clone(
                    folder / "bc" / "model", recipe.task.max_digits, share
                )
                clones.append({"share": share, "n_demos": n, "seed": seed, **figures})
                for beta in grid.betas:
                    for r in range(grid.rl_seeds):
                        run = folder / f"rl-b{beta:g}-r{r}"
                        rl_seed = 1000 * (r + 1) + seed  # its own stream, not the clone's
                        rl = rl_recipe(grid, folder / "bc" / "model", beta, rl_seed, overrides)
                        train_once(rl, run, progress)  # finished: checked, then reused
                        runs.append(
                            {
                                "share": share,
                                "n_demos": n,
                                "seed": seed,
                                "rl_seed": r,
                                "beta": beta,
                                **judge_policy(run, space, log_bc, beta),
                            }
                        )
    seconds = time.perf_counter() - t0
    report = write_demo_rl_report(out, grid, clones, runs, seconds, max_digits)
    echo(f"[{seconds:6.0f}s] demo-rl: report in {report}")
    return report


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def summarise(
    grid: Grid, clones: list[dict[str, Any]], runs: list[dict[str, Any]]
) -> dict[str, dict[int, dict[str, Any]]]:
    """Per expert share and N_E: the clone's mean figures, mean ± s.e. of each final figure at
    each β, the best β (highest mean E[r]) and the β within one s.e. of it."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for share in grid.expert_shares:
        per_n: dict[int, dict[str, Any]] = {}
        for n in grid.num_demos:
            mine = [c for c in clones if c["share"] == share and c["n_demos"] == n]
            row: dict[str, Any] = {
                "clone": {
                    k: statistics.fmean(c[k] for c in mine)
                    for k in ("reward", "entropy", "accuracy", "kl_expert_clone")
                },
                "beta": {},
            }
            for beta in grid.betas:
                cell = [x for x in runs if x["share"] == share and x["n_demos"] == n]
                cell = [x for x in cell if x["beta"] == beta]
                row["beta"][beta] = {
                    k: _mean_se([x[k] for x in cell])
                    for k in ("reward", "entropy", "kl_policy_ref", "accuracy")
                }
            rewards = {b: row["beta"][b]["reward"] for b in grid.betas}
            best = max(grid.betas, key=lambda b: rewards[b][0])
            floor = rewards[best][0] - rewards[best][1]
            row["best_beta"] = best
            row["near_best"] = [b for b in grid.betas if rewards[b][0] >= floor]
            per_n[n] = row
        out[f"{share:g}"] = per_n
    return out


def _grows(best: list[float]) -> str:
    if len(best) < 2:
        return "one N_E only: no trend to read"
    if all(a <= b for a, b in zip(best, best[1:], strict=False)):
        return "yes (non-decreasing)" if best[0] < best[-1] else "flat (the same β throughout)"
    if best[-1] > best[0]:
        return "larger at the largest N_E than at the smallest, but not monotone"
    return "no"


def plot_demo_rl(grid: Grid, summary: dict[str, dict[int, dict[str, Any]]], path: Path) -> Path:
    shares = list(summary)
    fig = Figure(figsize=(5.0 * len(shares), 4.0))
    FigureCanvasAgg(fig)
    for i, share in enumerate(shares):
        ax = fig.add_subplot(1, len(shares), i + 1)
        for n, row in summary[share].items():
            means = [row["beta"][b]["reward"][0] for b in grid.betas]
            ses = [row["beta"][b]["reward"][1] for b in grid.betas]
            line = ax.errorbar(grid.betas, means, yerr=ses, marker="o", capsize=2, label=f"N_E={n}")
            color = line[0].get_color()
            ax.axhline(row["clone"]["reward"], color=color, linestyle=":", linewidth=1)
            best = row["best_beta"]
            ax.plot([best], [row["beta"][best]["reward"][0]], marker="*", color=color, ms=14)
        ax.set_xscale("log")
        ax.set_xlabel("β (KL coefficient toward the clone)")
        ax.set_ylabel("final E_π[r] (exact)")
        ax.set_title(f"expert share {share} (dotted: the clone; ★ best β)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_demo_rl_report(
    out: Path,
    grid: Grid,
    clones: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    seconds: float,
    max_digits: int = 3,
) -> Path:
    summary = summarise(grid, clones, runs)
    per_cell = grid.seeds * grid.rl_seeds
    lines = [
        "# Demonstration-regularised RL on the enumerable task",
        "",
        f"Behaviour cloning: label-smoothed MLE (ε = {grid.smoothing}) of a fresh tiny model, "
        f"{grid.bc_steps} steps, on N_E demonstrations of the expert (a best answer with "
        "probability s, else a uniform answer). Then KL-RL toward the clone (reverse-KL DPG = "
        f"KL-RL with coefficient β), {grid.rl_steps} steps of {grid.samples} samples at lr "
        f"{grid.rl_lr:g} (Adam): a limited budget. Every figure exact "
        f"({space_size(max_digits)} responses). Each cell "
        f"is the mean ± s.e. of the final E_π[r] over {grid.seeds} demonstration draws × "
        f"{grid.rl_seeds} RL seeds ({per_cell} runs). Study time {seconds:.0f} s.",
        "",
    ]
    for share, per_n in summary.items():
        s = float(share)
        lines += [
            f"## Expert share {share} (expert E[r] = {expert_reward(max_digits, s):.3f})",
            "",
            "| N_E | KL(expert‖π_BC) | clone E[r] | "
            + " | ".join(f"β={b:g}" for b in grid.betas)
            + " | best β | within 1 s.e. |",
            "|---" * (len(grid.betas) + 5) + "|",
        ]
        for n, row in per_n.items():
            cells = []
            for b in grid.betas:
                m, se = row["beta"][b]["reward"]
                text = f"{m:.3f} ± {se:.3f}"
                cells.append(f"**{text}**" if b == row["best_beta"] else text)
            lines.append(
                f"| {n} | {row['clone']['kl_expert_clone']:.3f} | {row['clone']['reward']:.3f} | "
                + " | ".join(cells)
                + f" | {row['best_beta']:g} | {', '.join(f'{b:g}' for b in row['near_best'])} |"
            )
        lines += [
            "",
            "KL(π‖π_BC) / entropy of the final policy (means):",
            "",
            "| N_E | clone entropy | " + " | ".join(f"β={b:g}" for b in grid.betas) + " |",
            "|---" * (len(grid.betas) + 2) + "|",
        ]
        for n, row in per_n.items():
            cells = [
                f"{row['beta'][b]['kl_policy_ref'][0]:.2f} / {row['beta'][b]['entropy'][0]:.2f}"
                for b in grid.betas
            ]
            lines.append(f"| {n} | {row['clone']['entropy']:.2f} | " + " | ".join(cells) + " |")
        best = [per_n[n]["best_beta"] for n in per_n]
        lines += [
            "",
            f"Best β by N_E: {', '.join(f'{n}: {b:g}' for n, b in zip(per_n, best, strict=True))}"
            f". Does the best β grow with N_E (the theory's prediction)? {_grows(best)}.",
            "",
        ]
    lines += ["![demo-rl](demo_rl.png)", ""]
    plot_demo_rl(grid, summary, out / "demo_rl.png")
    (out / "results.json").write_text(
        json.dumps(
            {
                "grid": {k: getattr(grid, k) for k in grid.__dataclass_fields__},
                "clones": clones,
                "runs": runs,
                "summary": summary,
                "seconds": seconds,
            },
            indent=1,
        )
        + "\n"
    )
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
