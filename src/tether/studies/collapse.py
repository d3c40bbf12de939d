"""``tether study collapse``: distribution collapse on the enumerable task (docs/methods.md §2, §5).

Korbak, Perez and Buckley (2022) read KL-regularised RL as Bayesian inference toward
p* ∝ π_ref·exp(r/β) and predict: pure reward maximisation collapses (entropy → 0, all mass on
the best answers), KL-RL reaches p* from the mode-seeking side (it minimises KL(π‖p*)), and
distribution matching (DPG: KL(p*‖π); f-DPG with Jensen–Shannon) from the mass-covering side.

On the enumerable task every figure is exact. The study trains a reference
(recipe ``enumerable-reference``), then one ``train.stage: dpg`` run per arm from it:

- ``RL, no KL``: the reverse-KL stage at β = 0.002, i.e. E[r] − 0.002·KL, reward maximisation
  in all but name (β = 0 itself has no target);
- ``KL-RL β``: the reverse-KL stage (= KL-RL, tests/test_dpg_stage.py) at β ∈ {0.03, 0.1, 0.3};
- ``DPG``: forward KL at β = 0.1; ``f-DPG JS``: Jensen–Shannon at β = 0.1.

Every arm is judged against the *same* target, p* at β = 0.1, at every checkpoint: exact
KL(p*‖π), KL(π‖p*), entropy, E_π[r] and π(best answers). Every arm uses the recipe's optimiser
(Adam, lr 0.003): the reverse-KL gradient is (1/β)·∇J, but Adam's step does not depend on the
gradient's scale, so one learning rate serves every β.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tether.config import Recipe, load_recipe
from tether.distributions.enumeration import ExactTarget, exact_figures, exact_space
from tether.engine.checkpoints import step_checkpoints
from tether.models.loading import load_model_and_tokenizer
from tether.studies.common import finished, refuse_controlled_keys, stem, train_once
from tether.tasks import task_from_config

TARGET_BETA = 0.1


def _kl_rl(beta: float) -> list[str]:
    return ["dpg.divergence=reverse_kl", f"dpg.beta={beta}"]


COLLAPSE_ARMS: dict[str, list[str]] = {
    "RL, no KL (β=0.002)": _kl_rl(0.002),
    "KL-RL β=0.03": _kl_rl(0.03),
    "KL-RL β=0.1": _kl_rl(0.1),
    "KL-RL β=0.3": _kl_rl(0.3),
    "DPG β=0.1": ["dpg.divergence=forward_kl", f"dpg.beta={TARGET_BETA}"],
    "f-DPG JS β=0.1": ["dpg.divergence=js", f"dpg.beta={TARGET_BETA}"],
}
_PER_ARM = "sets it per arm (the divergence and β of each); it cannot be overridden"
# keys the study sets per arm: a --set of them would break the comparison
CONTROLLED = {
    "seed": "sets every run's seed; use --seed",
    "train.steps": "sets the steps of every arm; use --steps",
    "train.eval_every": "evaluates every checkpoint; use --eval-every",
    "train.checkpoint_every": "evaluates every checkpoint; use --eval-every",
    "train.keep_checkpoints": "keeps every checkpoint (each is a point of the curves)",
    "model.init": "trains its own reference (OUT/reference) and starts every arm from it",
    "dpg.divergence": _PER_ARM,
    "dpg.beta": _PER_ARM,
}


def curve(run: Path, reference: Path, beta: float = TARGET_BETA) -> list[dict[str, float]]:
    """Exact figures against p* (at ``beta``, from ``reference``) of the reference (step 0), of
    every checkpoint of ``run`` and of its final model."""
    recipe = load_recipe(run / "config.yaml")
    ref_model, tokenizer = load_model_and_tokenizer(str(reference))
    space = exact_space(task_from_config(recipe.task, recipe.seed), tokenizer)
    target = ExactTarget.build(space, space.distribution(ref_model.eval()).log_probs, beta)
    rows = [{"step": 0, **exact_figures(target.log_ref, space, target)}]
    points = step_checkpoints(run)
    if not points or points[-1][0] < recipe.train.steps:  # the final model
        points.append((recipe.train.steps, run / "model"))
    for step, path in points:
        model, _ = load_model_and_tokenizer(str(path))
        rows.append(
            {
                "step": step,
                **exact_figures(space.distribution(model.eval()).log_probs, space, target),
            }
        )
    return rows


def run_collapse_study(
    out: Path,
    steps: int = 300,
    eval_every: int = 25,
    seed: int = 0,
    overrides: list[str] | None = None,
    progress: bool = True,
    echo: Any = print,
) -> Path:
    """Train the reference and every arm (reusing finished runs), evaluate every checkpoint
    exactly, write ``out/report.md`` with ``collapse.png``."""
    overrides = list(overrides or [])
    refuse_controlled_keys(overrides, CONTROLLED, "tether study collapse")
    ref_run = out / "reference"

    def arm_recipe(arm_overrides: list[str]) -> Recipe:
        return load_recipe(
            "dpg-enumerable",
            [
                f"seed={seed}",
                f"model.init={ref_run / 'model'}",
                f"train.steps={steps}",
                f"train.eval_every={eval_every}",
                f"train.checkpoint_every={eval_every}",
                "train.keep_checkpoints=null",
                *overrides,
                *arm_overrides,
            ],
        )

    recipes = {arm: arm_recipe(extra) for arm, extra in COLLAPSE_ARMS.items()}  # checked first
    t0 = time.perf_counter()
    if not finished(ref_run):
        echo(f"[{time.perf_counter() - t0:6.0f}s] collapse: the reference")
    train_once(load_recipe("enumerable-reference", [f"seed={seed}"]), ref_run, progress)
    curves: dict[str, list[dict[str, float]]] = {}
    for arm, recipe in recipes.items():
        run = out / stem(arm)
        if not finished(run):
            echo(f"[{time.perf_counter() - t0:6.0f}s] collapse: {arm}")
        train_once(recipe, run, progress)  # a finished run: checked, then reused
        curves[arm] = curve(run, ref_run / "model")
    report = write_collapse_report(out, curves, steps)
    echo(f"[{time.perf_counter() - t0:6.0f}s] collapse: report in {report}")
    return report


def target_figures(reference: Path, beta: float = TARGET_BETA) -> dict[str, float]:
    """The target p* itself, judged like a policy (its KLs to itself are 0)."""
    ref_model, tokenizer = load_model_and_tokenizer(str(reference))
    recipe = load_recipe("dpg-enumerable", [f"model.init={reference}"])
    space = exact_space(task_from_config(recipe.task, recipe.seed), tokenizer)
    target = ExactTarget.build(space, space.distribution(ref_model.eval()).log_probs, beta)
    return exact_figures(target.log_target, space, target)


def plot_collapse(
    curves: dict[str, list[dict[str, float]]], target: dict[str, float], path: Path
) -> Path:
    titles = {
        "kl_target_policy": "KL(p*‖π) (what DPG minimises)",
        "kl_policy_target": "KL(π‖p*) (what KL-RL minimises)",
        "entropy": "entropy H(π), nats",
        "reward": "E_π[r]",
    }
    fig = Figure(figsize=(10.0, 7.0))
    FigureCanvasAgg(fig)
    for i, (key, title) in enumerate(titles.items()):
        ax = fig.add_subplot(2, 2, i + 1)
        for arm, rows in curves.items():
            ax.plot([r["step"] for r in rows], [r.get(key, float("nan")) for r in rows], label=arm)
        if key in ("entropy", "reward"):
            ax.axhline(target[key], color="black", linestyle="--", linewidth=1, label="p*")
        if key.startswith("kl"):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_collapse_report(out: Path, curves: dict[str, list[dict[str, float]]], steps: int) -> Path:
    target = target_figures(out / "reference" / "model")
    start = next(iter(curves.values()))[0]
    lines = [
        "# Distribution collapse on the enumerable task",
        "",
        f"Every figure is exact (341 responses enumerated). Target p* ∝ π_ref·exp(r/β) with "
        f"β = {TARGET_BETA}: entropy {target['entropy']:.3f} nats, E[r] {target['reward']:.3f}, "
        f"mass on the best answers {target['accuracy']:.3f}. The reference: entropy "
        f"{start['entropy']:.3f}, E[r] {start['reward']:.3f}, best answers {start['accuracy']:.3f}, "
        f"KL(p*‖π_ref) {start['kl_target_policy']:.3f}. {steps} steps of 64 samples per arm; "
        "final figures, all against the same p*:",
        "",
        "| arm | KL(p*‖π) | KL(π‖p*) | entropy | E_π[r] | π(best) | KL(π‖π_ref) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, rows in curves.items():
        last = rows[-1]
        kl_tp = last.get("kl_target_policy", float("inf"))
        lines.append(
            f"| {arm} | {kl_tp:.3f} | {last['kl_policy_target']:.3f} | {last['entropy']:.3f} | "
            f"{last['reward']:.3f} | {last['accuracy']:.3f} | {last['kl_policy_ref']:.3f} |"
        )
    lines += ["", "![collapse](collapse.png)", ""]
    plot_collapse(curves, target, out / "collapse.png")
    (out / "results.json").write_text(
        json.dumps({"target": target, "curves": curves}, indent=1) + "\n"
    )
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
