"""What every ``tether study`` shares: run-folder names and train-once-or-resume."""

from __future__ import annotations

import shutil
from pathlib import Path

from tether.config import Recipe
from tether.train import step_checkpoints, train


def stem(text: str) -> str:
    """A folder name for an arm label: lower case, runs of other characters as one '-'."""
    keep = "".join(c if c.isalnum() or c in ".-" else "-" for c in text.lower())
    return "-".join(p for p in keep.split("-") if p)


def finished(run: Path) -> bool:
    """A run is finished once its ``summary.json`` is written (the loop writes it last)."""
    return (run / "summary.json").is_file()


def train_once(recipe: Recipe, run: Path, progress: bool) -> None:
    """Train ``run`` unless it has finished; continue it from its last checkpoint if it was
    interrupted, and start over if it stopped before its first checkpoint."""
    if finished(run):
        return
    if run.exists() and step_checkpoints(run):
        train(recipe, run, progress=progress, resume=True)
        return
    if run.exists():
        shutil.rmtree(run)
    train(recipe, run, progress=progress)
