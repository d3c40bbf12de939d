"""``tether demo``: the critical-token experiment at a small scale (docs/methods.md §3).

From the shipped pre-trained model, fine-tune on N+1-digit additions with the standard KL and
with the prioritised KL (w = Ĵ_ref^β_c) at the same KL coefficient, over several seeds, then
write a report comparing the two arms: accuracy on the N+1 RL distribution and on the 1..N
pre-training distribution over training, the critical-token probabilities, and the KL.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tether.config import load_recipe
from tether.eval.report import make_group_report, read_metrics
from tether.eval.stats import UNIT_INTERVAL, mean_ci
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

SMALL = {"seeds": 3, "steps": 12, "eval_every": 4, "prompts_per_step": 32, "eval_n": 64}
FULL = {"seeds": 10, "steps": 80, "eval_every": 10, "prompts_per_step": 50, "eval_n": 200}


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
) -> Path:
    """Run the standard arm and the prioritised arm (or, with ``sweep``, one arm per β_c in
    :data:`SWEEP_EXPONENTS`) over the seeds into ``out``; returns the report's markdown path.
    ``overrides`` (``a.b=value``) apply to every arm."""
    refuse_controlled_keys(overrides or [], CONTROLLED, "tether demo")
    setting = dict(FULL if full else SMALL)
    setting["seeds"] = seeds or setting["seeds"]
    setting["steps"] = steps or setting["steps"]
    exponents = SWEEP_EXPONENTS if sweep else (certainty_exponent,)
    # arm label -> (run-folder stem, recipe overrides)
    arms: dict[str, tuple[str, list[str]]] = {"standard KL": ("standard", [])}
    for b in exponents:
        arms[f"prioritised KL (β_c={b:g})"] = (f"prioritized-{b:g}", [f"rl.certainty_exponent={b}"])
    groups: dict[str, list[Path]] = {arm: [] for arm in arms}
    t0 = time.perf_counter()
    for seed in range(setting["seeds"]):
        for arm, (stem, extra) in arms.items():
            name = f"{stem}-seed{seed}"
            recipe = load_recipe(
                "critical-tokens",
                [
                    f"seed={seed}",
                    f"train.steps={setting['steps']}",
                    f"train.eval_every={setting['eval_every']}",
                    f"rl.prompts_per_step={setting['prompts_per_step']}",
                    f"eval.n={setting['eval_n']}",
                    *(overrides or []),
                    *extra,
                ],
            )
            echo(f"[{time.perf_counter() - t0:6.0f}s] {arm}, seed {seed}")
            train_once(recipe, out / name, progress)  # a re-run reuses or resumes it
            groups[arm].append(out / name)
    report = make_group_report(
        groups,
        out / "report",
        REPORT_KEYS,
        title="Critical tokens: standard vs prioritised KL" + (" (β_c sweep)" if sweep else ""),
        proportions=PROPORTIONS,
    )
    summary = _final_summary(groups)
    (out / "report" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo(f"[{time.perf_counter() - t0:6.0f}s] done")
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
            last: dict[str, float] = {}
            for row in read_metrics(run / "metrics.jsonl"):
                last.update({k: v for k, v in row.items() if k in REPORT_KEYS})
            for k, v in last.items():
                finals.setdefault(k, []).append(v)
        summary[arm] = {
            k: dict(zip(("mean", "ci_low", "ci_high"), _interval(k, v), strict=True))
            for k, v in finals.items()
        }
    return summary


def _interval(key: str, values: list[float]) -> tuple[float, float, float]:
    return mean_ci(values, bounds=UNIT_INTERVAL if key in PROPORTIONS else None)
