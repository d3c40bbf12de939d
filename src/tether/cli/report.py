"""``tether report``: plots and a table of one or more runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tether.cli.common import UsageError, check_out, friendly_errors
from tether.eval.report import make_report

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="one or more run directories")],
    out: Annotated[
        Path | None,
        typer.Option("-o", "--out", help="output folder (default: the first run's report/)"),
    ] = None,
) -> None:
    """Plots of loss and evaluation curves, runs overlaid, and a table of final figures."""
    for d in run_dirs:
        if not d.is_dir():
            raise UsageError(f"{d}: not a run directory")
    out = out or run_dirs[0] / "report"
    check_out("--out", out)
    try:
        path = make_report(run_dirs, out)
    except ValueError as err:
        raise UsageError(str(err)) from err
    typer.echo(f"report: {path}")
