"""What every command shares: one-line errors, output paths checked up front, and the parsers
of options that are lists or ranges.

Every command turns a bad input (recipe, checkpoint, run directory, argument) into a one-line
``error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from tether.config import RecipeError
from tether.engine.checkpoints import RunDirError
from tether.engine.faults import NonFiniteError, TrainingInterrupted
from tether.eval.checkpoint import EvaluationError
from tether.generation.texts import checkpoint_prompt_format
from tether.models.loading import ModelLoadError
from tether.rewards.functions import RewardError
from tether.tasks.jsonl import DatasetError
from tether.tasks.prompts import CHAT_TEMPLATE_MODES, PromptFormat, PromptFormatError

F = TypeVar("F", bound=Callable[..., Any])
MAX_SEED = 2**32 - 1  # what NumPy's and a recipe's seed allow

# the library's errors about its input: their message is the one line to show
INPUT_ERRORS = (
    RecipeError,
    ModelLoadError,
    RunDirError,
    DatasetError,
    RewardError,
    EvaluationError,
    PromptFormatError,
)

# the prompt format of sample, eval and winrate: what the checkpoint recorded, unless given
ChatTemplateOption = Annotated[
    str | None,
    typer.Option(
        help="auto | on | off: prompts through the tokenizer's chat template (auto: when it "
        "has one; default: as the checkpoint was trained)"
    ),
]
SystemPromptOption = Annotated[
    str | None,
    typer.Option(help="a system prompt before each prompt ('' = none; default: the checkpoint's)"),
]


class UsageError(ValueError):
    """A bad command-line value; the message names the option."""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def friendly_errors(fn: F) -> F:
    """Turn the library's input errors into ``error: ...`` and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (*INPUT_ERRORS, UsageError) as err:
            _fail(str(err))
        except TrainingInterrupted as err:  # a checkpoint was saved; say how to go on
            typer.echo(f"interrupted: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except NonFiniteError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        except FileNotFoundError as err:
            _fail(f"{err.filename}: no such file or directory")
        except (PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError) as err:
            # a path that cannot be written (most are caught up front by check_out)
            reason = err.strerror or type(err).__name__
            _fail(f"{err.filename}: {reason}" if err.filename else reason)

    return wrapper  # type: ignore[return-value]


def echo_json(value: Any) -> None:
    """One JSON document on stdout (``--json``)."""
    typer.echo(json.dumps(value, indent=2))


def check_out(option: str, path: Path, file: bool = False) -> None:
    """Refuse up front an output path that cannot be written: ``path`` is a folder to use or
    create (with ``file``, a file in such a folder). A one-line UsageError naming the option,
    the path and why; nothing is left behind."""
    folder = path.parent if file else path
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f"{existing} "
        raise UsageError(f"{option} {path}: {where}is a file, not a folder")
    try:  # the one sure test of permissions (root, read-only mounts, /proc): try it
        os.rmdir(tempfile.mkdtemp(prefix=".tether-check-", dir=existing))
    except OSError as err:
        reason = err.strerror or type(err).__name__
        if existing == folder:
            raise UsageError(f"{option} {path}: cannot write in {folder} ({reason})") from None
        raise UsageError(
            f"{option} {path}: cannot create the folder in {existing} ({reason})"
        ) from None


def parse_digits(text: str) -> list[int]:
    """``3`` or ``1-5`` -> [3] or [1, 2, 3, 4, 5]."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
        else:
            lo = hi = int(text)
    except ValueError:
        raise UsageError(f"--digits {text!r}: expected N or LO-HI, e.g. 1-5") from None
    if not 1 <= lo <= hi <= 18:
        raise UsageError(f"--digits {text!r}: need 1 <= LO <= HI <= 18")
    return list(range(lo, hi + 1))


def parse_temperatures(text: str) -> list[float]:
    """``0.5,1`` -> [0.5, 1.0]: finite temperatures >= 0."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--temperatures {text!r}: expected numbers, e.g. 0.5,1") from None
    if not values or any(not 0 <= t < math.inf for t in values):  # nan and inf too
        raise UsageError(f"--temperatures {text!r}: expected finite temperatures >= 0, e.g. 0.5,1")
    return values


def parse_ns(text: str) -> list[int]:
    """``1,2,4,8`` -> [1, 2, 4, 8] (sorted, no repeats); a one-line error for anything else."""
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        raise UsageError(
            f"--n {text!r}: expected positive integers separated by commas, e.g. 1,2,4,8"
        ) from None
    if any(v < 1 for v in values):
        raise UsageError(f"--n {text!r}: every N must be a positive integer (1 = plain sampling)")
    return sorted(set(values))


def _number_list(
    option: str, text: str, kind: type, noun: str, lowest: float, example: str
) -> list[Any]:
    """``0.3,1,3`` -> [0.3, 1.0, 3.0] as ``kind`` (float or int), each at least ``lowest``;
    a one-line error naming the option otherwise."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected comma-separated {noun}") from None
    if not values or any(not v >= lowest for v in values):
        adjective = "non-negative" if lowest == 0 else "positive"
        raise UsageError(f"{option} {text!r}: expected {adjective} {noun}, e.g. {example}")
    return values


def parse_floats(option: str, text: str) -> list[float]:
    """Comma-separated non-negative numbers."""
    return _number_list(option, text, float, "numbers", 0, "0.3,1,3")


def parse_ints(option: str, text: str) -> list[int]:
    """Comma-separated positive integers."""
    return _number_list(option, text, int, "integers", 1, "8,32,128")


def choices(option: str, given: list[str] | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """The names given to a repeatable option, each one of ``allowed`` (all when none)."""
    for name in given or []:
        if name not in allowed:
            raise UsageError(f"{option} {name!r}: choose from {', '.join(allowed)}")
    return tuple(given or allowed)


def prompt_format_option(
    model: str, chat_template: str | None, system_prompt: str | None
) -> PromptFormat:
    """``--chat-template`` and ``--system-prompt`` over what ``model`` records
    (:func:`tether.generation.texts.checkpoint_prompt_format`)."""
    if chat_template is not None and chat_template not in CHAT_TEMPLATE_MODES:
        raise UsageError(f"--chat-template {chat_template!r}: choose auto, on or off")
    return checkpoint_prompt_format(model, chat_template, system_prompt)
