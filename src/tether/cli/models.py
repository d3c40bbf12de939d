"""``tether models``: the checkpoints shipped with tether and the installed pretrained models."""

from __future__ import annotations

from typing import Annotated

import typer

from tether.cli.common import echo_json, friendly_errors
from tether.models.loading import all_models

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def models(json_: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List the shipped checkpoints and installed pretrained models (usable by name wherever a
    model is asked for, as is any local Hugging Face folder)."""
    listed = all_models()
    if json_:
        echo_json(listed)
        return
    for name, info in listed.items():
        if info.get("installed") is False:
            typer.echo(f"{name}  (not installed: {info['install']})\n  {info['description']}")
            continue
        count = info.get("parameters")
        size = f", {count:,} parameters" if count is not None else ""
        typer.echo(
            f"{name}  ({info['source']}{size})\n  {info.get('description', '')}\n"
            f"  path: {info['path']}"
        )
