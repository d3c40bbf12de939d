"""Tests for tether.eval.report: plots and the summary table from run directories, and the
comparison of seed groups."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from tether.eval.report import (
    flatten,
    group_curves,
    make_group_report,
    make_report,
    read_metrics,
    read_summary,
)


def _write_run(root: Path, name: str, loss0: float, with_eval: bool = True) -> Path:
    run = root / name
    run.mkdir(parents=True)
    lines = []
    for step in range(1, 6):
        lines.append({"step": step, "loss": loss0 / step, "lr": 1e-3, "grad_norm": 0.5 + step})
        if with_eval and step % 2 == 0:
            lines.append(
                {"step": step, "eval/acc_identical_3": 0.1 * step, "eval/acc_varying_4": 0.05}
            )
    lines.append({"step": 6, "note": "text is skipped", "done": True})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    summary = {
        "final_loss": loss0 / 5,
        "tokens_per_s": 123456.789,
        "eval": {"identical": {"3": 0.987654}},
        "model": "llama",
        "finished": True,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_report_on_two_runs(tmp_path):
    runs = [_write_run(tmp_path, "run-a", 2.0), _write_run(tmp_path, "run-b", 3.0)]
    report = make_report(runs, tmp_path / "out" / "nested")
    assert report == tmp_path / "out" / "nested" / "report.md"
    text = report.read_text()
    assert "run-a" in text and "run-b" in text
    for png in ("training.png", "eval.png"):
        path = report.parent / png
        assert path.is_file() and path.stat().st_size > 1000
        assert f"]({png})" in text  # embedded by relative link
    # table: numeric summary keys only, flattened, 4 significant digits
    header = next(line for line in text.splitlines() if line.startswith("| run |"))
    assert header == "| run | final_loss | tokens_per_s | eval/identical/3 |"
    assert "| run-a | 0.4 | 1.235e+05 | 0.9877 |" in text
    assert "| run-b | 0.6 | 1.235e+05 | 0.9877 |" in text


def test_report_without_eval_keys_and_missing_summary(tmp_path):
    run = _write_run(tmp_path, "mle", 1.0, with_eval=False)
    (run / "summary.json").unlink()
    other = _write_run(tmp_path, "rl", 1.0)
    report = make_report([run, other], tmp_path / "out")
    text = report.read_text()
    assert (tmp_path / "out" / "training.png").is_file()
    assert (tmp_path / "out" / "eval.png").is_file()  # from the second run
    assert "| mle | – | – | – |" in text

    report = make_report([run], tmp_path / "out2")
    assert not (tmp_path / "out2" / "eval.png").exists()
    assert "eval.png" not in report.read_text()


def test_report_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty-run.*metrics.jsonl"):
        make_report([empty], tmp_path / "out")

    bad = _write_run(tmp_path, "bad-run", 1.0)
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    lines[2] = '{"step": 3, "loss": '
    (bad / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad-run/metrics\.jsonl, line 3: not valid JSON"):
        make_report([bad], tmp_path / "out")

    (bad / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: expected a JSON object"):
        read_metrics(bad / "metrics.jsonl")

    (bad / "metrics.jsonl").write_text('{"step": 1}\n')
    (bad / "summary.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"bad-run/summary\.json: not valid JSON"):
        make_report([bad], tmp_path / "out")

    with pytest.raises(ValueError, match="not a run directory"):
        make_report([tmp_path / "nowhere"], tmp_path / "out")


def test_flatten_and_read_summary(tmp_path):
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a/b": 1, "a/c/d": 2, "e": 3}
    (tmp_path / "summary.json").write_text(json.dumps({"x": 1, "y": {"z": 2.5}, "s": "no"}))
    assert read_summary(tmp_path / "summary.json") == {"x": 1, "y/z": 2.5}
    assert read_summary(tmp_path / "absent.json") == {}


# ----------------------------------------------------------------------------- seed groups


def _write_seed(root: Path, name: str, final: float) -> Path:
    run = root / name
    run.mkdir(parents=True)
    rows = [
        {"step": 0, "eval/acc": 0.5, "loss": 0.5},
        {"step": 10, "eval/acc": final, "loss": final},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return run


def _table_row(report: Path, arm: str) -> list[str]:
    line = next(x for x in report.read_text().splitlines() if x.startswith(f"| {arm} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_group_report_keeps_intervals_of_proportions_inside_0_1(tmp_path):
    """Three seeds at accuracy 1.0, 0.9, 1.0: the t-interval is 0.9667 ± 0.1434, whose top
    (1.11) no accuracy can reach; listed as a proportion, the key's interval is cut to [0, 1].
    The same numbers under a key that is not a proportion keep the whole interval."""
    groups = {
        "seeds of one arm": [
            _write_seed(tmp_path, f"seed{i}", v) for i, v in enumerate([1.0, 0.9, 1.0])
        ]
    }
    report = make_group_report(
        groups, tmp_path / "out", ["eval/acc", "loss"], proportions={"eval/acc"}
    )
    assert (tmp_path / "out" / "comparison.png").is_file()
    arm, seeds, acc, loss = _table_row(report, "seeds of one arm")
    assert (arm, seeds) == ("seeds of one arm", "3")
    assert acc == "0.9667 [0.8232, 1]"
    assert loss == "0.9667 [0.8232, 1.11]"


def test_group_report_cuts_nothing_by_default(tmp_path):
    groups = {
        "seeds of one arm": [
            _write_seed(tmp_path, f"seed{i}", v) for i, v in enumerate([0.0, 0.1, 0.0])
        ]
    }
    report = make_group_report(groups, tmp_path / "out", ["eval/acc"])
    (_, _, acc) = _table_row(report, "seeds of one arm")
    assert acc.startswith("0.03333 [-0.")  # below 0: not declared a proportion
    report = make_group_report(groups, tmp_path / "cut", ["eval/acc"], proportions=["eval/acc"])
    assert _table_row(report, "seeds of one arm")[2] == "0.03333 [0, 0.1768]"


def _metrics_run(root: Path, name: str, rows: list[dict]) -> Path:
    """A run folder under ``root`` whose metrics.jsonl holds ``rows``."""
    folder = root / name
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_a_run_without_a_start_takes_it_from_its_seeds_start_run(tmp_path):
    """tether demo evaluates each seed's starting model once (the first arm); the other arms'
    runs log no step 0, and their curves begin at the first arm's step 0 of the same seed —
    by position, never another seed's, and never over a step 0 a run logged itself."""

    run = functools.partial(_metrics_run, tmp_path)

    first = [
        run("a0", [{"step": 0, "acc": 0.40}, {"step": 2, "acc": 0.50}]),
        run("a1", [{"step": 0, "acc": 0.45}, {"step": 2, "acc": 0.55}]),
    ]
    second = [
        run("b0", [{"step": 2, "acc": 0.70}]),
        run("b1", [{"step": 0, "acc": 0.99}, {"step": 2, "acc": 0.75}]),  # its own start stays
    ]
    third = [run("c0", [{"step": 2, "acc": 0.1}])]  # no start run at position 1 needed
    groups = {"a": first, "b": second, "c": third}
    curves = group_curves(groups, ["acc"], start_runs=first)
    assert curves["a"]["acc"] == {0: [0.40, 0.45], 2: [0.50, 0.55]}
    assert curves["b"]["acc"] == {0: [0.40, 0.99], 2: [0.70, 0.75]}
    assert curves["c"]["acc"] == {0: [0.40], 2: [0.1]}
    assert group_curves(groups, ["acc"])["b"]["acc"] == {0: [0.99], 2: [0.70, 0.75]}


