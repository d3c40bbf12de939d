"""``tether models``: the checkpoints shipped with tether."""

from __future__ import annotations

from typing import Annotated

import typer

from tether.cli.common import echo_json, friendly_errors
from tether.models.loading import shipped_models

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def models(json_: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List the checkpoints shipped with tether (usable wherever a checkpoint is asked for)."""
    shipped = shipped_models()
    if json_:
        echo_json(shipped)
        return
    if not shipped:
        typer.echo("no shipped models")
    for name, info in shipped.items():
        typer.echo(f"{name}\n  {info.get('description', '')}\n  path: {info['path']}")
