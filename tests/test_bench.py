"""`tether bench rl`: the same tiny RL job in tether and in TRL, figures as JSON."""

import json

import pytest
from typer.testing import CliRunner

from tether.cli import app

runner = CliRunner()


def test_bench_rl_json_tiny_job():
    pytest.importorskip("trl")
    args = [
        "bench",
        "rl",
        "--prompts",
        "1",
        "--group",
        "2",
        "--max-new-tokens",
        "8",
        "--steps",
        "1",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # one JSON document, nothing else
    assert doc["tether"]["completions_per_s"] > 0 and doc["trl_grpo"]["completions_per_s"] > 0
    assert doc["ratio"] == pytest.approx(
        doc["tether"]["completions_per_s"] / doc["trl_grpo"]["completions_per_s"]
    )
    split = doc["tether"]["split"]
    assert 0.0 < split["sample_s"] + split["reference_s"] + split["update_s"] <= 1.0 + 1e-6


def test_bench_imitation_reports_ratios():
    from tether.bench.trl import bench_imitation

    result = bench_imitation(steps=1, batch_size=4)
    assert set(result["step_s"]) == {"mle", "iqlearn", "iqlearn_online"}
    assert result["objective_ratio"] > 0 and result["step_ratio"]["mle"] == 1.0
