"""``tether bench``: speed benchmarks (:mod:`tether.bench`) that print figures."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from tether.bench.measure import machine_line
from tether.bench.models import bench_target
from tether.bench.precision import PrecisionJob, bench_precision
from tether.bench.sampler import SamplerJob, bench_sampler
from tether.bench.steps import BENCHED_STAGES, TRL_JOBS, StepsJob, bench_steps, bench_trl
from tether.bench.trl import RLJob, bench_imitation, bench_rl
from tether.cli.common import UsageError, choices, echo_json, friendly_errors
from tether.models.onednn_linear import SETTINGS as ONEDNN_SETTINGS

app = typer.Typer(
    add_completion=False, help="Speed benchmarks that print figures.", no_args_is_help=True
)


def require_trl(command: str) -> None:
    """TRL is optional (``tether[bench]``): say how to get it, without importing it."""
    if importlib.util.find_spec("trl") is None:
        raise UsageError(f"tether bench {command} needs TRL: pip install 'tether[bench]'")


def parse_device(name: str) -> str:
    """``auto`` (CUDA when there is one), ``cpu`` or ``cuda``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return name


@app.command("imitation")
@friendly_errors
def bench_imitation_command(
    steps: Annotated[int, typer.Option(min=1, help="timed repeats of each variant")] = 20,
    batch_size: Annotated[int, typer.Option(min=2)] = 64,
    json_: Annotated[bool, typer.Option("--json", help="print JSON only")] = False,
) -> None:
    """What IQLearn costs over MLE: the objective alone on one batch, and whole steps
    (offline and online IQLearn), on the imitation-multistep model."""
    result = bench_imitation(steps=steps, batch_size=batch_size)
    if json_:
        echo_json(result)
        return
    o = result["objective_s"]
    typer.echo(
        f"objective (forward+loss+backward, same batch of {batch_size}): "
        f"MLE {o['mle'] * 1e3:.1f} ms, IQLearn {o['iqlearn'] * 1e3:.1f} ms, "
        f"ratio {result['objective_ratio']:.3f}"
    )
    for name, sec in result["step_s"].items():
        typer.echo(
            f"step {name:>15}: {sec * 1e3:7.1f} ms  {result['tokens_per_s'][name]:9.0f} tokens/s"
            f"  x{result['step_ratio'][name]:.3f} of MLE"
        )


# options the `bench` commands share
BenchModel = Annotated[
    str,
    typer.Option(
        help="the policy and reference: a shipped or installed model name (tether models; "
        "smollm2 for short), a checkpoint or a Hugging Face folder; the jobs take the task "
        "that suits it (addition for an addition checkpoint, word problems through the chat "
        "template for a chat model)"
    ),
]
BenchGroup = Annotated[int, typer.Option(min=2, help="RL: completions per prompt")]
BenchMaxNew = Annotated[
    int | None,
    typer.Option(
        min=1, help="RL: completion length (default: 300 on addition, 24 on a chat model)"
    ),
]
BenchLora = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="LoRA rank on both sides, 0 = every weight trains (default: 8 on a chat "
        "model, as its recipes, else 0)",
    ),
]
BenchSteps = Annotated[int, typer.Option(min=1, help="timed steps, after one warm-up step")]
BenchThreads = Annotated[int, typer.Option(min=1, help="torch threads")]
JsonOnly = Annotated[bool, typer.Option("--json", help="print the figures as JSON only")]
# options of `bench trl`
TrlCompile = Annotated[
    bool,
    typer.Option(
        "--compile", help="SFT and DPO: torch.compile on both sides (TRL's torch_compile)"
    ),
]
Rounds = Annotated[
    int,
    typer.Option(
        min=1, help="run each job this many times, the sides alternating; report the median"
    ),
]
OneDNNLinear = Annotated[
    str,
    typer.Option(
        "--onednn-linear",
        help="tether's train.onednn_linear: false (its default), true (fp32 linear layers "
        "through oneDNN), or auto (on CPUs with AVX-512 not made by Intel)",
    ),
]
BenchCompile = Annotated[
    bool, typer.Option("--compile", help="train.compile: torch.compile, two warm-up steps")
]
# options of `bench steps`
StageNames = Annotated[
    list[str] | None, typer.Option(help="mle, iqlearn, rl or dpo; repeat it (default all)")
]
Width = Annotated[
    int | None, typer.Option(min=8, help="a random Llama of this width instead of --model")
]
Layers = Annotated[int, typer.Option(min=1, help="with --width: its layers")]
StepsBatch = Annotated[
    int | None,
    typer.Option(
        min=2,
        help="sequences per step (RL: completions; DPO: pairs; default: 64 on addition, 16 on "
        "a chat model)",
    ),
]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda")]
Isolate = Annotated[
    bool,
    typer.Option(
        "--isolate/--in-process",
        help="each stage in a fresh process (honest peak memory) or all in this one",
    ),
]
Profile = Annotated[
    bool, typer.Option(help="also profile one step: time in matmuls, attention, the rest")
]
Precision = Annotated[str, typer.Option(help="fp32, or bf16: the forward passes under autocast")]


