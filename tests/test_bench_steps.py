"""`tether bench steps` and `tether bench trl` at the tiniest settings, and the FLOP count
they rest on checked against analytic counts. No timed assertions."""

import json

import pytest
import torch
from typer.testing import CliRunner

from tether.bench.measure import count_flops, llama_flops
from tether.cli import app
from tether.models.loading import build_model, char_tokenizer

runner = CliRunner()
TINY = ["--width", "32", "--layers", "1", "--batch-size", "4", "--group", "2"]
TINY += ["--max-new-tokens", "8", "--steps", "1", "--threads", "1"]


def _run(*args):
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # one JSON document, nothing else


def test_bench_steps_json_every_stage_in_process():
    doc = _run("steps", *TINY, "--in-process", "--json")
    assert [r["stage"] for r in doc["stages"]] == ["mle", "iqlearn", "rl", "dpo"]
    peak = doc["peak_matmul"]["flops_per_s"]
    for r in doc["stages"]:
        assert r["tokens_per_s"] > 0 and r["flops_per_step"] > 0
        assert r["flops_per_s"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"])
        assert r["peak_fraction"] == pytest.approx(r["flops_per_s"] / peak)
        assert r["memory"]["peak_mb"] >= r["memory"]["before_mb"] > 0
    rl = next(r for r in doc["stages"] if r["stage"] == "rl")
    assert rl["rows"] == 4 and 0 < rl["split"]["sample_s"] < 1
    # the peak is the best of torch.mm and, on a CPU with oneDNN, its packed product, named
    p = doc["peak_matmul"]
    rates = {"torch.mm": max(p["by_size"].values())}
    if "packed_by_size" in p:
        rates["oneDNN packed"] = max(p["packed_by_size"].values())
        assert p["packed_by_size"].keys() == p["by_size"].keys()
    assert peak == max(rates.values()) and p["kernel"] == max(rates, key=rates.__getitem__)
    dpo = next(r for r in doc["stages"] if r["stage"] == "dpo")
    assert dpo["rows"] == 8  # 4 pairs, chosen and rejected rows


def test_bench_steps_isolated_stage_and_profile():
    doc = _run("steps", *TINY, "--stage", "mle", "--profile", "--json")
    (mle,) = doc["stages"]
    assert "fresh process" in mle["memory"]["method"]
    shares = mle["profile"]
    parts = ("matmul", "attention", "other_ops", "python_and_overhead")
    assert sum(shares[k] for k in parts) == pytest.approx(1.0) and shares["matmul"] > 0
    assert shares["matmul_peak_fraction"] > 0 and shares["attention_peak_fraction"] > 0
    assert 0 < mle["attention_flops_share"] < 1


def test_bench_steps_bf16_runs_the_forward_passes_under_autocast():
    """--precision bf16: the policy and the reference score under bf16 autocast (as
    train.precision bf16 trains), and the peak they are held to is bf16's."""
    from tether.bench.steps import StepsJob, build_stage_run, stage_recipe

    job = StepsJob(threads=1, batch_size=2, precision="bf16")
    assert stage_recipe("dpo", job).train.precision == "bf16"
    run = build_stage_run("dpo", job)
    ids = torch.tensor([[5, 6, 7]])
    assert run.model(input_ids=ids).logits.dtype == torch.bfloat16
    assert run.stage.reference(input_ids=ids).logits.dtype == torch.bfloat16
    doc = _run("steps", *TINY, "--stage", "dpo", "--in-process", "--precision", "bf16", "--json")
    assert doc["job"]["precision"] == "bf16" and doc["peak_matmul"]["dtype"] == "bfloat16"
    assert doc["stages"][0]["tokens_per_s"] > 0
    bad = runner.invoke(app, ["bench", "steps", "--precision", "fp16"])
    assert bad.exit_code == 2 and "--precision 'fp16'" in bad.output


@pytest.mark.parametrize("setting", ["false", "true"])
def test_bench_onednn_linear_reaches_tethers_recipes_and_the_machine_line(setting):
    """--onednn-linear: train.onednn_linear on tether's side of every bench job (steps, trl,
    rl), and the machine line says what its fp32 linear layers ran on."""
    from tether.bench.steps import StepsJob, build_stage_run, stage_recipe
    from tether.bench.trl import RLJob, rl_recipe
    from tether.models import onednn_linear

    on = setting == "true"
    job = StepsJob(threads=1, batch_size=2, onednn_linear=setting)
    assert stage_recipe("mle", job).train.onednn_linear is on
    rl_job = RLJob(onednn_linear=setting).resolved()
    assert rl_recipe(rl_job).train.onednn_linear is on
    run = build_stage_run("dpo", job)
    for model in (run.model, run.stage.reference):
        forwards = {getattr(m.forward, "__func__", None) for m in model.modules()
                    if type(m) is torch.nn.Linear}  # fmt: skip
        assert (forwards == {onednn_linear._forward}) is on
    doc = _run("steps", *TINY, "--stage", "dpo", "--in-process", "--onednn-linear", setting,
               "--json")  # fmt: skip
    assert doc["job"]["onednn_linear"] == setting
    assert doc["machine"]["fp32_linear"] == ("oneDNN" if on else "torch")
    bad = runner.invoke(app, ["bench", "trl", "--onednn-linear", "yes"])
    assert bad.exit_code == 2 and "--onednn-linear 'yes'" in bad.output


def test_bench_steps_bad_model_in_a_fresh_process_is_one_line(tmp_path):
    # the stage is built in a child process; its input error still reaches the command line
    result = runner.invoke(
        app, ["bench", "steps", "--model", str(tmp_path / "none"), "--steps", "1"]
    )
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: checkpoint") and "Traceback" not in result.output


def test_bench_steps_rejects_an_unknown_stage():
    result = runner.invoke(app, ["bench", "steps", "--stage", "ppo"])
    assert result.exit_code == 2 and "--stage 'ppo'" in result.output


def test_flop_count_of_a_linear_layer_forward_and_backward():
    layer = torch.nn.Linear(24, 40, bias=True)
    x = torch.randn(7, 24, requires_grad=True)
    flops, _ = count_flops(lambda: layer(x).sum().backward())
    # forward, gradient of the input, gradient of the weight: 2·B·in·out each
    assert flops == 3 * 2 * 7 * 24 * 40


def test_flop_count_of_a_llama_training_step_matches_the_analytic_count():
    torch.manual_seed(0)
    model = build_model(char_tokenizer(), "llama", n_layer=2, n_head=4, n_embd=32)
    ids = torch.randint(3, 90, (3, 17))

    def step():
        model(input_ids=ids).logits.logsumexp(-1).sum().backward()

    flops, _ = count_flops(step)
    # attention included: without the CPU attention formulas the count would fall short.
    # Some transformers versions (5.17) build RoPE's angle table as one matmul of the
    # frequencies [D/2, 1] by the positions [1, L] (2·L·D/2 FLOPs, positions shared by the
    # batch), others (5.24) without one.
    rope_table = 2 * 17 * (model.config.hidden_size // model.config.num_attention_heads // 2)
    assert flops - llama_flops(model.config, 3, 17, training=True) in (0, rope_table)


def test_bench_trl_tiny_jobs_report_ratios():
    pytest.importorskip("trl")
    args = ["--batch-size", "2", "--prompts", "1", "--group", "2", "--max-new-tokens", "8"]
    doc = _run("trl", *args, "--steps", "1", "--threads", "1", "--json")
    assert set(doc["results"]) == {"sft", "rl", "dpo"}
    for r in doc["results"].values():
        assert r["ratio"] == pytest.approx(
            r["tether"]["examples_per_s"] / r["trl"]["examples_per_s"]
        )
        assert r["ratios"] == [r["ratio"]]


def test_bench_trl_rounds_report_the_median_round(monkeypatch):
    """--rounds N: every job N times; the reported round is the median one by ratio, whole
    (its ratio is its own sides' ratio), and every round's ratio is listed, smallest first."""
    from tether.bench import steps as bench_steps

    times = iter([(1.0, 2.0), (1.0, 5.0), (2.0, 3.0)])  # (tether, TRL) median steps

    def fake_round(name, job, prompts):
        ours, theirs = next(times)
        tether, trl = {"median_step_s": ours}, {"median_step_s": theirs}
        return {"tether": tether, "trl": trl, "ratio": theirs / ours}

    monkeypatch.setattr(bench_steps, "_trl_round", fake_round)
    out = bench_steps.bench_trl(bench_steps.StepsJob(threads=1), ("sft",), rounds=3)
    r = out["results"]["sft"]
    assert r["ratios"] == [1.5, 2.0, 5.0] and out["job"]["rounds"] == 3
    assert r["ratio"] == 2.0 and r["tether"]["median_step_s"] == 1.0
    with pytest.raises(ValueError, match="rounds"):
        bench_steps.bench_trl(bench_steps.StepsJob(threads=1), ("sft",), rounds=0)