def test_a_step_with_fewer_seeds_is_named_apart_from_the_curve(tmp_path):
    """The demo's start is seed 0's alone: its step 0 has one value where step 2 has two. The
    report says such a step is drawn apart (hollow, off the line) rather than joined to a curve
    of other seeds; with every step on every seed it says nothing of the kind."""

    run = functools.partial(_metrics_run, tmp_path)

    arm = [
        run("s0", [{"step": 0, "acc": 0.45}, {"step": 2, "acc": 0.50}]),
        run("s1", [{"step": 2, "acc": 0.52}]),
    ]
    assert group_curves({"a": arm}, ["acc"])["a"]["acc"] == {0: [0.45], 2: [0.50, 0.52]}
    report = make_group_report({"a": arm}, tmp_path / "few", ["acc"], proportions=["acc"])
    assert "Hollow markers" in report.read_text()
    assert (tmp_path / "few" / "comparison.png").is_file()
    even = [run("t0", [{"step": 2, "acc": 0.5}, {"step": 4, "acc": 0.6}])]
    even.append(run("t1", [{"step": 2, "acc": 0.4}, {"step": 4, "acc": 0.7}]))
    report = make_group_report({"a": even}, tmp_path / "even", ["acc"])
    assert "Hollow" not in report.read_text()
    assert _table_row(report, "a")[2].startswith("0.65 [")