@app.command("rl")
@friendly_errors
def bench_rl_command(
    model: BenchModel = "addition-n3",
    prompts: Annotated[int, typer.Option(min=1, help="prompts per step")] = 8,
    group: Annotated[int, typer.Option(min=2, help="completions per prompt")] = 4,
    max_new_tokens: BenchMaxNew = None,
    temperature: Annotated[float, typer.Option(min=0.0)] = 1.0,
    steps: Annotated[int, typer.Option(min=1, help="timed steps, after one warm-up step")] = 3,
    lora: BenchLora = None,
    precision: Precision = "fp32",
    onednn_linear: OneDNNLinear = "false",
    json_: Annotated[bool, typer.Option("--json", help="print the figures as JSON")] = False,
) -> None:
    """The same GRPO job in tether (rl.algorithm grpo) and in TRL's GRPOTrainer:
    completions/s and their ratio."""
    require_trl("rl")
    (precision,) = choices("--precision", [precision], ("fp32", "bf16"))
    (onednn_linear,) = choices("--onednn-linear", [onednn_linear], ONEDNN_SETTINGS)
    bench_target(model)  # a bad --model: one line, before anything loads
    job = RLJob(model, prompts, group, max_new_tokens, temperature, steps)
    result = bench_rl(
        dataclasses.replace(job, lora=lora, precision=precision, onednn_linear=onednn_linear)
    )
    if json_:
        echo_json(result)
        return
    split = result["tether"]["split"]
    typer.echo(
        f"tether: {result['tether']['completions_per_s']:.2f} completions/s "
        f"(sampling {split['sample_s']:.0%}, reference {split['reference_s']:.0%}, update {split['update_s']:.0%})\n"
        f"TRL GRPOTrainer: {result['trl_grpo']['completions_per_s']:.2f} completions/s\n"
        f"ratio: {result['ratio']:.2f}x\n"
        f"machine: {machine_line(result['machine'])}"
    )


@app.command("steps")
@friendly_errors
def bench_steps_command(
    stage: StageNames = None,
    model: BenchModel = "addition-n3",
    width: Width = None,
    layers: Layers = 4,
    batch_size: StepsBatch = None,
    group: BenchGroup = 4,
    max_new_tokens: BenchMaxNew = None,
    steps: BenchSteps = 3,
    threads: BenchThreads = 2,
    device: Device = "auto",
    isolate: Isolate = True,
    profile: Profile = False,
    compile_: BenchCompile = False,
    precision: Precision = "fp32",
    onednn_linear: OneDNNLinear = "false",
    lora: BenchLora = None,
    json_: JsonOnly = False,
) -> None:
    """One whole training step of each stage (MLE, IQLearn, RL with sampling and reference
    scoring, DPO): tokens/s, achieved matmul FLOP/s (FlopCounterMode), its share of this
    machine's measured peak matmul FLOP/s (fp32, or bf16 with --precision bf16) at the same
    thread count, and peak memory."""
    stages = choices("--stage", stage, BENCHED_STAGES)
    if width is not None and width % 8:
        raise UsageError(
            f"--width {width}: must be a multiple of 8 (4 attention heads, each of an even size)"
        )
    (precision,) = choices("--precision", [precision], ("fp32", "bf16"))
    (onednn_linear,) = choices("--onednn-linear", [onednn_linear], ONEDNN_SETTINGS)
    if width is None:
        bench_target(model)  # a bad --model: one line, before any process starts
    job = StepsJob(
        model,
        batch_size,
        group,
        max_new_tokens,
        steps,
        threads,
        0,
        parse_device(device),
        compile_,
        precision,
        lora,
        onednn_linear,
    )
    try:
        result = bench_steps(
            job, stages, isolate=isolate, profile=profile, width=width, layers=layers
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    if json_:
        echo_json(result)
    else:
        print_steps(result)


@app.command("trl")
@friendly_errors
def bench_trl_command(
    job: Annotated[
        list[str] | None, typer.Option(help="sft, rl or dpo; repeat it (default all three)")
    ] = None,
    model: BenchModel = "addition-n3",
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=2, help="SFT: sequences, DPO: pairs (default: 64 on addition, 16 on a chat model)"
        ),
    ] = None,
    prompts: Annotated[int, typer.Option(min=1, help="RL: prompts per step")] = 8,
    group: BenchGroup = 4,
    max_new_tokens: BenchMaxNew = None,
    steps: BenchSteps = 3,
    threads: BenchThreads = 2,
    lora: BenchLora = None,
    precision: Precision = "fp32",
    onednn_linear: OneDNNLinear = "false",
    compile_: TrlCompile = False,
    rounds: Rounds = 1,
    json_: JsonOnly = False,
) -> None:
    """tether against TRL on the same jobs, one side right after the other: SFT (SFTTrainer
    vs the mle stage), RL (GRPOTrainer vs the rl stage with GRPO, as `bench rl`) and DPO
    (DPOTrainer vs the dpo stage). Same model (and LoRA adapters), examples, order, batch and
    precision, no gradient checkpointing. Prints examples/s of whole steps and the ratio
    tether / TRL (with --rounds, the median round and every round's ratio)."""
    require_trl("trl")
    jobs = choices("--job", job, TRL_JOBS)
    (precision,) = choices("--precision", [precision], ("fp32", "bf16"))
    (onednn_linear,) = choices("--onednn-linear", [onednn_linear], ONEDNN_SETTINGS)
    bench_target(model)  # a bad --model: one line, before anything loads
    spec = StepsJob(
        model,
        batch_size,
        group,
        max_new_tokens,
        steps,
        threads,
        compile=compile_,
        precision=precision,
        lora=lora,
        onednn_linear=onednn_linear,
    )
    result = bench_trl(spec, jobs, prompts=prompts, rounds=rounds)
    if json_:
        echo_json(result)
    else:
        print_trl(result)


