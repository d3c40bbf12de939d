"""`tether study collapse` end to end at a toy size: every arm trains, every checkpoint and the
final model are judged exactly against the same target, and the report names each arm."""

import json

import pytest
from typer.testing import CliRunner

from tether.cli import app
from tether.studies.collapse import COLLAPSE_ARMS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_study_collapse_end_to_end(tmp_path):
    out = tmp_path / "collapse"
    args = ["study", "collapse", "--out", str(out), "--steps", "4", "--eval-every", "2"]
    args += ["--quiet", "--set", "dpg.samples_per_step=8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert all(arm in report for arm in COLLAPSE_ARMS) and (out / "collapse.png").is_file()
    data = json.loads((out / "results.json").read_text())
    for rows in data["curves"].values():
        assert [r["step"] for r in rows] == [0, 2, 4]
        # step 0 is the reference itself: the same figures for every arm
        assert rows[0] == data["curves"]["DPG β=0.1"][0]
        assert all(r["entropy"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows)
    # the target judged against itself: both KLs vanish
    assert data["target"]["kl_target_policy"] == pytest.approx(0.0, abs=1e-9)
