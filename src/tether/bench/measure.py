"""What a benchmark measures besides time: matrix-multiply FLOPs (``FlopCounterMode``, with
the CPU attention kernels torch's table misses), the machine's peak matmul FLOP/s, peak memory,
and a profile of where a step's wall time goes.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils import flop_counter

from tether.models.onednn_linear import cpuinfo_field, wanted

# ---------------------------------------------------------------- the machine


def machine(onednn_linear: bool | str = False) -> dict[str, Any]:
    """What ran the benchmark, for its table: the CPU's name (``/proc/cpuinfo``), its cores,
    the vector units torch dispatches to, and which bf16 units it has (AMX tiles,
    avx512_bf16, or none: bf16 matmuls are several times fp32's with them and far slower
    without), the torch version, what tether's fp32 linear layers multiply through under
    ``train.onednn_linear`` = ``onednn_linear`` (:mod:`tether.models.onednn_linear`) and,
    where one is used, the GPU."""
    name = cpuinfo_field("model name") or platform.processor() or platform.machine()
    units = [
        unit
        for unit, present in (
            ("amx", torch.cpu._is_amx_tile_supported()),
            ("avx512_bf16", torch.cpu._is_avx512_bf16_supported()),
        )
        if present
    ]
    out: dict[str, Any] = {
        "cpu": name,
        "cores": os.cpu_count(),
        "vector_units": torch.backends.cpu.get_cpu_capability(),
        "bf16_units": units,
        "torch": torch.__version__,
        # what tether's fp32 linear layers multiply through here under that setting (bf16
        # goes through oneDNN everywhere)
        "fp32_linear": "oneDNN" if wanted(onednn_linear) else "torch",
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def machine_line(info: dict[str, Any]) -> str:
    """:func:`machine` in one line: ``AMD EPYC, 2 cores, AVX512, bf16 units: avx512_bf16``."""
    units = ", ".join(info["bf16_units"]) or "none"
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    linear = f", fp32 linear layers: {info['fp32_linear']}" if "fp32_linear" in info else ""
    return (
        f"{info['cpu']}, {info['cores']} cores, {info['vector_units']}, bf16 units: {units}, "
        f"torch {info['torch']}{gpu}{linear}"
    )


# ---------------------------------------------------------------- FLOPs


def _register_cpu_flops() -> None:
    """FlopCounterMode counts SDPA through its CUDA kernels' ops only; on CPU attention runs
    as ``_scaled_dot_product_flash_attention_for_cpu`` (and its backward), which it would
    count as 0. Register them with torch's own SDPA formulas (the full L×L square). Likewise
    oneDNN's linear (``mkldnn._linear_pointwise``, fp32 linear layers on the CPU,
    :mod:`tether.models.onednn_linear`): 2 FLOPs per multiply-add, input columns times
    output entries."""
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry:
        return

    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):

        @flop_counter.register_flop_formula(torch.ops.mkldnn._linear_pointwise)
        def _linear(input_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
            return 2 * math.prod(out_shape) * input_shape[-1]

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(  # type: ignore[no-untyped-def]
        grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
    ) -> int:
        return flop_counter.sdpa_backward_flop_count(
            grad_out_shape, query_shape, key_shape, value_shape
        )


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Matrix-multiply FLOPs of ``fn()`` (forward and backward) and its result."""
    kinds, result = count_flops_by_kind(fn)
    return sum(kinds.values()), result


def count_flops_by_kind(fn: Callable[[], Any]) -> tuple[dict[str, int], Any]:
    """:func:`count_flops` split into ``attention`` (SDPA kernels, forward and backward) and
    ``matmul`` (every other counted op: the linear layers' mm/addmm, bmm)."""
    _register_cpu_flops()
    with flop_counter.FlopCounterMode(display=False) as counter:
        result = fn()
    kinds = {"matmul": 0, "attention": 0}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        kind = "attention" if is_attention(str(op)) else "matmul"
        kinds[kind] += int(flops)
    return kinds, result


def llama_flops(config: Any, rows: int, length: int, training: bool = False) -> int:
    """Analytic matrix-multiply FLOPs of a Llama forward over ``rows`` × ``length`` positions
    (logits at every position), counted as FlopCounterMode counts them: 2 per multiply-add,
    attention as the full L×L square. ``training``: forward and backward, 3× the linear
    layers' forward (input and weight gradients) and 3.5× attention's (its backward
    recomputes the scores: five products to the forward's two)."""
    h = config.hidden_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    inter = config.intermediate_size
    per_layer = h * heads * d + 2 * h * kv_heads * d + heads * d * h + 3 * h * inter
    linear = 2 * rows * length * (config.num_hidden_layers * per_layer + h * config.vocab_size)
    attention = rows * config.num_hidden_layers * 4 * heads * length * length * d
    return 3 * linear + 7 * attention // 2 if training else linear + attention


# ---------------------------------------------------------------- peak matmul FLOP/s


