"""``tether bench precision``: what bf16 does to the log-probs and the KL estimates, against
fp32 on the same tokens.

Completions are sampled once from the model in fp32 at temperature T; then, on exactly those
tokens, the per-token log-probs log π(a_t|s_t) at T are computed three ways:

* ``fp32``: the model's forward in fp32 (the reference figures);
* ``bf16_forward``: the forward under bf16 autocast, as ``train.precision: bf16`` scores the
  policy and the reference (matmuls in bf16, logits rounded to bf16, log-softmax in fp32);
* ``bf16_sampler``: the KV-cache sampler's own bf16 arithmetic (``sample(dtype=bfloat16)``),
  fed the same tokens one at a time: what the rollout's log-probs would be if the sampler's
  were used as they are.

A policy π_θ that has moved off the reference is stood in for by the model with Gaussian noise
on its weights (``noise`` × each tensor's RMS): its fp32 KL to the model is of the size an RL
run reaches. For each way the figures are: the per-token error |Δ log π| against fp32 (mean,
99th percentile, max), the KL estimators k1, k2, k3 (means over tokens, and k1 summed per
sequence) of π_θ against π_ref with both scored that way, and at step 0 (π_θ = π_ref, so
the true KL is 0) with the policy scored that way against an fp32 reference: the KL that
mixing precisions invents. Also PPO/GRPO's first ratio ρ = π_bf16/π_fp32: its spread and the
share of tokens outside a clip band of ±0.2.

On a CPU without bf16 units torch's bf16 matrix multiply is some 40× slower than fp32 (no
native kernel): there the bf16 products are computed as bf16 hardware computes them (the
bf16 inputs, exact in fp32, multiplied with fp32 accumulation, the result rounded to bf16
once) by fp32 kernels (:class:`EmulatedBF16Matmuls`); the result says which.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tether.bench.models import bench_target
from tether.config import load_recipe
from tether.engine.precision import cpu_has_bf16_units
from tether.generation.runners import make_runner
from tether.generation.sampler import sample
from tether.models.loading import load_model_and_tokenizer
from tether.objectives.common import token_logprobs
from tether.objectives.kl import kl_estimate
from tether.tasks import task_from_config

WAYS = ("fp32", "bf16_forward", "bf16_sampler")
_MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
}


class EmulatedBF16Matmuls(TorchDispatchMode):
    """Inside it, a matrix multiply of bf16 tensors runs as fp32 kernels on the same (bf16,
    so exactly representable) values and its result is rounded to bf16 once: what a bf16
    GEMM with fp32 accumulation returns, up to the order of the sums (module docstring)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        bf16 = [isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args]
        if func not in _MATMULS or not any(bf16):
            return func(*args, **kwargs)
        up = [a.float() if is_bf16 else a for a, is_bf16 in zip(args, bf16, strict=True)]
        return func(*up, **kwargs).to(torch.bfloat16)


@dataclass(frozen=True)
class PrecisionJob:
    model: str = "smollm2"
    prompts: int = 16
    new_tokens: int = 24
    temperature: float = 1.0
    noise: float = 0.02  # π_θ = the model with N(0, (noise·RMS)²) added to every weight
    threads: int = 2
    seed: int = 0
    emulate: bool | None = None  # EmulatedBF16Matmuls; None: where the CPU has no bf16 units


@torch.no_grad()
def forward_logprobs(
    model: Any, ids: torch.Tensor, attention: torch.Tensor, prompt_len: int, t: float, bf16: bool
) -> torch.Tensor:
    """log π(a_t|s_t) [B, T] of the completion tokens (columns from ``prompt_len`` on) from
    one forward pass, fp32 or under bf16 autocast."""
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    logits = logits[:, prompt_len - 1 : -1]
    return token_logprobs(logits, ids[:, prompt_len:], t)


