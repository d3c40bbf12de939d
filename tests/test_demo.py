"""`tether demo`: its help, and a very small run of both arms end to end."""

import json

import pytest
from typer.testing import CliRunner

from tether.cli import app

runner = CliRunner()


def test_demo_help():
    result = runner.invoke(app, ["demo", "--help"])
    assert result.exit_code == 0
    assert "--full" in result.output and "--seeds" in result.output


def test_very_small_demo_writes_the_comparison(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--seeds", "2", "--steps", "1", "--quiet"]
    for override in [
        "rl.prompts_per_step=2",
        "rl.max_new_tokens=24",
        "eval.n=2",
        "train.eval_every=1",
    ]:
        args += ["--set", override]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "report" / "comparison.png").is_file()
    table = (out / "report" / "comparison.md").read_text()
    assert "standard KL" in table and "prioritised KL" in table
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert set(summary) == {"standard KL", "prioritised KL (β_c=150)", "paired"}
    paired = summary["paired"]["prioritised KL (β_c=150)"]
    assert paired["against"] == "standard KL"
    assert set(paired["figures"]) == {"eval/acc_rl", "eval/acc_pretrain"}
    assert "paired by seed" in result.output and "points, 95% CI" in result.output
    # the prioritised arm logs its token weights, the standard arm has none
    assert "kl_weight_mean" in summary["prioritised KL (β_c=150)"]
    assert "kl_weight_mean" not in summary["standard KL"]
    rows = [
        json.loads(line)
        for line in (out / "standard-seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[0]["step"] == 0 and "eval/acc_rl" in rows[0]  # the starting model at step 0
    # evaluated once, on seed 0: no other run repeats it
    for run in ("prioritized-150-seed0", "standard-seed1", "prioritized-150-seed1"):
        other = (out / run / "metrics.jsonl").read_text().splitlines()
        assert json.loads(other[0])["step"] == 1
        assert "eval_at_start: false" in (out / run / "config.yaml").read_text()
    assert "eval_at_start: false" not in (out / "standard-seed0" / "config.yaml").read_text()


def test_the_paired_verdict_names_an_interval_of_no_width():
    """Every seed with the same difference gives a t-interval of zero width: it excludes 0 but
    says nothing of other seeds, so it is not called resolved; a spread one that excludes 0 is."""
    from tether.studies.demo import paired_sentence

    same = {"differences": [-0.005, -0.005], "mean": -0.005, "ci_low": -0.005, "ci_high": -0.005}
    line = paired_sentence("b", "a", "eval/acc_pretrain", {**same, "seeds": 2})
    assert "not resolved" in line and "no width" in line
    spread = {"differences": [0.15, 0.17], "mean": 0.16, "ci_low": 0.033, "ci_high": 0.287}
    line = paired_sentence("b", "a", "eval/acc_rl", {**spread, "seeds": 2})
    assert "resolved: the interval excludes 0" in line and "not resolved" not in line
    assert "+16.0 points, 95% CI [+3.3, +28.7] (half-width 12.7) over 2 seeds" in line


def test_demo_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "x").write_text("")
    result = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "already exists" in result.output


def test_a_demo_rerun_reuses_finished_runs_and_refuses_other_settings(tmp_path):
    """Re-running into the same folder (after an interrupt, say) trains nothing already
    finished; different settings are refused, naming the key, with nothing changed."""
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--seeds", "1", "--steps", "1", "--quiet"]
    args += ["--set", "rl.prompts_per_step=2", "--set", "rl.max_new_tokens=8", "--set", "eval.n=2"]
    assert runner.invoke(app, args).exit_code == 0
    metrics = out / "prioritized-150-seed0" / "metrics.jsonl"
    before = metrics.read_text()
    (out / "standard-seed0" / "summary.json").unlink()  # as if stopped after its last checkpoint
    (out / "standard-seed0" / "model").rename(out / "standard-seed0" / "model-old")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert metrics.read_text() == before  # the finished arm was reused, not retrained
    assert (out / "standard-seed0" / "summary.json").is_file()  # the unfinished one finished
    result = runner.invoke(app, [*args[:6], "2", *args[7:]])  # --steps 2
    assert result.exit_code == 2
    assert "already trained with train.steps=1 (now 2)" in result.output
    assert metrics.read_text() == before


def test_sweep_runs_one_arm_per_certainty_exponent(tmp_path):
    out = tmp_path / "sweep"
    args = ["demo", "--sweep", "--out", str(out), "--seeds", "1", "--steps", "1", "--quiet"]
    for override in [
        "rl.prompts_per_step=2",  # the demo's 2 minibatches need 2 rows
        "rl.max_new_tokens=8",
        "eval.n=1",
        "train.eval_every=1",
    ]:
        args += ["--set", override]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert len(summary) == 1 + 6 + 1  # the standard arm, six β_c, the paired differences
    assert len(summary["paired"]) == 6
    assert "prioritised KL (β_c=10000)" in summary and "standard KL" in summary


def test_the_demo_summary_keeps_intervals_of_proportions_inside_0_1(tmp_path):
    """summary.json's intervals across seeds: an accuracy's is cut to [0, 1] (three seeds at
    1.0, 0.9, 1.0 have a t-interval reaching 1.11), the KL's is not."""
    from tether.studies.demo import PROPORTIONS, REPORT_KEYS, _final_summary

    assert set(PROPORTIONS) <= set(REPORT_KEYS)
    runs = []
    for seed, value in enumerate([1.0, 0.9, 1.0]):
        run = tmp_path / f"standard-seed{seed}"
        run.mkdir()
        rows = [{"step": 0, "eval/acc_rl": 0.5}, {"step": 4, "eval/acc_rl": value}]
        rows.append({"step": 4, "kl_sampled": value, "accuracy": value})
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        runs.append(run)
    summary = _final_summary({"standard KL": runs})["standard KL"]
    for key in ("eval/acc_rl", "accuracy"):
        assert summary[key]["mean"] == pytest.approx(29 / 30)
        assert summary[key]["ci_low"] == pytest.approx(0.82324, abs=1e-5)
        assert summary[key]["ci_high"] == 1.0
    assert summary["kl_sampled"]["ci_high"] == pytest.approx(1.11009, abs=1e-5)


def _fake_run(folder, acc_rl, acc_pretrain):
    folder.mkdir(parents=True)
    rows = [
        {"step": 0, "eval/acc_rl": 0.4, "eval/acc_pretrain": 1.0},
        {"step": 8, "eval/acc_rl": acc_rl, "eval/acc_pretrain": acc_pretrain},
    ]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def test_paired_differences_by_hand(tmp_path):
    """Three seeds: standard 0.50 / 0.60 / 0.40, prioritised 0.55 / 0.62 / 0.47 on N+1 digits:
    differences +0.05, +0.02, +0.07, mean 0.0466..., sd 0.025166, t(0.975, 2) = 4.302653:
    half-width 0.0625148. The first arm is the base; each value is the run's last one."""
    from tether.studies.demo import paired_differences, paired_table

    std = [_fake_run(tmp_path / f"s{i}", a, 1.0) for i, a in enumerate([0.50, 0.60, 0.40])]
    pri = [
        _fake_run(tmp_path / f"p{i}", a, b)
        for i, (a, b) in enumerate([(0.55, 0.99), (0.62, 0.97), (0.47, 1.0)])
    ]
    paired = paired_differences({"standard KL": std, "prioritised KL": pri})
    assert (
        list(paired) == ["prioritised KL"] and paired["prioritised KL"]["against"] == "standard KL"
    )
    rl = paired["prioritised KL"]["figures"]["eval/acc_rl"]
    assert rl["differences"] == pytest.approx([0.05, 0.02, 0.07])
    assert rl["mean"] == pytest.approx(0.14 / 3)
    half = 4.302653 * 0.0251661 / 3**0.5
    assert rl["ci_low"] == pytest.approx(0.14 / 3 - half, abs=1e-5)
    assert rl["ci_high"] == pytest.approx(0.14 / 3 + half, abs=1e-5)
    pre = paired["prioritised KL"]["figures"]["eval/acc_pretrain"]
    assert pre["differences"] == pytest.approx([-0.01, -0.03, 0.0])
    table = paired_table(paired)
    assert "| 0 | 50.0 | 55.0 | +5.0 | 100.0 | 99.0 | -1.0 |" in table
    assert "**+4.7** [-1.6, +10.9]" in table  # 4.67 ± 6.25 points
    assert "N+1 accuracy, prioritised KL − standard KL: +4.7 points" in table
    assert "(half-width 6.3) over 3 seeds; not resolved" in table
    # a difference whose interval excludes 0 is called resolved (+8, +10, +12 points)
    shifted = zip([0.50, 0.60, 0.40], [0.08, 0.10, 0.12], strict=True)
    pri2 = [_fake_run(tmp_path / f"q{i}", a + d, 1.0) for i, (a, d) in enumerate(shifted)]
    table = paired_table(paired_differences({"standard KL": std, "prioritised KL": pri2}))
    assert "+10.0 points, 95% CI [+5.0, +15.0]" in table  # 10 ± 4.303 * 2 / sqrt(3)
    assert "N+1 accuracy, prioritised KL − standard KL: +10.0 points" in table
    assert "over 3 seeds; resolved: the interval excludes 0" in table
    # the same +10 on every seed: an interval of no width, not called resolved
    pri3 = [_fake_run(tmp_path / f"r{i}", a + 0.1, 1.0) for i, a in enumerate([0.50, 0.60, 0.40])]
    table = paired_table(paired_differences({"standard KL": std, "prioritised KL": pri3}))
    assert (
        "+10.0 points, 95% CI [+10.0, +10.0] (half-width 0.0) over 3 seeds; not resolved" in table
    )


def test_paired_figures_are_named_for_the_runs_task(tmp_path):
    """Addition's figures are named by digit counts; another task's (a chat model's word
    problems) by what they are, from the base arm's config.yaml."""
    from tether.studies.demo import paired_differences, paired_table

    std = [_fake_run(tmp_path / f"s{i}", a, 1.0) for i, a in enumerate([0.50, 0.60])]
    pri = [_fake_run(tmp_path / f"p{i}", a, 1.0) for i, a in enumerate([0.55, 0.70])]
    for run in std:
        (run / "config.yaml").write_text("task:\n  name: word-problems\n")
    table = paired_table(paired_differences({"standard KL": std, "prioritised KL": pri}))
    assert "accuracy on the RL problems, prioritised KL − standard KL: +7.5 points" in table
    assert "| seed | accuracy on the RL problems: standard KL |" in table
    assert "N+1" not in table
    for run in std:
        (run / "config.yaml").write_text("task:\n  name: addition\n")
    table = paired_table(paired_differences({"standard KL": std, "prioritised KL": pri}))
    assert "N+1 accuracy, prioritised KL − standard KL: +7.5 points" in table


def test_full_runs_the_comparison_then_the_sweep_reusing_its_runs(tmp_path):
    """--full: the two arms, then the β_c sweep over the same seeds, whose standard and
    β_c = 150 runs are the comparison's own (trained once: one folder each)."""
    out = tmp_path / "full"
    args = ["demo", "--full", "--out", str(out), "--seeds", "1", "--steps", "1", "--quiet"]
    for override in [
        "rl.prompts_per_step=1",
        "rl.minibatches=1",
        "rl.max_new_tokens=8",
        "eval.n=1",
    ]:
        args += ["--set", override]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    runs = sorted(p.name for p in out.iterdir() if p.name.endswith("-seed0"))
    assert len(runs) == 1 + 6 and "standard-seed0" in runs and "prioritized-150-seed0" in runs
    assert result.output.count("standard KL, seed 0") == 2  # asked for twice, trained once
    sweep = json.loads((out / "report-sweep" / "summary.json").read_text())
    assert len(sweep["paired"]) == 6
    main = json.loads((out / "report" / "summary.json").read_text())
    assert set(main["paired"]) == {"prioritised KL (β_c=150)"}


def _tiny_recipe(tmp_path):
    """critical-tokens at its smallest, as a file: another recipe keeps its own sizes."""
    import yaml

    from tether.config import load_recipe

    data = load_recipe("critical-tokens").model_dump(mode="json")
    data["train"] |= {"steps": 1, "eval_every": 1}
    data["rl"] |= {"prompts_per_step": 2, "max_new_tokens": 24}
    data["eval"] |= {"n": 3}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def test_the_demo_runs_any_rl_recipe_with_its_own_sizes_and_in_parallel(tmp_path):
    """--recipe: the arms of another recipe keep its steps, batch and evaluation (the demo's
    sizes would set 24 steps and 200 problems); --jobs 2 trains two runs at once, each in a
    process of its own on one thread, with the same report as one at a time."""
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--seeds", "1", "--quiet", "--jobs", "2"]
    result = runner.invoke(app, [*args, "--recipe", str(_tiny_recipe(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "standard KL, seed 0: done" in result.output
    for run in ("standard-seed0", "prioritized-150-seed0"):
        config = (out / run / "config.yaml").read_text()
        assert "steps: 1\n" in config and "n: 3\n" in config and "threads: 1\n" in config
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["paired"]["prioritised KL (β_c=150)"]["figures"]["eval/acc_rl"]["seeds"] == 1


def test_the_demo_refuses_full_with_another_recipe_and_a_missing_recipe(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--full", "--recipe", "rl-smollm2"])
    assert result.exit_code != 0 and "--full" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["demo", "--out", str(out), "--recipe", str(tmp_path / "no.yaml")])
    assert result.exit_code != 0 and "no.yaml" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_one_seed_is_never_called_resolved():
    from tether.studies.demo import paired_sentence

    one = {"mean": 0.04, "ci_low": 0.04, "ci_high": 0.04, "seeds": 1}
    line = paired_sentence("prioritised KL", "standard KL", "eval/acc_rl", one)
    assert "not resolved" in line and "one seed" in line
    two = {"mean": 0.04, "ci_low": 0.01, "ci_high": 0.07, "seeds": 2, "differences": [0.02, 0.06]}
    assert "resolved: the interval excludes 0" in paired_sentence("a", "b", "eval/acc_rl", two)


def test_a_control_arm_is_paired_against_both_other_arms(tmp_path):
    """--control-kl-coef adds a uniform tether as loose on average as the prioritised one: the
    report pairs every arm against the standard KL, and the prioritised arm against the
    control too (by hand: 0.55 − 0.52, 0.62 − 0.58, 0.47 − 0.45 = +3, +4, +2 points)."""
    from tether.studies.demo import write_report

    std = [_fake_run(tmp_path / f"s{i}", a, 1.0) for i, a in enumerate([0.50, 0.60, 0.40])]
    ctl = [_fake_run(tmp_path / f"c{i}", a, 1.0) for i, a in enumerate([0.52, 0.58, 0.45])]
    pri = [_fake_run(tmp_path / f"p{i}", a, 1.0) for i, a in enumerate([0.55, 0.62, 0.47])]
    groups = {"standard KL": std, "standard KL (α=2.5)": ctl, "prioritised KL": pri}
    write_report(groups, tmp_path / "report", "t", control="standard KL (α=2.5)")
    paired = json.loads((tmp_path / "report" / "summary.json").read_text())["paired"]
    assert list(paired) == [
        "standard KL (α=2.5)",
        "prioritised KL",
        "prioritised KL against standard KL (α=2.5)",
    ]
    against = paired["prioritised KL against standard KL (α=2.5)"]
    assert (against["arm"], against["against"]) == ("prioritised KL", "standard KL (α=2.5)")
    assert against["figures"]["eval/acc_rl"]["differences"] == pytest.approx([0.03, 0.04, 0.02])
    assert against["figures"]["eval/acc_rl"]["mean"] == pytest.approx(0.03)
    assert paired["prioritised KL"]["against"] == "standard KL"
    table = (tmp_path / "report" / "paired.md").read_text()
    assert "## prioritised KL − standard KL (α=2.5), paired by seed" in table
    assert "## prioritised KL − standard KL, paired by seed" in table


def test_a_control_arm_runs_at_its_own_coefficient(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--seeds", "1", "--steps", "1", "--quiet"]
    args += ["--control-kl-coef", "2.5"]
    for override in ["rl.prompts_per_step=2", "rl.max_new_tokens=8", "eval.n=2"]:
        args += ["--set", override]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "kl_coef: 2.5" in (out / "standard-kl2.5-seed0" / "config.yaml").read_text()
    assert "kl_coef: 5.0" in (out / "standard-seed0" / "config.yaml").read_text()
    assert "prioritised KL (β_c=150) − standard KL (α=2.5), paired by seed" in result.output
    refused = runner.invoke(app, ["demo", "--sweep", "--control-kl-coef", "2.5", "--out", str(out)])
    assert refused.exit_code == 2 and "--control-kl-coef" in refused.output
    assert "Traceback" not in refused.output
