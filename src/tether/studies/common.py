"""What every ``tether study`` shares: run-folder names, train-once-or-resume (only with the
settings the run was started with), refusing ``--set`` on keys a study sets itself, and the
table cell of a figure across seeds."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tether.config import Recipe, RecipeError, load_recipe, parse_override
from tether.engine.checkpoints import RunDirError, step_checkpoints
from tether.engine.loop import train
from tether.eval.stats import mean_ci


def stem(text: str) -> str:
    """A folder name for an arm label: lower case, runs of other characters as one '-'."""
    keep = "".join(c if c.isalnum() or c in ".-" else "-" for c in text.lower())
    return "-".join(p for p in keep.split("-") if p)


def interval_cell(
    values: list[float], digits: int = 3, bounds: tuple[float, float] | None = None
) -> str:
    """A figure across seeds as a table cell: ``mean ± h`` with h the half-width of the 95%
    t-interval; ``mean [low, high]`` where that interval leaves ``bounds`` (the range of the
    figure: ``(0, 1)`` for an accuracy or a share) and is cut to it; the mean alone for one
    seed."""
    mean, low, high = mean_ci(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    if bounds is not None and (low < bounds[0] or high > bounds[1]):
        _, low, high = mean_ci(values, bounds=bounds)
        return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
    return f"{mean:.{digits}f} ± {high - mean:.{digits}f}"


def finished(run: Path) -> bool:
    """A run is finished once its ``summary.json`` is written (the loop writes it last)."""
    return (run / "summary.json").is_file()


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (the keys as ``--set`` names them)."""
    if not isinstance(data, dict) or not data:
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


# how a run is carried out, not what it trains: a study may be continued with other values
NOT_SETTINGS = ("train.threads", "tracking.trackers")


def recipe_differences(recipe: Recipe, run: Path) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key where ``recipe`` differs from the resolved
    recipe ``run/config.yaml`` holds, in recipe order (:data:`NOT_SETTINGS` aside).
    RunDirError if that file cannot be read as a recipe."""
    try:
        saved = load_recipe(run / "config.yaml")
    except RecipeError as err:
        raise RunDirError(
            f"{run}: its config.yaml cannot be read ({err}); use another --out or remove that "
            "folder"
        ) from err
    old = _flat(saved.model_dump(mode="json"))
    new = _flat(recipe.model_dump(mode="json"))
    keys = [k for k in dict.fromkeys([*new, *old]) if k not in NOT_SETTINGS]
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def check_same_recipe(recipe: Recipe, run: Path, started: str = "already trained") -> None:
    """RunDirError naming ``run`` and the first differing keys if ``run`` was trained (or
    started) with other settings than ``recipe``: reusing or resuming it would silently mix
    two settings."""
    diffs = recipe_differences(recipe, run)
    if not diffs:
        return
    shown = ", ".join(f"{k}={_show(old)} (now {_show(new)})" for k, old, new in diffs[:3])
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    raise RunDirError(
        f"{run}: {started} with {shown}{more}; use another --out or remove that folder"
    )


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def train_once(recipe: Recipe, run: Path, progress: bool) -> None:
    """Train ``run`` unless it has finished; continue it from its last checkpoint if it was
    interrupted, and start over if it stopped before its first checkpoint. A finished or
    interrupted run with settings other than ``recipe`` is refused (RunDirError), not reused."""
    if finished(run):
        check_same_recipe(recipe, run)
        return
    if run.exists() and step_checkpoints(run):
        check_same_recipe(recipe, run, started="an interrupted run started")
        train(recipe, run, progress=progress, resume=True)
        return
    if run.exists():
        shutil.rmtree(run)
    train(recipe, run, progress=progress)


def refuse_controlled_keys(overrides: list[str], controlled: dict[str, str], command: str) -> None:
    """RecipeError for a ``--set`` of a key that ``command`` sets itself per run or arm:
    ``controlled`` maps each such key to what the command does with it and the option to use
    instead, e.g. ``{"seed": "sets each run's seed; use --seeds"}``. A ``--set`` of a whole
    section holding such a key counts too."""
    for text in overrides:
        path, value = parse_override(text)
        for key, instead in controlled.items():
            parts = key.split(".")
            if parts[: len(path)] != path:
                continue
            node = value
            for part in parts[len(path) :]:  # --set rl={certainty_exponent: 10}
                if not isinstance(node, dict) or part not in node:
                    break
                node = node[part]
            else:
                raise RecipeError(f"--set {key}: {command} {instead}")
