"""``tether demo``: the critical-token experiment at a small scale (docs/methods.md §3).

From the shipped pre-trained model, fine-tune on N+1-digit additions with the standard KL and
with the prioritised KL (w = Ĵ_ref^β_c) at the same KL coefficient, over several seeds, then
write a report comparing the two arms: accuracy on the N+1 RL distribution and on the 1..N
pre-training distribution over training, the critical-token probabilities, and the KL.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tether.config import Recipe, RecipeError, load_recipe
from tether.engine.process import prepare_process
from tether.engine.setup import usable_cores
from tether.eval.report import make_group_report, read_metrics
from tether.eval.stats import UNIT_INTERVAL, mean_ci, paired_difference_ci
from tether.studies.common import refuse_controlled_keys, train_once

REPORT_KEYS = (
    "eval/acc_rl",
    "eval/acc_pretrain",
    "eval/p_critical",
    "accuracy",
    "kl_sampled",
    "kl_weight_mean",
)
# the report keys whose values lie in [0, 1], so their intervals across seeds do too:
# accuracies, the probability of the critical tokens, and the mean KL weight w = Ĵ_ref^β_c
PROPORTIONS = (
    "eval/acc_rl",
    "eval/acc_pretrain",
    "eval/p_critical",
    "accuracy",
    "kl_weight_mean",
)

# the paper's sweep of the certainty exponent β_c: gains from 10 to 500, collapse at 10000
SWEEP_EXPONENTS = (10.0, 50.0, 150.0, 500.0, 1000.0, 10000.0)

# keys the demo sets per run or arm: a --set of them would break the comparison
CONTROLLED = {
    "seed": "sets each run's seed; use --seeds",
    "train.steps": "sets the steps of every run; use --steps",
    "rl.certainty_exponent": "sets it per arm (none for the standard KL); use "
    "--certainty-exponent or --sweep",
}

# The default is sized for a paired comparison whose 95% interval has a half-width of at most
# 5 points: the per-seed differences of 24 seeds of the collects below had an SD of 8.7
# points (16 seeds of 24 collects of 16: 11.0), and t(15) * 8.7 / sqrt(16) = 4.6. Each arm of a
# seed starts from the same model with the same prompt stream, sampling generator and held-out
# problems (200 N+1 and 200 1..N, greedy), so their difference removes what the seed shares.
# The starting model is evaluated once, on seed 0's problems (the first arm's run; every other
# run sets train.eval_at_start false): the paired differences use the finals only, and the
# start's 9 s per seed would add an eighth to a seed's cost. Each run: 12 collects of 32 episodes with 2 minibatch
# updates each, the same 24 updates of 16 episodes at the recipe's lr (1e-4) as 24 collects of
# 16, for 60% of the sampling time (a batch of 32 decodes in 1.2x the time of 16); two runs at
# once on one thread each (--jobs). --full is the closest CPU analogue of the paper's §5.3: 10
# seeds, 8 collects of 50 episodes (400) with 3 minibatch updates each, then the β_c sweep on
# the first SWEEP_SEEDS seeds (the standard and β_c = 150 runs reused).
SMALL = {
    "seeds": 16,
    "steps": 12,
    "eval_every": 12,
    "prompts_per_step": 32,
    "minibatches": 2,
    "eval_n": 200,
}
FULL = {
    "seeds": 10,
    "steps": 8,
    "eval_every": 4,
    "prompts_per_step": 50,
    "minibatches": 3,
    "eval_n": 200,
}
SWEEP_SEEDS = 5
# the recipe the sizes above are for; another RL recipe (--recipe) keeps its own sizes and
# runs OTHER_RECIPE_SEEDS seeds unless --seeds says otherwise
DEFAULT_RECIPE = "critical-tokens"
OTHER_RECIPE_SEEDS = 4


def run_demo(
    out: Path,
    full: bool = False,
    seeds: int | None = None,
    steps: int | None = None,
    certainty_exponent: float = 150.0,
    sweep: bool = False,
    overrides: list[str] | None = None,
    progress: bool = True,
    echo: Any = print,
    recipe: str = DEFAULT_RECIPE,
    jobs: int | None = None,
    control_kl_coef: float | None = None,
) -> Path:
    """Run the standard arm and the prioritised arm over the seeds into ``out`` and write the
    report (``report/``: curves, finals, and the per-seed paired differences); returns the
    report's markdown path. ``sweep`` runs one arm per β_c in :data:`SWEEP_EXPONENTS` instead
    (at least :data:`SWEEP_SEEDS` seeds); ``full`` runs the larger setting and then the sweep
    too (``report-sweep/``). ``overrides`` (``a.b=value``) apply to every arm. ``recipe`` is
    the standard arm (any RL recipe: a shipped name or a file); the demo's own sizes
    (:data:`SMALL`, :data:`FULL`) apply to the default recipe only, another one keeps its own
    steps, batch and evaluation. ``jobs`` runs that many runs at once, each on its share of
    the CPU threads (None: two on the default recipe where there are two cores, whose
    0.6M-parameter model leaves a second core idle in its small matmuls; one otherwise).
    ``control_kl_coef`` adds a third arm to the comparison (not to the sweep): the standard KL
    at that coefficient, e.g. α times the prioritised arm's mean weight, so that the report
    also pairs the prioritised arm against a uniform tether as loose on average. Finished runs
    are reused and an interrupted one resumes, so a re-run picks up where one stopped."""
    refuse_controlled_keys(overrides or [], CONTROLLED, "tether demo")
    if jobs is None:
        jobs = min(2, usable_cores()) if recipe == DEFAULT_RECIPE else 1
    if jobs < 1:
        raise RecipeError(f"--jobs: {jobs} runs at once; give 1 or more")
    own_sizes = recipe == DEFAULT_RECIPE
    if control_kl_coef is not None and sweep:
        raise RecipeError("--control-kl-coef: adds an arm to the comparison; drop --sweep")
    if control_kl_coef is not None and control_kl_coef <= 0:
        raise RecipeError(f"--control-kl-coef: {control_kl_coef:g}; give a coefficient above 0")
    if full and not own_sizes:
        raise RecipeError(f"--full: sized for {DEFAULT_RECIPE}; drop --recipe {recipe} or --full")
    load_recipe(recipe, overrides or [])  # a bad recipe or --set is one line before any run
    setting = dict(FULL if full else SMALL)
    if not own_sizes:
        setting["seeds"] = OTHER_RECIPE_SEEDS
    setting["seeds"] = seeds or (max(setting["seeds"], SWEEP_SEEDS) if sweep else setting["seeds"])
    t0 = time.perf_counter()

    def sized(seed: int) -> list[str]:
        keys = [f"seed={seed}"]
        if own_sizes:
            keys += [
                f"train.steps={steps or setting['steps']}",
                f"train.eval_every={setting['eval_every']}",
                f"rl.prompts_per_step={setting['prompts_per_step']}",
                f"rl.minibatches={setting['minibatches']}",
                f"eval.n={setting['eval_n']}",
            ]
        elif steps:
            keys.append(f"train.steps={steps}")
        return keys

    def run(
        exponents: tuple[float, ...],
        n_seeds: int,
        folder: str,
        title: str,
        control: float | None = None,
    ) -> Path:
        # arm label -> (run-folder stem, recipe overrides)
        arms: dict[str, tuple[str, list[str]]] = {"standard KL": ("standard", [])}
        control_arm = None
        if control is not None:
            control_arm = f"standard KL (α={control:g})"
            arms[control_arm] = (f"standard-kl{control:g}", [f"rl.kl_coef={control}"])
        for b in exponents:
            label = f"prioritised KL (β_c={b:g})"
            arms[label] = (f"prioritized-{b:g}", [f"rl.certainty_exponent={b}"])
        groups: dict[str, list[Path]] = {arm: [] for arm in arms}
        planned: list[tuple[str, Recipe, Path]] = []
        threads = [f"train.threads={usable_cores() // jobs}"] if jobs > 1 else []
        for seed in range(n_seeds):
            for i, (arm, (stem, extra)) in enumerate(arms.items()):  # a seed's arms in turn
                # the start is evaluated once: seed 0's first arm
                start = [] if i == seed == 0 else ["train.eval_at_start=false"]
                keys = [*sized(seed), *(overrides or []), *extra, *threads, *start]
                planned.append(
                    (f"{arm}, seed {seed}", load_recipe(recipe, keys), out / f"{stem}-seed{seed}")
                )
                groups[arm].append(out / f"{stem}-seed{seed}")
        run_all(
            planned, jobs, progress, lambda text: echo(f"[{time.perf_counter() - t0:6.0f}s] {text}")
        )
        return write_report(groups, out / folder, title, control_arm)

    if sweep:
        report = run(SWEEP_EXPONENTS, setting["seeds"], "report", SWEEP_TITLE)
    else:
        report = run(
            (certainty_exponent,), setting["seeds"], "report", TITLE, control=control_kl_coef
        )
        if full:
            run(SWEEP_EXPONENTS, min(SWEEP_SEEDS, setting["seeds"]), "report-sweep", SWEEP_TITLE)
    echo(f"[{time.perf_counter() - t0:6.0f}s] done")
    return report


def run_all(planned: list[tuple[str, Recipe, Path]], jobs: int, progress: bool, echo: Any) -> None:
    """Train every planned (label, recipe, run folder), ``jobs`` at a time (each in its own
    process when ``jobs`` > 1, without progress bars); a failed run stops the demo with its
    error once the runs under way have ended."""
    if jobs == 1:
        for label, recipe, folder in planned:
            echo(label)
            train_once(recipe, folder, progress)  # a re-run reuses or resumes it
        return
    context = multiprocessing.get_context("spawn")  # no torch state shared with the parent
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=prepare_process
    ) as pool:
        futures = {}
        for label, recipe, folder in planned:
            futures[pool.submit(train_once, recipe, folder, False)] = label
        for future in as_completed(futures):
            future.result()  # re-raises a run's error here
            echo(f"{futures[future]}: done")


TITLE = "Critical tokens: standard vs prioritised KL"
SWEEP_TITLE = TITLE + " (β_c sweep)"


def write_report(
    groups: dict[str, list[Path]], folder: Path, title: str, control: str | None = None
) -> Path:
    """The comparison (curves and finals, :func:`make_group_report`), ``summary.json`` with
    the paired differences (every arm against the first; with a ``control`` arm, every
    prioritised arm against it too), and ``paired.md``; returns the comparison's markdown
    path."""
    first = next(iter(groups.values()))[:1]  # the run that evaluated the start (seed 0)
    report = make_group_report(
        groups, folder, REPORT_KEYS, title=title, proportions=PROPORTIONS, start_runs=first
    )
    summary = _final_summary(groups)
    arms = list(groups)
    pairs = [(arms[0], arm) for arm in arms[1:]]
    if control is not None:
        pairs += [(control, arm) for arm in arms[1:] if arm != control]
    summary["paired"] = paired_differences(groups, pairs)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "paired.md").write_text(paired_table(summary["paired"]))
    return report


def is_demo_folder(out: Path) -> bool:
    """Whether ``out`` holds an earlier demo's runs (``standard-seedN``, ``prioritized-...``),
    so that a re-run may reuse the finished ones and resume an interrupted one."""
    return any(
        p.is_dir() and p.name.startswith(("standard-seed", "prioritized-")) for p in out.iterdir()
    )


def _final_summary(groups: dict[str, list[Path]]) -> dict[str, Any]:
    """Per arm: each report key's last value, mean and 95% interval across seeds (cut to
    [0, 1] for :data:`PROPORTIONS`)."""
    summary: dict[str, Any] = {}
    for arm, runs in groups.items():
        finals: dict[str, list[float]] = {}
        for run in runs:
            for k, v in final_values(run, REPORT_KEYS).items():
                finals.setdefault(k, []).append(v)
        summary[arm] = {
            k: dict(zip(("mean", "ci_low", "ci_high"), _interval(k, v), strict=True))
            for k, v in finals.items()
        }
    return summary


def _interval(key: str, values: list[float]) -> tuple[float, float, float]:
    return mean_ci(values, bounds=UNIT_INTERVAL if key in PROPORTIONS else None)


# ----------------------------------------------------------------------------- paired by seed

# the figures compared arm against arm, seed by seed: N+1 accuracy (what RL trains for) and
# 1..N accuracy (what the KL should retain); on another task only the first, named as such
PAIRED_KEYS = {"eval/acc_rl": "N+1 accuracy", "eval/acc_pretrain": "1..N accuracy"}
OTHER_TASK_NAMES = {"eval/acc_rl": "accuracy on the RL problems"}


def figure_names(run: Path) -> dict[str, str]:
    """The names of :data:`PAIRED_KEYS` for a run's task (the recipe in its ``config.yaml``):
    the digit counts on addition (and where the run has no readable recipe), else plain
    names."""
    try:
        task = load_recipe(run / "config.yaml").task.name
    except RecipeError:
        task = "addition"
    return dict(PAIRED_KEYS) if task == "addition" else {**PAIRED_KEYS, **OTHER_TASK_NAMES}


def final_values(run: Path, keys: Any) -> dict[str, float]:
    """The last logged value of each of ``keys`` in a run's metrics."""
    last: dict[str, float] = {}
    for row in read_metrics(run / "metrics.jsonl"):
        last.update({k: v for k, v in row.items() if k in keys})
    return last


