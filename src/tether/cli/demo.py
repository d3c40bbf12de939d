"""``tether demo``: the critical-token experiment at a small scale."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from tether.cli.common import UsageError, check_out, friendly_errors
from tether.studies.demo import DEFAULT_RECIPE, is_demo_folder, run_demo

app = typer.Typer(add_completion=False)

FULL_HELP = (
    "the closest CPU analogue of the paper's §5.3 (10 seeds, 8 collects of 50 episodes), then "
    "the β_c sweep on 5 of its seeds"
)
RECIPE_HELP = (
    "the standard arm: any RL recipe (a shipped name or a file); the demo's sizes apply to "
    "critical-tokens only, another recipe keeps its own (4 seeds by default)"
)
JOBS_HELP = (
    "runs at once, each in its own process on its share of the cores (default: 2 for "
    "critical-tokens on 2 or more cores, else 1)"
)
CONTROL_HELP = (
    "add a third arm: the standard KL at this coefficient (e.g. 2.5, the prioritised arm's "
    "mean weight times α), paired against both other arms"
)


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path | None, typer.Option(help="output folder (default runs/demo-TIME)")] = None,
    full: Annotated[bool, typer.Option(help=FULL_HELP)] = False,
    seeds: Annotated[int | None, typer.Option(min=1, help="override the number of seeds")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="override the RL steps per run")] = None,
    certainty_exponent: Annotated[
        float, typer.Option(min=0.0, help="β_c of the prioritised KL")
    ] = 150.0,
    sweep: Annotated[
        bool, typer.Option(help="one prioritised arm per β_c in 10, 50, 150, 500, 1000, 10000")
    ] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a recipe key in every arm")
    ] = None,
    recipe: Annotated[str, typer.Option(help=RECIPE_HELP)] = DEFAULT_RECIPE,
    jobs: Annotated[int | None, typer.Option(min=1, help=JOBS_HELP)] = None,
    control_kl_coef: Annotated[float | None, typer.Option(help=CONTROL_HELP)] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """The critical-token experiment at a small scale: standard vs prioritised KL, several seeds."""
    out = out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    check_out("--out", out)
    if out.exists() and any(out.iterdir()) and not is_demo_folder(out):
        raise UsageError(f"--out {out}: already exists and is not empty (and holds no demo runs)")
    report = run_demo(
        out,
        full=full,
        seeds=seeds,
        steps=steps,
        certainty_exponent=certainty_exponent,
        sweep=sweep,
        overrides=set_ or [],
        progress=not quiet,
        echo=typer.echo,
        recipe=recipe,
        jobs=jobs,
        control_kl_coef=control_kl_coef,
    )
    typer.echo((report.parent / "comparison.md").read_text())
    typer.echo((report.parent / "paired.md").read_text())
    typer.echo(f"report: {report}  (plot: {report.parent / 'comparison.png'})")
