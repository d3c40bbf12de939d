"""Draw one or more run directories: curves from ``metrics.jsonl``, a table from ``summary.json``.

A run directory (see ``tether.engine.loop``) holds ``metrics.jsonl``, one JSON object per logged
step, always with ``step``, and ``summary.json``, the final figures. :func:`make_report` writes
into ``out``:

- ``training.png``: every numeric key that is not an evaluation (loss, lr, grad_norm, ...), one
  panel per key, runs overlaid, x = step;
- ``eval.png``: every key starting with ``eval/`` (or ``exact/``, the DPG stage's exact figures),
  laid out the same way;
- ``report.md``: one row per run with the union of the numeric summary figures (nested dicts
  flattened with ``/``), to 4 significant digits, and the figures embedded by relative link.

Plotting uses matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tether.eval.stats import UNIT_INTERVAL, mean_ci  # noqa: E402

EVAL_PREFIX = ("eval/", "exact/")  # evaluations: sampled, and exact (enumerable task)
TRAINING_PNG = "training.png"
EVAL_PNG = "eval.png"


def _is_number(value: Any) -> bool:
    # bool is an int subclass in Python, but a flag is not a figure to plot or tabulate
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; blank lines are skipped, and so is a last line that
    is not valid JSON (the process was killed while writing it; a warning on stderr).
    ValueError (naming the file and line) for a missing file, an earlier line that is not JSON,
    or a record that is not an object with a ``step``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (a run directory must contain metrics.jsonl)")
    with path.open(errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    records = []
    for i, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                print(
                    f"warning: {path}, line {lineno}: skipping a partial last line "
                    "(the run stopped while writing it)",
                    file=sys.stderr,
                )
                break
            raise ValueError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}, line {lineno}: expected a JSON object with a 'step'")
        records.append(record)
    return records


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``, recursively."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}/"))
        else:
            flat[name] = value
    return flat


def read_summary(path: Path) -> dict[str, float]:
    """The numeric figures of a ``summary.json``, flattened with ``/``; empty if the file is
    absent (a run still in progress). ValueError naming the file if it is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from err
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return {k: v for k, v in flatten(summary).items() if _is_number(v)}


