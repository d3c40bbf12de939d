"""``tether study``: multi-run studies that reproduce a paper's claims (:mod:`tether.studies`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tether.cli.common import (
    MAX_SEED,
    UsageError,
    check_out,
    friendly_errors,
    parse_floats,
    parse_ints,
)
from tether.studies.collapse import run_collapse_study
from tether.studies.demo_rl import Grid, run_demo_rl_study
from tether.studies.imitation import PARTS, run_imitation_study
from tether.studies.preferences import run_ctrl_study, run_xpo_study

app = typer.Typer(
    add_completion=False,
    help="Multi-run studies that reproduce a paper's claims.",
    no_args_is_help=True,
)


@app.command("imitation")
@friendly_errors
def study_imitation(
    out: Annotated[Path, typer.Option(help="study folder")] = Path("runs/imitation"),
    part: Annotated[
        list[str] | None, typer.Option(help="tradeoff and/or small-data (default both)")
    ] = None,
    seeds: Annotated[int, typer.Option(min=1)] = 3,
    steps: Annotated[int | None, typer.Option(min=1, help="training steps per run")] = None,
    train_size: Annotated[int, typer.Option(min=1, help="small-data: training problems")] = 256,
    prompts: Annotated[int, typer.Option(min=1, help="held-out prompts per evaluation")] = 64,
    k: Annotated[int, typer.Option(min=2, help="samples per prompt")] = 4,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a key in every run: a.b=value")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """MLE vs MLE + entropy vs IQLearn (λ sweep, online) on multistep sums: score against
    Self-BLEU over temperatures, reward-score correlation, and the small-data setting."""
    check_out("--out", out)

    parts = tuple(part or PARTS)
    for name in parts:
        if name not in PARTS:
            raise UsageError(f"--part {name!r}: choose from {', '.join(PARTS)}")
    for report in run_imitation_study(
        out,
        parts,
        seeds=seeds,
        steps=steps,
        train_size=train_size,
        n_prompts=prompts,
        k=k,
        overrides=set_ or [],
        progress=not quiet,
        echo=lambda m: typer.echo(m, err=True),
    ):
        typer.echo(report.read_text())


@app.command("ctrl")
@friendly_errors
def study_ctrl(
    out: Annotated[Path, typer.Option(help="study folder")] = Path("runs/ctrl"),
    kl_coefs: Annotated[str, typer.Option(help="rl.kl_coef values, comma-separated")] = "0.3,1,3",
    seeds: Annotated[int, typer.Option(min=1)] = 1,
    first_seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="seeds first_seed..+seeds-1")
    ] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="training steps per run")] = None,
    prompts: Annotated[int, typer.Option(min=2, help="held-out prompts per evaluation")] = 64,
    samples: Annotated[int, typer.Option(min=1, help="samples per prompt and model")] = 16,
    frontier_samples: Annotated[
        int, typer.Option(min=2, help="reference samples per prompt for the optimum frontier")
    ] = 64,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a key in every run: a.b=value")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """KL-RL on the raw reward vs the calibrated reward vs CTRL's best-of-4 transform on
    4-digit addition: best-of-N win rate against the reference, at matched KL."""
    check_out("--out", out)

    report = run_ctrl_study(
        out,
        parse_floats("--kl-coefs", kl_coefs),
        seeds=seeds,
        first_seed=first_seed,
        steps=steps,
        prompts=prompts,
        samples=samples,
        overrides=set_ or [],
        progress=not quiet,
        echo=lambda m: typer.echo(m, err=True),
        frontier_samples=frontier_samples,
    )
    typer.echo(report.read_text())


@app.command("xpo")
@friendly_errors
def study_xpo(
    out: Annotated[Path, typer.Option(help="study folder")] = Path("runs/xpo"),
    alphas: Annotated[str, typer.Option(help="XPO α values, comma-separated")] = "0.001,0.01",
    seeds: Annotated[int, typer.Option(min=1)] = 2,
    first_seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="seeds first_seed..+seeds-1")
    ] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="training steps per run")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a key in every run: a.b=value")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Online DPO vs XPO on 4-digit addition at T = 1.5, where the reference rarely solves a
    problem: on-policy accuracy against samples drawn."""
    check_out("--out", out)

    report = run_xpo_study(
        out,
        parse_floats("--alphas", alphas),
        seeds=seeds,
        first_seed=first_seed,
        steps=steps,
        overrides=set_ or [],
        progress=not quiet,
        echo=lambda m: typer.echo(m, err=True),
    )
    typer.echo(report.read_text())


@app.command("collapse")
@friendly_errors
def study_collapse(
    out: Annotated[Path, typer.Option(help="study folder")] = Path("runs/collapse"),
    steps: Annotated[int, typer.Option(min=1, help="training steps per arm")] = 300,
    eval_every: Annotated[int, typer.Option(min=1, help="steps between exact evaluations")] = 25,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED)] = 0,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a key in every arm: a.b=value")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Distribution collapse on the enumerable task: reward maximisation, KL-RL at several β,
    DPG and f-DPG (JS), all judged exactly against the same target p* ∝ π_ref·exp(r/0.1)."""
    check_out("--out", out)

    report = run_collapse_study(
        out,
        steps=steps,
        eval_every=eval_every,
        seed=seed,
        overrides=set_ or [],
        progress=not quiet,
        echo=lambda m: typer.echo(m, err=True),
    )
    typer.echo(report.read_text())


@app.command("demo-rl")
@friendly_errors
def study_demo_rl(
    out: Annotated[Path, typer.Option(help="study folder")] = Path("runs/demo-rl"),
    num_demos: Annotated[
        str, typer.Option(help="N_E values (demonstrations), comma-separated")
    ] = "8,32,128,512",
    betas: Annotated[
        str, typer.Option(help="KL coefficients β, comma-separated")
    ] = "0.01,0.03,0.1,0.3,1",
    expert_shares: Annotated[
        str, typer.Option(help="the expert's share of best answers, comma-separated")
    ] = "0.9,0.6",
    seeds: Annotated[int, typer.Option(min=1, help="demonstration draws (one clone each)")] = 4,
    rl_seeds: Annotated[int, typer.Option(min=1, help="KL-RL runs per clone and β")] = 3,
    smoothing: Annotated[
        float, typer.Option(min=0.0, max=0.99, help="label smoothing ε of the cloning")
    ] = 0.05,
    bc_steps: Annotated[int, typer.Option(min=1, help="behaviour-cloning steps")] = 200,
    rl_steps: Annotated[int, typer.Option(min=1, help="KL-RL steps (the RL budget)")] = 40,
    samples: Annotated[int, typer.Option(min=2, help="KL-RL samples per step")] = 4,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a key in every run: a.b=value")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Demonstration-regularised RL on the enumerable task: label-smoothed behaviour cloning on
    N_E expert answers, then KL-RL toward the clone, swept over N_E and β; the best β per N_E."""
    check_out("--out", out)

    grid = Grid(
        num_demos=tuple(parse_ints("--num-demos", num_demos)),
        betas=tuple(parse_floats("--betas", betas)),
        expert_shares=tuple(parse_floats("--expert-shares", expert_shares)),
        seeds=seeds,
        rl_seeds=rl_seeds,
        smoothing=smoothing,
        bc_steps=bc_steps,
        rl_steps=rl_steps,
        samples=samples,
    )
    report = run_demo_rl_study(
        out,
        grid,
        overrides=set_ or [],
        progress=not quiet,
        echo=lambda m: typer.echo(m, err=True),
    )
    typer.echo(report.read_text())