@app.command("sampler")
@friendly_errors
def bench_sampler_command(
    model: BenchModel = "addition-n3",
    batch: Annotated[int, typer.Option(min=1, help="prompts, decoded together")] = 16,
    new_tokens: Annotated[int, typer.Option(min=1, help="tokens per row (greedy)")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="timed runs of each side")] = 3,
    threads: BenchThreads = 2,
    precision: Annotated[
        str, typer.Option(help="fp32, or bf16: tether samples in bf16, generate a bf16 copy")
    ] = "fp32",
    generate: Annotated[
        bool, typer.Option("--generate/--no-generate", help="also time model.generate")
    ] = True,
    json_: JsonOnly = False,
) -> None:
    """tether's KV-cache sampler against model.generate on the same greedy job (every row
    decodes --new-tokens tokens), and each against the decode bound (the larger of the weights
    and KV-cache bytes over the memory bandwidth and the FLOPs over the peak matmul rate)."""
    (precision,) = choices("--precision", [precision], ("fp32", "bf16"))
    bench_target(model)  # a bad --model: one line, before anything loads
    job = SamplerJob(model, batch, new_tokens, repeats, threads, precision, generate=generate)
    result = bench_sampler(job)
    if json_:
        echo_json(result)
        return
    bound, (shortest, longest) = result["bound"], result["job"]["prompt_lens"]
    typer.echo(
        f"{model}: batch {batch} × {new_tokens} new tokens (greedy), prompts of "
        f"{shortest}–{longest} tokens, {precision}, {threads} thread(s)"
    )
    for name in ("tether", "generate"):
        if name in result:
            r = result[name]
            typer.echo(
                f"{name:>9}: {r['tokens_per_s']:8.1f} tokens/s  (median of {repeats}: "
                f"{r['median_s']:.2f} s, {r['of_bound']:.0%} of the bound; first call "
                f"{r['first_call_s']:.2f} s)"
            )
    if "ratio" in result:
        typer.echo(f"    ratio: {result['ratio']:.2f}× generate")
    typer.echo(
        f"    bound: {bound['total_s']:.3f} s (prefill {bound['prefill_s']:.3f} s); peak "
        f"matmul {result['peak_matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, memory "
        f"{result['memory_bytes_per_s'] / 1e9:.1f} GB/s"
    )
    typer.echo(f"  machine: {machine_line(result['machine'])}")