def _series(records: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """key -> (steps, values) over the records where the key holds a number."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for record in sorted(records, key=lambda r: r["step"] if _is_number(r["step"]) else 0):
        step = record["step"]
        if not _is_number(step):
            continue
        for key, value in record.items():
            if key != "step" and _is_number(value):
                xs, ys = out.setdefault(key, ([], []))
                xs.append(step)
                ys.append(value)
    return out


def _plot_panels(
    runs: dict[str, dict[str, tuple[list[float], list[float]]]], keys: list[str], path: Path
) -> None:
    """One panel per key, every run that has the key overlaid, x = step."""
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        all_positive = True
        for label, series in runs.items():
            if key in series:
                xs, ys = series[key]
                ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
                all_positive &= all(y > 0 for y in ys)
        # losses span decades; show them on a log axis when that is possible
        if "loss" in key and all_positive:
            ax.set_yscale("log")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _format(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """The directory names, or parent/name where two runs share a name."""
    names = [d.name for d in run_dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in run_dirs]


def make_report(run_dirs: Sequence[Path], out: Path) -> Path:
    """Plot and tabulate ``run_dirs`` into ``out`` (created if needed); returns ``report.md``.

    Raises ValueError naming the directory or file when a run has no ``metrics.jsonl``, or when
    ``metrics.jsonl``/``summary.json`` is malformed (with the line number for the former).
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("make_report needs at least one run directory")
    for d in run_dirs:
        if not d.is_dir():
            raise ValueError(f"{d}: not a run directory")
        if not (d / "metrics.jsonl").is_file():
            raise ValueError(f"{d}: no metrics.jsonl in this run directory")
    labels = _run_labels(run_dirs)
    runs = dict(zip(labels, run_dirs, strict=True))
    series = {label: _series(read_metrics(d / "metrics.jsonl")) for label, d in runs.items()}
    summaries = {label: read_summary(d / "summary.json") for label, d in runs.items()}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # keys in first-seen order, so the panels follow the order the training loop logs them
    keys = list(dict.fromkeys(k for s in series.values() for k in s))
    figures = []
    train_keys = [k for k in keys if not k.startswith(EVAL_PREFIX)]
    eval_keys = [k for k in keys if k.startswith(EVAL_PREFIX)]
    if train_keys:
        _plot_panels(series, train_keys, out / TRAINING_PNG)
        figures.append(("Training curves", TRAINING_PNG))
    if eval_keys:
        _plot_panels(series, eval_keys, out / EVAL_PNG)
        figures.append(("Evaluation curves", EVAL_PNG))

    columns = list(dict.fromkeys(k for s in summaries.values() for k in s))
    lines = ["# Report", "", "Runs: " + ", ".join(f"`{d}`" for d in run_dirs), "", "## Summary", ""]
    if columns:
        lines.append("| run | " + " | ".join(columns) + " |")
        lines.append("|---|" + "---|" * len(columns))
        for label in labels:
            cells = [_format(summaries[label].get(c)) for c in columns]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    else:
        lines.append("No numeric figures in any summary.json.")
    for title, name in figures:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


# ----------------------------------------------------------------------------- seed groups


def make_group_report(
    groups: Mapping[str, Sequence[Path]],
    out: Path,
    keys: Sequence[str],
    title: str = "Comparison",
    proportions: Collection[str] = (),
    start_runs: Sequence[Path] = (),
) -> Path:
    """Runs grouped by arm (e.g. standard vs prioritised KL), several seeds each: every key in
    ``keys`` plotted over steps as the mean across seeds with a 95% band, and a markdown table of
    the final value of each key as mean [low, high]. Writes ``comparison.png`` and
    ``comparison.md`` into ``out``; returns the markdown path.

    The keys in ``proportions`` hold values in [0, 1] (accuracies, probabilities, shares): their
    intervals are cut to [0, 1], where a t-interval of a few seeds near 0 or 1 would leave it.

    ``start_runs``: per seed (the position of a run in its arm), a run whose step-0 figures
    stand for those of every arm's run at that position that logged none, because they would
    be the same: the same starting model evaluated on the same problems (``tether demo``
    evaluates the start once, on seed 0: ``train.eval_at_start: false`` on every other run, so
    its step 0 is seed 0's alone)."""
    out.mkdir(parents=True, exist_ok=True)

    def interval(key: str, values: list[float]) -> tuple[float, float, float]:
        return mean_ci(values, bounds=UNIT_INTERVAL if key in proportions else None)

    curves = group_curves(groups, keys, start_runs)
    present = [k for k in keys if any(curves[a][k] for a in curves)]
    cols = min(3, max(1, len(present)))
    rows = math.ceil(len(present) / cols) if present else 1
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    partial = False  # whether some step has fewer seeds than the rest of its curve
    for ax, key in zip(axes.flat, present, strict=False):
        for i, arm in enumerate(curves):  # a fixed colour per arm, even where an arm has no data
            points = sorted(curves[arm][key].items())
            if not points:
                continue
            # a step with fewer seeds than the others (the demo's start: seed 0 only) is a
            # hollow marker off the line: joined to the rest it would draw a change of seeds
            # as a change over training
            seeds = max(len(v) for _, v in points)
            full = [(s, v) for s, v in points if len(v) == seeds]
            few = [(s, v) for s, v in points if len(v) < seeds]
            partial = partial or bool(few)
            xs = [s for s, _ in full]
            stats_ = [interval(key, v) for _, v in full]
            means = [m for m, _, _ in stats_]
            lows, highs = [lo for _, lo, _ in stats_], [hi for _, _, hi in stats_]
            if len(full) > 1:
                ax.plot(xs, means, marker="o", ms=3, label=arm, color=f"C{i}")
                ax.fill_between(xs, lows, highs, alpha=0.2, color=f"C{i}")
            else:  # one step: its interval as an error bar
                bars = [[m - lo for m, lo in zip(means, lows, strict=True)]]
                bars.append([hi - m for m, hi in zip(means, highs, strict=True)])
                ax.errorbar(
                    xs, means, yerr=bars, fmt="o", ms=4, capsize=4, label=arm, color=f"C{i}"
                )
            for s, v in few:
                ax.plot(
                    [s], [interval(key, v)[0]], marker="o", ms=6, fillstyle="none", color=f"C{i}"
                )
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    if present:
        axes.flat[0].legend(fontsize=8)
    note = "; hollow: fewer seeds" if partial else ""
    fig.suptitle(f"{title} (mean and 95% interval across seeds{note})")
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=110)
    plt.close(fig)

    lines = [f"# {title}", "", "Final value of each figure: mean [95% interval] across seeds.", ""]
    lines.append("| arm | seeds | " + " | ".join(present) + " |")
    lines.append("|---|---|" + "---|" * len(present))
    for arm, runs in groups.items():
        cells = []
        for key in present:
            points = sorted(curves[arm][key].items())
            if not points:
                cells.append("–")
                continue
            m, lo, hi = interval(key, points[-1][1])
            cells.append(f"{_format(m)} [{_format(lo)}, {_format(hi)}]")
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", "![comparison](comparison.png)", ""]
    if partial:
        lines += [
            "Hollow markers: steps with fewer seeds than the rest of their curve (a start "
            "evaluated on one seed's problems), drawn apart from the curve.",
            "",
        ]
    path = out / "comparison.md"
    path.write_text("\n".join(lines))
    return path


def group_curves(
    groups: Mapping[str, Sequence[Path]], keys: Sequence[str], start_runs: Sequence[Path] = ()
) -> dict[str, dict[str, dict[float, list[float]]]]:
    """arm -> key -> step -> the runs' values at that step (one per seed); a run that logged
    no step 0 takes it from ``start_runs`` at its position (:func:`make_group_report`)."""
    read: dict[Path, dict[str, tuple[list[float], list[float]]]] = {}

    def series_of(run: Path) -> dict[str, tuple[list[float], list[float]]]:
        """A run's series, read once (the start runs are usually one arm's own runs)."""
        if Path(run) not in read:
            read[Path(run)] = _series(read_metrics(Path(run) / "metrics.jsonl"))
        return read[Path(run)]

    starts = [series_of(r) for r in start_runs]
    curves: dict[str, dict[str, dict[float, list[float]]]] = {}
    for arm, runs in groups.items():
        per_key: dict[str, dict[float, list[float]]] = {k: {} for k in keys}
        for i, run in enumerate(runs):
            series = dict(series_of(run))  # a copy: a borrowed step 0 stays this run's
            for key, (steps0, values0) in (starts[i] if i < len(starts) else {}).items():
                if 0 in steps0 and 0 not in series.get(key, ([], []))[0]:
                    steps, values = series.get(key, ([], []))
                    series[key] = ([0, *steps], [values0[steps0.index(0)], *values])
            for key, (steps, values) in series.items():
                if key in per_key:
                    for s, v in zip(steps, values, strict=True):
                        per_key[key].setdefault(s, []).append(v)
        curves[arm] = per_key
    return curves