def paired_differences(
    groups: dict[str, list[Path]], pairs: list[tuple[str, str]] | None = None
) -> dict[str, Any]:
    """Arm against arm, seed by seed, for each (base, arm) of ``pairs`` (default: each arm
    after the first against the first, the standard KL): the runs of one seed share the
    starting model, the prompt stream's seed and the evaluation problems, so the difference of
    their final figures removes what the seed and the problems share. Per pair, keyed by the
    arm (by "ARM against BASE" when the arm has an earlier pair) and per :data:`PAIRED_KEYS`
    key: the per-seed values of both arms, their differences, and the mean difference with a
    Student-t 95% interval over seeds (cut to [−1, 1])."""
    arms = list(groups)
    finals_of = {arm: [final_values(r, PAIRED_KEYS) for r in runs] for arm, runs in groups.items()}
    out: dict[str, Any] = {}
    for base, arm in pairs if pairs is not None else [(arms[0], a) for a in arms[1:]]:
        names = figure_names(groups[base][0])
        per_key: dict[str, Any] = {}
        for key in PAIRED_KEYS:
            both = [
                (b[key], a[key])
                for b, a in zip(finals_of[base], finals_of[arm], strict=True)
                if key in a and key in b
            ]
            if not both:
                continue
            before, after = [b for b, _ in both], [a for _, a in both]
            mean, low, high = paired_difference_ci(before, after)
            per_key[key] = {
                "name": names[key],
                "base": before,
                "arm": after,
                "differences": [a - b for b, a in both],
                "mean": mean,
                "ci_low": low,
                "ci_high": high,
                "seeds": len(both),
            }
        label = arm if arm not in out else f"{arm} against {base}"
        out[label] = {"arm": arm, "against": base, "figures": per_key}
    return out


