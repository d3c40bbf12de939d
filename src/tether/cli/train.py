"""``tether train``: a recipe in, a run directory out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from tether.cli.common import UsageError, check_out, echo_json, friendly_errors
from tether.config import load_recipe
from tether.engine.loop import train as run_training

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def train(
    recipe: Annotated[
        Path | None, typer.Argument(help="YAML recipe (or a packaged recipe name)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a key: a.b=value (repeatable)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/NAME-TIME)")] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="continue an interrupted run from its newest checkpoint"),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Train a model as a recipe says; writes a run directory.

    Ctrl-C (or SIGTERM) saves a checkpoint and stops; `--resume RUN_DIR` continues it."""
    if resume is not None:
        if recipe is not None or set_ or out is not None:
            raise UsageError(
                "--resume uses the run's own config.yaml: give no RECIPE, --set or --out with it"
            )
        cfg = load_recipe(resume / "config.yaml") if (resume / "config.yaml").is_file() else None
        if cfg is None:
            raise UsageError(f"--resume {str(resume)!r}: not a run directory (no config.yaml)")
        out = resume
    elif recipe is None:
        raise UsageError("give a RECIPE to train, or --resume RUN_DIR")
    else:
        cfg = load_recipe(recipe, set_ or [])
        out = out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        check_out("--out", out)
    summary = run_training(cfg, out, progress=not quiet, resume=resume is not None)
    echo_json(summary)
    typer.echo(f"run directory: {out}  (final model: {out / 'model'})")