@app.command("precision")
@friendly_errors
def bench_precision_command(
    model: BenchModel = "smollm2",
    prompts: Annotated[int, typer.Option(min=1, help="prompts, one completion each")] = 16,
    new_tokens: Annotated[int, typer.Option(min=1, help="tokens per completion")] = 24,
    temperature: Annotated[float, typer.Option(min=0.01, help="sampling and scoring")] = 1.0,
    noise: Annotated[
        float, typer.Option(min=0.0, help="π_θ: the model with this much relative weight noise")
    ] = 0.02,
    threads: BenchThreads = 2,
    json_: JsonOnly = False,
) -> None:
    """What bf16 does to per-token log-probs and to the KL estimates k1/k2/k3, against fp32 on
    the same sampled tokens: the bf16 autocast forward (scoring, training) and the bf16
    sampler."""
    bench_target(model)  # a bad --model: one line, before anything loads
    job = PrecisionJob(model, prompts, new_tokens, temperature, noise, threads)
    result = bench_precision(job)
    if json_:
        echo_json(result)
        return
    typer.echo(
        f"{result['job']['model']}: {result['job']['tokens']} sampled tokens at T = "
        f"{temperature}; π_θ = the model with {noise} relative weight noise"
    )
    for way in ("fp32", "bf16_forward", "bf16_sampler"):
        r = result[way]
        e, kl, zero = r["logp_error"], r["kl"], r["kl_against_fp32_reference_at_step_0"]
        typer.echo(
            f"{way:>13}: |Δlog π| mean {e['mean']:.1e} p99 {e['p99']:.1e} max {e['max']:.1e}; "
            f"KL k1 {kl['k1']:.2e} k2 {kl['k2']:.2e} k3 {kl['k3']:.2e}; vs an fp32 reference "
            f"at step 0: k1 {zero['k1']:.1e} k3 {zero['k3']:.1e}"
        )


def print_steps(result: dict[str, Any]) -> None:
    """The ``bench steps`` figures as a table (rich)."""
    job, peak = result["job"], result["peak_matmul"]
    table = Table(
        title=f"tether bench steps: {job['model']}, {job['threads']} thread(s), {job['device']}, "
        f"{job['precision']}"
    )
    for name in ("stage", "rows×len", "tokens/s", "step", "GFLOP/s", "of peak", "memory", "+step"):
        table.add_column(name, justify="right")
    for r in result["stages"]:
        mem = r.get("memory", {})
        table.add_row(
            r["stage"],
            f"{r['rows']}×{r['padded_length']:.0f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['step_s']:.2f} s",
            f"{r['flops_per_s'] / 1e9:.1f}",
            f"{r['peak_fraction']:.0%}",
            f"{mem['peak_mb']:,.0f} MB" if mem else "",
            f"{mem['step_mb']:,.0f} MB" if mem else "",
        )
    console = Console()
    console.print(table)
    sizes = ", ".join(f"{n}: {f / 1e9:.0f}" for n, f in peak["by_size"].items())
    console.print(
        f"peak: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s, the best {peak['dtype']} product of n×n "
        f"matrices, by {peak['kernel']} (torch.mm's GFLOP/s by n: {sizes}) at "
        f"{peak['threads']} thread(s)"
    )
    console.print(
        "tokens: real tokens (prompt + completion) of whole steps; of peak: GFLOP/s over the "
        f"peak matmul FLOP/s; FLOPs: {result['flops']}"
    )
    console.print(f"machine: {machine_line(result['machine'])}")
    memories = {r["memory"]["method"] for r in result["stages"] if "memory" in r}
    for method in sorted(memories):
        console.print(f"memory: {method}; +step: the peak less the resident size before them")
    for r in result["stages"]:
        if "split" in r:
            s = r["split"]
            console.print(
                f"rl: sampling {s['sample_s']:.0%}, reference scoring {s['reference_s']:.0%} "
                f"of the step"
            )
        if "profile" in r:
            p = r["profile"]
            console.print(
                f"{r['stage']} profile: matmul {p['matmul']:.0%} of the step (at "
                f"{p['matmul_peak_fraction']:.0%} of peak), attention {p['attention']:.0%} (at "
                f"{p['attention_peak_fraction']:.0%}), other ops {p['other_ops']:.0%}, Python "
                f"and overhead {p['python_and_overhead']:.0%}"
            )


def print_trl(result: dict[str, Any]) -> None:
    """The ``bench trl`` figures as a table (rich)."""
    job = result["job"]
    table = Table(title=f"tether vs TRL: {job['model']}, {job['threads']} thread(s)")
    for name in ("job", "TRL trainer", "tether examples/s", "TRL examples/s", "ratio"):
        table.add_column(name, justify="right")
    rounds = job.get("rounds", 1) > 1
    if rounds:
        table.add_column("every round", justify="right")
    for name, r in result["results"].items():
        cells = [
            name,
            result["trl_trainers"][name],
            f"{r['tether']['examples_per_s']:.2f}",
            f"{r['trl']['examples_per_s']:.2f}",
            f"{r['ratio']:.2f}×",
        ]
        if rounds:
            cells.append(" ".join(f"{x:.2f}×" for x in r["ratios"]))
        table.add_row(*cells)
    console = Console()
    console.print(table)
    if rounds:
        console.print(
            "with --rounds: the median round by ratio (the lower middle of an even count)"
        )
    console.print(
        "examples: sequences (SFT), completions (RL), pairs (DPO) per second of the median "
        "whole training step after the warm-up; ratio = TRL's median step / tether's; "
        f"{result['kl']}"
    )
    console.print(f"machine: {machine_line(result['machine'])}")
