"""``tether bench sampler``: tether's KV-cache sampler against ``model.generate``, and each
against its bound, on any model (:mod:`tether.bench.models`).

The job: ``batch`` prompts of the model's task (its RL distribution, through the chat template
on a chat model), greedy decoding of exactly ``new_tokens`` tokens per row on both sides
(tether with ``ignore_eos``, ``generate`` with ``min_new_tokens == max_new_tokens``), so both do
the same work. Each side gets one warm-up call, reported apart as ``first_call_s`` (tether's
includes preparing its weights, :mod:`tether.generation.weights`, which later calls on the
unchanged model reuse: tether's model is frozen, as a model that only samples can be;
``generate`` runs its own copy, not frozen, its faster setting), then
``repeats`` timed runs, sides alternating; the figure is the median run's tokens/s. With
``precision`` bf16, tether samples the fp32 model with bf16 arithmetic
(``sample(dtype=bfloat16)``, as ``train.precision: bf16``) and ``generate`` runs a bf16 copy
of the model (``model.to(bfloat16)``, as a user would).

The bound (a roofline, :func:`decode_bound`): every decode step must read the weights the step
multiplies by and the KV cache its rows attend to (bytes / memory bandwidth) and do its
matrix-multiply FLOPs (FLOPs / peak matmul FLOP/s); the step takes at least the larger of the two.
The prefill is held to its FLOPs. Both count each row's real prompt tokens: the left-padding of a
batch is work the job does not ask for. Bandwidth: the best of several copies of a 256 MiB tensor
(read + write); peak: :func:`tether.bench.measure.peak_matmul` at the same thread count and dtype.
``of_bound`` = the bound's time over the measured time (1 = at the bound).
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tether.bench.measure import machine, peak_matmul
from tether.bench.models import bench_target
from tether.generation.sampler import pad_id, sample
from tether.models.loading import load_model_and_tokenizer
from tether.tasks import task_from_config


@dataclass(frozen=True)
class SamplerJob:
    model: str = "addition-n3"
    batch: int = 16
    new_tokens: int = 64
    repeats: int = 3
    threads: int = 2
    precision: str = "fp32"  # or bf16 (module docstring)
    seed: int = 0
    generate: bool = True  # also time model.generate


def memory_bandwidth(threads: int, mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s of the best ``copy_`` of a ``mib`` MiB fp32 tensor (each copy reads and writes
    it: 2 × its size)."""
    torch.set_num_threads(threads)
    n = mib * 1024 * 1024 // 4
    a, b = torch.ones(n), torch.empty(n)
    b.copy_(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / best


def decode_bound(
    config: Any,
    prompt_lens: Sequence[int],
    new_tokens: int,
    bytes_per_value: int,
    flops_per_s: float,
    bytes_per_s: float,
) -> dict[str, float]:
    """The least time a Llama-shaped model can take to prefill one prompt per row, of
    ``prompt_lens`` tokens (the real tokens: padding is work the job does not ask for), and
    decode ``new_tokens`` tokens a row (module docstring): seconds of the prefill (FLOPs), of
    the decode steps (each the larger of its bytes and its FLOPs), and the decode steps'
    FLOPs and bytes. Weights and cache in ``bytes_per_value`` bytes."""
    h = config.hidden_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    layers, inter, vocab = config.num_hidden_layers, config.intermediate_size, config.vocab_size
    per_layer = h * heads * d + 2 * h * kv_heads * d + heads * d * h + 3 * h * inter
    matrices = layers * per_layer + h * vocab  # what a step multiplies by (LM head included)
    batch, tokens = len(prompt_lens), sum(prompt_lens)
    attention = 4 * layers * heads * d  # FLOPs per query and key

    prefill = 2 * tokens * matrices + attention * sum(n * n for n in prompt_lens)
    decode_s = decode_flops = decode_bytes = 0.0
    for t in range(1, new_tokens):  # the prefill yields the first token's logits
        context = tokens + batch * t  # keys attended to this step, over all rows
        step_flops = 2 * batch * matrices + attention * context
        cache = layers * 2 * kv_heads * d * context
        step_bytes = (matrices + cache) * bytes_per_value
        decode_s += max(step_flops / flops_per_s, step_bytes / bytes_per_s)
        decode_flops += step_flops
        decode_bytes += step_bytes
    return {
        "prefill_s": prefill / flops_per_s,
        "decode_s": decode_s,
        "total_s": prefill / flops_per_s + decode_s,
        "decode_flops": decode_flops,
        "decode_bytes": decode_bytes,
    }


def _prompts(job: SamplerJob, tokenizer: Any) -> list[str]:
    from tether.config import load_recipe

    target = bench_target(job.model)
    recipe = load_recipe(None, [f"model.init={target.init}", *target.task])
    task = task_from_config(recipe.task, job.seed)
    rng = random.Random(job.seed)
    return [task.model_input(tokenizer, task.rl_problem(rng)) for _ in range(job.batch)]


def bench_sampler(job: SamplerJob) -> dict[str, Any]:
    """Both sides of the job, their ratio, and each against the bound (module docstring)."""
    if job.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {job.precision!r}: choose fp32 or bf16")
    torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    model, tokenizer = load_model_and_tokenizer(bench_target(job.model).init)
    prompts = _prompts(job, tokenizer)
    bf16 = job.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else None
    n = job.new_tokens

    def run_tether() -> int:
        out = sample(model, tokenizer, prompts, max_new_tokens=n, ignore_eos=True, dtype=dtype)
        return int(out.completion_mask.sum())

    # generate runs its own copy, in bf16 as a user would load it for bf16, its weights'
    # requires_grad as loaded: on a frozen model torch's matmul copies the LM head for every
    # row of the prefill's last position (F.linear of a non-contiguous 3-D input by a weight
    # without grad), which made generate 2.3x slower on SmolLM2 in bf16
    side: Any = None
    if job.generate:
        side = copy.deepcopy(model)
        if bf16:
            side = side.to(torch.bfloat16)
    model.requires_grad_(False)  # tether's: a model that only samples (prepared weights reused)
    padding = tokenizer.padding_side
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)  # as sample() encodes them
    tokenizer.padding_side = padding

    def run_generate() -> int:
        out = side.generate(
            **enc,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=pad_id(tokenizer),
        )
        return int(out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1]))

    sides = {"tether": run_tether, **({"generate": run_generate} if job.generate else {})}
    times: dict[str, list[float]] = {name: [] for name in sides}
    tokens: dict[str, int] = {}
    first: dict[str, float] = {}
    for name, fn in sides.items():  # warm-up: tether prepares the weights the others reuse
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    for _ in range(job.repeats):
        for name, fn in sides.items():  # alternating
            t0 = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t0)

    value_bytes = 2 if bf16 else 4
    peak = peak_matmul(job.threads, dtype=torch.bfloat16 if bf16 else torch.float32)
    bandwidth = memory_bandwidth(job.threads)
    prompt_len = int(enc["input_ids"].shape[1])
    lens = [int(x) for x in enc["attention_mask"].sum(1)]
    bound = decode_bound(model.config, lens, n, value_bytes, peak["flops_per_s"], bandwidth)
    result: dict[str, Any] = {
        "job": {
            **asdict(job),
            "prompt_tokens": prompt_len,  # the padded width
            "prompt_lens": [min(lens), max(lens)],  # the shortest and longest real prompt
            "threads": torch.get_num_threads(),
        },
        "machine": machine(),
        "peak_matmul_flops_per_s": peak["flops_per_s"],
        "memory_bytes_per_s": bandwidth,
        "bound": bound,
    }
    for name in sides:
        median = statistics.median(times[name])
        result[name] = {
            "tokens_per_s": tokens[name] / median,
            "median_s": median,
            "times_s": times[name],
            "first_call_s": first[name],
            "of_bound": bound["total_s"] / median,
        }
    if job.generate:
        result["ratio"] = result["tether"]["tokens_per_s"] / result["generate"]["tokens_per_s"]
    return result