@torch.no_grad()
def sampler_logprobs(
    model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor, t: float
) -> torch.Tensor:
    """log π(a_t|s_t) [B, T] of ``tokens`` under the sampler's bf16 runner, teacher-forced:
    prefill the prompts, then feed the given tokens one at a time."""
    lens = prompt_mask.sum(1).tolist()
    runner = make_runner(model, True, prompt_mask, lens, tokens.shape[1] + 1, torch.bfloat16)
    logits = runner.prefill(prompt_ids)
    out = []
    for step in range(tokens.shape[1]):
        out.append(token_logprobs(logits, tokens[:, step], t))
        logits = runner.step(tokens[:, step])
    return torch.stack(out, dim=1)


def _error(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    d = (a - b).abs()[mask]
    return {
        "mean": float(d.mean()),
        "p99": float(d.quantile(0.99)),
        "max": float(d.max()),
    }


def _kls(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    real = mask.float()
    out = {
        k: float((kl_estimate(logp, ref, k) * real).sum() / real.sum())  # type: ignore[arg-type]
        for k in ("k1", "k2", "k3")
    }
    out["k1_sequence"] = float(((logp - ref) * real).sum(1).mean())
    return out


def bench_precision(job: PrecisionJob) -> dict[str, Any]:
    """The figures of the module docstring, as a dict (``--json``)."""
    torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    target = bench_target(job.model)
    reference, tokenizer = load_model_and_tokenizer(target.init)
    policy, _ = load_model_and_tokenizer(target.init)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(job.noise * p.float().square().mean().sqrt() * torch.randn_like(p))
    recipe = load_recipe(None, [f"model.init={target.init}", *target.task])
    task = task_from_config(recipe.task, job.seed)
    rng = random.Random(job.seed)
    prompts = [task.model_input(tokenizer, task.rl_problem(rng)) for _ in range(job.prompts)]
    generator = torch.Generator().manual_seed(job.seed)
    out = sample(
        policy,
        tokenizer,
        prompts,
        max_new_tokens=job.new_tokens,
        temperature=job.temperature,
        generator=generator,
    )
    ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    attention = torch.cat([out.prompt_mask, out.completion_mask], 1)
    mask = out.completion_mask.bool()
    P, t = out.prompt_ids.shape[1], job.temperature

    emulate = not cpu_has_bf16_units() if job.emulate is None else job.emulate
    bf16_mode = EmulatedBF16Matmuls() if emulate else contextlib.nullcontext()
    logp: dict[str, dict[str, torch.Tensor]] = {}
    for name, model in (("policy", policy), ("reference", reference)):
        logp[name] = {"fp32": forward_logprobs(model, ids, attention, P, t, bf16=False)}
        with bf16_mode:
            logp[name]["bf16_forward"] = forward_logprobs(model, ids, attention, P, t, bf16=True)
            logp[name]["bf16_sampler"] = sampler_logprobs(
                model, out.prompt_ids, out.prompt_mask, out.completion_ids, t
            )
    pol, ref = logp["policy"], logp["reference"]
    result: dict[str, Any] = {
        "job": {**asdict(job), "tokens": int(mask.sum()), "model": target.init},
        "bf16_matmuls": "emulated: fp32 kernels, bf16 inputs, result rounded to bf16"
        if emulate
        else "native",
        # the fp32 sampler's own log-probs against the fp32 forward: the floor of op order
        "fp32_sampler_error": _error(out.logprobs, pol["fp32"], mask),
    }
    for way in WAYS:
        ratio = (pol[way] - pol["fp32"]).exp()[mask]
        result[way] = {
            "logp_error": _error(pol[way], pol["fp32"], mask),
            "kl": _kls(pol[way], ref[way], mask),
            # step 0: π_θ = π_ref, the policy scored this way, the reference in fp32
            "kl_against_fp32_reference_at_step_0": _kls(ref[way], ref["fp32"], mask),
            "ratio_to_fp32": {
                "mean_abs_deviation": float((ratio - 1).abs().mean()),
                "outside_clip_0.2": float(((ratio - 1).abs() > 0.2).float().mean()),
            },
        }
    return result
