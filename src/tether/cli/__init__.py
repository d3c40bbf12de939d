"""The ``tether`` command line: one command per job, one module per command group.

Each command module (``tether.cli.train``, ``tether.cli.eval``, ...) holds a Typer app whose
command parses its options, calls one library function and renders the result. The modules
import torch and the library at the top (about 4 s), so they are imported only when their
command runs or shows its own help: ``tether --help`` lists the commands from
:data:`COMMANDS` alone. Every command turns a bad input into a one-line ``error: ...`` on
stderr and exit code 2 (:func:`tether.cli.common.friendly_errors`).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from tether.engine.process import prepare_process

# command -> the line `tether --help` shows for it: the first paragraph of the command's
# help (tests/test_cli_commands.py checks they agree). Its module is tether.cli.<command>.
COMMANDS: dict[str, str] = {
    "train": "Train a model as a recipe says; writes a run directory.",
    "eval": (
        "Accuracy per digit length (addition) or accuracy and score (other tasks), with 95%\n"
        "intervals; optionally a diversity sweep over temperatures and the extracted rewards.\n"
        "With --exact (enumerable task): every response enumerated, exact figures against the\n"
        "target p* ∝ π_ref·exp(r/β) for the policy, the reference and the target itself."
    ),
    "winrate": (
        "InfAlign's inference-time win rate: the policy's best-of-N (or worst-of-N) against the\n"
        "reference decoded the same way, judged by the reward, for each N; with "
        "KL(policy||reference)."
    ),
    "sample": "Generate completions for prompts (or for random addition problems).",
    "report": "Plots of loss and evaluation curves, runs overlaid, and a table of final figures.",
    "demo": (
        "The critical-token experiment at a small scale: standard vs prioritised KL, several seeds."
    ),
    "models": (
        "List the shipped checkpoints and installed pretrained models (usable by name wherever a\n"
        "model is asked for, as is any local Hugging Face folder)."
    ),
    "bench": "Speed benchmarks that print figures.",
    "study": "Multi-run studies that reproduce a paper's claims.",
}


def load_command(name: str) -> Any:
    """The command (or group) of one of :data:`COMMANDS` as Typer builds it, its module
    imported."""
    module = importlib.import_module(f"tether.cli.{name}")
    command = typer.main.get_command(module.app)
    command.name = name
    return command


class LazyCommands(TyperGroup):
    """The top-level group: lists :data:`COMMANDS` by name and help line, and imports a
    command's module when the command is resolved to run (or to show its own help)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, summary in COMMANDS.items():
            self.commands[name] = TyperCommand(name, help=summary)  # a stand-in until it runs

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if name in COMMANDS:
            command = self.commands[name] = load_command(name)
        return name, command, rest


app = typer.Typer(
    cls=LazyCommands,
    add_completion=False,
    no_args_is_help=True,
    help="tether: KL-tethered fine-tuning of language models.",
    pretty_exceptions_enable=False,
)


@app.callback()
def _before_every_command() -> None:
    prepare_process()  # progress bars, allocator, DeepSpeed's accelerator name


def main() -> None:
    """The ``tether`` command. A command that ends without an error ends its process group
    too (under ``torchrun`` or ``accelerate launch``), on every process; after an error the
    group is left to the launcher, which stops the other processes."""
    try:
        app()
    except SystemExit as end:
        if not end.code:
            _end_process_group()
        raise
    _end_process_group()


def _end_process_group() -> None:
    """:func:`tether.distributed.shutdown`, without importing torch where the command did not
    (``tether --help`` stays fast)."""
    if "torch.distributed" in sys.modules:
        from tether import distributed

        distributed.shutdown()


if __name__ == "__main__":
    main()