def paired_table(paired: dict[str, Any]) -> str:
    """Markdown: per compared arm, a row per seed (both arms and their difference, in points)
    and the mean difference with its 95% interval, and whether the interval excludes 0."""
    lines: list[str] = []
    for label, entry in paired.items():
        figures = entry["figures"]
        if not figures:
            continue
        arm, base = entry.get("arm", label), entry["against"]
        keys = list(figures)
        lines += [f"## {arm} − {base}, paired by seed", ""]
        header = "| seed |"
        rule = "|---|"
        for key in keys:
            name = figures[key].get("name", PAIRED_KEYS[key])
            header += f" {name}: {base} | {arm} | difference |"
            rule += "---|---|---|"
        lines += [header, rule]
        n = max(len(figures[k]["differences"]) for k in keys)
        for seed in range(n):
            row = f"| {seed} |"
            for key in keys:
                f = figures[key]
                if seed < len(f["differences"]):
                    row += (
                        f" {100 * f['base'][seed]:.1f} | {100 * f['arm'][seed]:.1f} "
                        f"| {100 * f['differences'][seed]:+.1f} |"
                    )
                else:
                    row += " – | – | – |"
            lines.append(row)
        row = "| mean [95% CI] |"
        for key in keys:
            f = figures[key]
            row += (
                f" {100 * mean_ci(f['base'])[0]:.1f} | {100 * mean_ci(f['arm'])[0]:.1f} "
                f"| **{100 * f['mean']:+.1f}** [{100 * f['ci_low']:+.1f}, {100 * f['ci_high']:+.1f}] |"
            )
        lines += [row, ""]
        for key in keys:
            lines.append(paired_sentence(arm, base, key, figures[key]))
        lines.append("")
    return "\n".join(lines) + "\n"


def paired_sentence(arm: str, base: str, key: str, f: dict[str, Any]) -> str:
    """One line: the mean difference in points, its interval and half-width, and whether the
    interval resolves the sign."""
    half = 100 * (f["ci_high"] - f["ci_low"]) / 2
    name = f.get("name", PAIRED_KEYS[key])
    if f["seeds"] < 2:
        return (
            f"- {name}, {arm} − {base}: {100 * f['mean']:+.1f} points, 95% CI: none "
            "from one seed (an interval needs 2 or more); not resolved."
        )
    if max(f["differences"]) - min(f["differences"]) < 1e-12:  # no spread: no width
        verdict = (
            "not resolved: every seed gave the same difference, so the interval has no width "
            "and says nothing of other seeds"
        )
    elif f["ci_low"] > 0 or f["ci_high"] < 0:
        verdict = "resolved: the interval excludes 0"
    else:
        verdict = "not resolved: the interval contains 0"
    return (
        f"- {name}, {arm} − {base}: {100 * f['mean']:+.1f} points, 95% CI "
        f"[{100 * f['ci_low']:+.1f}, {100 * f['ci_high']:+.1f}] (half-width {half:.1f}) over "
        f"{f['seeds']} seeds; {verdict}."
    )