def peak_matmul(
    threads: int,
    device: str = "cpu",
    sizes: tuple[int, ...] = (512, 1024, 2048),
    seconds: float = 0.3,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """The best FLOP/s of n×n ``dtype`` products at this thread count, over torch's GEMM paths:
    ``torch.mm`` and, on a CPU with oneDNN, the oneDNN-packed product the sampler multiplies
    by (:class:`tether.generation.weights.Linear`). Each is timed for about ``seconds`` per
    size in repeats of several products, and the best repeat counts. The packed path matters
    off Intel: on a 2-core AMD EPYC with avx512_bf16, ``torch.mm`` in fp32 (MKL) reached
    237-243 GFLOP/s and oneDNN's packed product 546-560 (bf16: 1,032-1,068 and 1,080-1,120),
    so a bound from ``torch.mm`` alone put the fp32 sampler at 108-154% of it."""
    from tether.generation.weights import Linear

    torch.set_num_threads(threads)
    dev = torch.device(device)
    by_size: dict[str, float] = {}
    packed_by_size: dict[str, float] = {}
    for n in sizes:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        out = torch.empty(n, n, device=dev, dtype=dtype)
        mm = partial(torch.mm, a, b, out=out)
        by_size[str(n)] = 2 * n**3 / _best_time(mm, n, dev, seconds)
        packed = Linear(b, rows=n)  # packed only where oneDNN takes it (a CPU, large enough)
        if packed.packed is not None:
            product = partial(packed, a)
            packed_by_size[str(n)] = 2 * n**3 / _best_time(product, n, dev, seconds)
    mm_best = max(by_size.values())
    packed_best = max(packed_by_size.values(), default=0.0)
    return {
        "flops_per_s": max(mm_best, packed_best),
        "by_size": by_size,
        **({"packed_by_size": packed_by_size} if packed_by_size else {}),
        "threads": threads,
        "dtype": str(dtype).removeprefix("torch."),
        "kernel": "oneDNN packed" if packed_best > mm_best else "torch.mm",
    }


def _best_time(product: Callable[[], Any], n: int, dev: torch.device, seconds: float) -> float:
    """The best seconds per call of ``product`` (n×n by n×n), over repeats of several calls
    for about ``seconds`` after one warm-up call."""
    product()
    reps = max(1, int(2e8 / (2 * n**3)))  # about 0.2 GFLOP per repeat
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        t0 = time.perf_counter()
        for _ in range(reps):
            product()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


# ---------------------------------------------------------------- memory


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryProbe:
    """Peak memory over a stretch of work: RSS on CPU, allocated tensor bytes on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated over the timed steps"
            return
        self.before = (_proc_status_kb("VmRSS") or 0) * 1024
        try:  # Linux >= 4.0: reset VmHWM (the peak RSS) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "peak RSS (VmHWM) of a fresh process over the timed steps"
        except OSError:
            self.method = "peak RSS (ru_maxrss) of a fresh process since it started"

    def stop(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _proc_status_kb("VmHWM")
            if hwm is not None and "VmHWM" in self.method:
                peak = hwm * 1024
            else:  # kilobytes on Linux
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        mb = 1024 * 1024
        return {
            "method": self.method,
            "peak_mb": peak / mb,
            "before_mb": self.before / mb,
            "step_mb": max(peak - self.before, 0) / mb,
        }


# ---------------------------------------------------------------- profile


MATMUL_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::addbmm",
    "mkldnn::_linear_pointwise",  # fp32 linear layers (tether.models.onednn_linear), sampler
}


def is_attention(op_name: str) -> bool:
    """An attention kernel (SDPA and its CPU/CUDA variants), by its op or profiler name."""
    return "attention" in op_name or "scaled_dot_product" in op_name


def profile_breakdown(fn: Callable[[], Any]) -> tuple[dict[str, float], Any]:
    """Where one call of ``fn`` spends its wall time, from ``torch.profiler``: the self time
    of matrix multiplies, of attention kernels, of every other aten op (elementwise,
    reductions, copies, indexing), and the rest (Python, dispatch, the profiler's own cost;
    under torch.compile also the fused kernels, which the profiler does not see as ops), as
    fractions of the profiled wall time; and the result of ``fn``."""
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    wall = time.perf_counter() - t0
    parts = {"matmul": 0.0, "attention": 0.0, "other_ops": 0.0}
    for event in prof.key_averages():
        if not event.key.startswith(("aten::", "mkldnn::")):
            continue
        seconds = event.self_cpu_time_total / 1e6
        if is_attention(event.key):
            parts["attention"] += seconds
        elif event.key in MATMUL_OPS:
            parts["matmul"] += seconds
        else:
            parts["other_ops"] += seconds
    shares = {k: v / wall for k, v in parts.items()}
    shares["python_and_overhead"] = max(0.0, 1.0 - sum(shares.values()))
    shares["profiled_wall_s"] = wall
    return shares, result
