"""``tether bench steps`` and ``tether bench trl``: what one training step of each stage costs.

``bench steps`` runs whole training steps of the MLE, IQLearn, RL and DPO stages (batch +
forward + backward + gradient clipping + AdamW, as the training loop does them; for RL the
rollout sampling and the reference scoring too) and reports, per stage:

* **tokens/s**: real tokens of the batch (prompt + completion, padding excluded; DPO counts
  both responses of every pair) per second of whole steps, after one warm-up step;
* **FLOP/s**: matrix-multiply FLOPs of a step (``torch.utils.flop_counter.FlopCounterMode``
  on one extra step, attention counted as the full L×L square as torch counts it on CUDA;
  the CPU flash-attention kernel, which torch's table misses, is registered here with the
  same formula), per token, times tokens/s;
* **% of peak**: that FLOP/s over the measured peak: the best fp32 ``torch.mm`` FLOP/s of
  large square matrices at the same thread count (:func:`tether.bench.measure.peak_matmul`);
* **memory**: on CPU the peak resident set size (``VmHWM``) of a fresh process per stage
  during its timed steps (the peak is reset after the warm-up step through
  ``/proc/self/clear_refs``), beside the resident size before them; on CUDA
  ``torch.cuda.max_memory_allocated`` over the timed steps.

``bench trl`` runs the same job in tether and in TRL, one after the other in one process, and
prints the throughput ratio: SFT (``SFTTrainer`` vs the mle stage), RL (``GRPOTrainer`` vs the
rl stage with GRPO, :func:`tether.bench.trl.bench_rl`) and DPO (``DPOTrainer`` vs the dpo stage).
Same model (with the same LoRA adapters where there are any), same examples in the same order,
same batch, same precision (fp32, or bf16 autocast on both sides), no gradient checkpointing.

Any model tether loads can be benchmarked; the jobs draw their data from the task that suits
it (:mod:`tether.bench.models`: addition for an addition checkpoint, one-digit word problems
through the chat template for a chat model such as SmolLM2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from tether.bench.measure import (
    MemoryProbe,
    count_flops_by_kind,
    machine,
    peak_matmul,
    profile_breakdown,
)
from tether.bench.models import bench_target
from tether.bench.trl import (
    KL_COEF,
    RLJob,
    StepTimer,
    bench_rl,
    lora_overrides,
    rl_overrides,
    run_trl,
    trl_args,
    trl_peft_config,
)
from tether.config import Recipe, RecipeError, load_recipe
from tether.engine.allocator import keep_freed_memory
from tether.engine.checkpoints import save_checkpoint
from tether.engine.faults import gradient_norm
from tether.engine.precision import check_precision
from tether.engine.setup import build_policy, make_optimizer, prepare_models
from tether.models.loading import (
    ModelLoadError,
    build_model,
    char_tokenizer,
    load_model_and_tokenizer,
)
from tether.stages.base import Stage, make_stage
from tether.tasks import task_from_config

# the stages `tether bench steps` times (one of each kind of batch: demonstrations, rollouts, pairs)
BENCHED_STAGES = ("mle", "iqlearn", "rl", "dpo")
TRL_JOBS = ("sft", "rl", "dpo")


@dataclass(frozen=True)
class StepsJob:
    """The settings every stage's job shares."""

    model: str = "addition-n3"  # the policy (and the reference: RL, DPO): bench.models
    # rows per step: sequences (MLE, IQLearn), completions (RL), pairs (DPO); None: the model's
    batch_size: int | None = None
    group: int = 4  # RL: completions per prompt (batch_size / group prompts per step)
    max_new_tokens: int | None = None  # RL: completion length limit (None: the model's default)
    steps: int = 3  # timed steps, after one warm-up step
    threads: int = 2
    seed: int = 0
    device: str = "cpu"
    compile: bool = False  # train.compile: the policy and the reference through torch.compile
    precision: str = "fp32"  # train.precision: bf16 runs the forward passes under autocast
    lora: int | None = None  # LoRA rank (0: every weight trains; None: the model's default)
    onednn_linear: str = "false"  # train.onednn_linear: fp32 linear layers through oneDNN

    @property
    def rows(self) -> int:
        """The batch size of a resolved job (:meth:`resolved`)."""
        if self.batch_size is None:
            raise ValueError("the job's batch size is not resolved: call resolved() first")
        return self.batch_size

    def resolved(self) -> StepsJob:
        """The job with the model's defaults filled in (batch size, completion length, LoRA
        rank); a ModelLoadError (one line) when ``model`` names no model."""
        target = bench_target(self.model)
        return dataclasses.replace(
            self,
            batch_size=self.batch_size or target.default_batch_size,
            max_new_tokens=self.max_new_tokens or target.default_max_new_tokens,
            lora=target.default_lora if self.lora is None else self.lora,
        )


def warmup_steps(job: StepsJob) -> int:
    """Untimed steps first: one, or two when compiling (dynamo compiles a second graph for
    another class of shapes, past a size guard, on an early step)."""
    return 2 if job.compile else 1


def stage_recipe(stage: str, job: StepsJob) -> Recipe:
    """The recipe of one stage's job: the ``critical-tokens`` recipe (AdamW, gradient clipping
    at 1) on ``job.model`` with the task that suits it (:mod:`tether.bench.models`), its LoRA
    adapters, and the stage's own settings."""
    job = job.resolved()
    assert job.max_new_tokens is not None and job.lora is not None
    target = bench_target(job.model)
    common = [f"model.init={target.init}", f"seed={job.seed}", f"train.threads={job.threads}"]
    common += [f"train.precision={job.precision}", f"train.compile={job.compile}"]
    common += [f"train.onednn_linear={job.onednn_linear}"]
    common += lora_overrides(job.lora)
    if stage in ("mle", "iqlearn"):
        extra = [*target.task, f"train.stage={stage}", f"train.batch_size={job.rows}"]
    elif stage == "rl":
        if job.rows % job.group:
            raise ValueError(f"batch size {job.rows} is not a multiple of group {job.group}")
        extra = target.task + rl_overrides(
            job.rows // job.group, job.group, job.max_new_tokens, temperature=1.0
        )
    elif stage == "dpo":
        extra = ["train.stage=dpo", *target.dpo_task, f"train.batch_size={job.rows}"]
    else:
        raise ValueError(f"unknown stage {stage!r}: choose from {', '.join(BENCHED_STAGES)}")
    return load_recipe("critical-tokens", [*common, *extra])


@dataclass
class StageRun:
    """A stage ready to step: the policy, its stage, optimizer and trainable parameters."""

    model: Any
    stage: Stage[Any]
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    grad_clip: float | None
    device: torch.device

    def step(self) -> Any:
        """One training step as :func:`tether.engine.loop.train` takes it; returns the batch."""
        batch = self.stage.next_batch()
        for part in self.stage.updates(batch):
            loss, _ = self.stage.loss(self.model, part)
            loss.backward()
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            else:
                gradient_norm(self.params)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return batch


def build_stage_run(stage: str, job: StepsJob) -> StageRun:
    recipe = stage_recipe(stage, job)
    device = torch.device(job.device)
    check_precision(recipe.train.precision, device)
    torch.manual_seed(job.seed)
    model, tokenizer = build_policy(recipe)
    model.to(device)  # type: ignore[arg-type]
    model.train()
    runner = make_stage(recipe, tokenizer, model, device)
    prepare_models(model, runner, recipe, device)  # train.precision, train.compile
    optimizer = make_optimizer(model, recipe, runner.parameters())
    params = [p for p in model.parameters() if p.requires_grad] + list(runner.parameters())
    return StageRun(model, runner, optimizer, params, recipe.optim.grad_clip, device)


def batch_shape(batch: Any) -> tuple[int, int]:
    """(rows, padded length) of a stage's batch."""
    ids = batch.input_ids if hasattr(batch, "input_ids") else batch.tokens.input_ids
    return int(ids.shape[0]), int(ids.shape[1])


# ---------------------------------------------------------------- one stage's job


def run_stage(
    stage: str, job: StepsJob, *, flops: bool = True, memory: bool = True, profile: bool = False
) -> dict[str, Any]:
    """Build one stage, take a warm-up step, time ``job.steps`` steps, then count the FLOPs of
    one more step (and profile one more with ``profile``). Call it in a fresh process for an
    honest peak memory (:func:`bench_steps` does)."""
    torch.set_num_threads(job.threads)
    run = build_stage_run(stage, job)
    t0 = time.perf_counter()
    for _ in range(warmup_steps(job)):
        run.step()
    warmup = time.perf_counter() - t0
    probe = MemoryProbe(run.device)
    if memory:
        probe.start()
    seconds, cpu, tokens, rows, lengths = [], [], [], [], []
    split = {"sample_s": 0.0, "reference_s": 0.0}
    for _ in range(job.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        batch = run.step()
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        tokens.append(batch.num_tokens)
        n, length = batch_shape(batch)
        rows.append(n)
        lengths.append(length)
        for key in split:
            split[key] += run.stage.last_timing.get(key, 0.0)
    elapsed = sum(seconds)
    result: dict[str, Any] = {
        "stage": stage,
        "rows": rows[0],
        "padded_length": statistics.mean(lengths),
        "tokens_per_step": statistics.mean(tokens),
        "seconds": elapsed,
        "step_s": statistics.median(seconds),
        "cpu_s": sum(cpu),
        "tokens_per_s": sum(tokens) / elapsed,
        "threads": job.threads,
        "warmup_s": warmup,
    }
    if stage == "rl":
        result["split"] = {k: v / elapsed for k, v in split.items()}
    if memory:
        result["memory"] = probe.stop()
    if flops or profile:
        kinds, batch = count_flops_by_kind(run.step)
        counted = sum(kinds.values())
        per_token = counted / batch.num_tokens
        result.update(
            flops_per_step=counted,
            flops_per_token=per_token,
            flops_per_s=per_token * result["tokens_per_s"],
            attention_flops_share=kinds["attention"] / counted,
        )
    if profile:
        profiled, batch = profile_breakdown(run.step)
        shares: dict[str, Any] = dict(profiled)
        # FLOP/s inside each kind of kernel: its FLOPs (per token, from the counted step,
        # times this step's tokens) over its self time in the profile
        for kernel, kernel_flops in kinds.items():
            seconds = shares[kernel] * shares["profiled_wall_s"]
            share_per_token = kernel_flops / counted * per_token
            shares[f"{kernel}_flops_per_s"] = share_per_token * batch.num_tokens / seconds
        result["profile"] = shares
    return result


def _child(
    send: Any, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    os.dup2(2, 1)  # a child's prints go to stderr: stdout carries the figures only
    keep_freed_memory()  # as the tether command does (a fresh process, not its child)
    try:
        send.send(("ok", fn(*args, **kwargs)))
    except (ModelLoadError, RecipeError) as err:  # bad input: the parent raises it as it is
        send.send(("input", err))
    except BaseException:  # the parent raises it with the child's traceback
        send.send(("error", traceback.format_exc()))
    finally:
        send.close()


@contextlib.contextmanager
def _fresh_processes() -> Iterator[Callable[..., Any]]:
    """Run functions each in a fresh process, forked from a server that has only imported
    the libraries (no model loaded, no thread pool started), or spawned where there is no
    fork server. Yields ``call(fn, *args, **kwargs) -> fn(*args, **kwargs)``."""
    methods = multiprocessing.get_all_start_methods()
    ctx: Any = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["torch", "transformers", "tether.bench.steps"])

    def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        recv, send = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_child, args=(send, fn, args, kwargs))
        process.start()
        send.close()
        try:
            kind, value = recv.recv()
        except EOFError:
            process.join()
            raise RuntimeError(
                f"the benchmark process died (exit code {process.exitcode})"
            ) from None
        finally:
            recv.close()
        process.join()
        if kind == "input":
            raise value
        if kind == "error":
            raise RuntimeError(f"in the benchmark process:\n{value}")
        return value

    yield call


def bench_steps(
    job: StepsJob,
    stages: tuple[str, ...] = BENCHED_STAGES,
    *,
    isolate: bool = True,
    profile: bool = False,
    peak_sizes: tuple[int, ...] = (512, 1024, 2048),
    width: int | None = None,
    layers: int = 4,
) -> dict[str, Any]:
    """Each stage's job (in a fresh process with ``isolate``), the measured peak matmul
    FLOP/s, and each stage's share of it. With ``width``, the model is not ``job.model`` but a
    random Llama of that width and ``layers`` layers (:func:`random_checkpoint`)."""
    results = []
    with bench_model(job.model, width, layers) as path:
        job = dataclasses.replace(job, model=path).resolved()
        if isolate:
            with _fresh_processes() as call:
                for stage in stages:
                    results.append(call(run_stage, stage, job, profile=profile))
        else:
            for stage in stages:
                results.append(run_stage(stage, job, profile=profile))
    # bf16: the forward passes' matmuls run in bf16, so that is the peak they are held to
    dtype = torch.bfloat16 if job.precision == "bf16" else torch.float32
    peak = peak_matmul(job.threads, job.device, peak_sizes, dtype=dtype)
    for r in results:
        r["peak_fraction"] = r["flops_per_s"] / peak["flops_per_s"]
        if "profile" in r:
            for kind in ("matmul", "attention"):
                rate = r["profile"][f"{kind}_flops_per_s"]
                r["profile"][f"{kind}_peak_fraction"] = rate / peak["flops_per_s"]
    described = {**dataclasses.asdict(job), "torch": torch.__version__}
    if width is not None:
        described["model"] = f"random llama, width {width}, {layers} layers"
    return {
        "job": described,
        "machine": machine(job.onednn_linear),
        "peak_matmul": peak,
        "stages": results,
        "flops": "matrix multiplies (FlopCounterMode), attention as the full L x L square",
    }


# ---------------------------------------------------------------- a model of another size


def random_checkpoint(folder: Path, width: int, layers: int = 4) -> Path:
    """A randomly initialised Llama with the character tokenizer, saved as a checkpoint for
    the addition task (N = 3): ``addition-n3``'s shape at another width, to see how the
    FLOP/s fraction grows with the matrices. Heads of 64 dimensions from width 256 up,
    otherwise 4 heads."""
    heads = width // 64 if width >= 256 and width % 64 == 0 else 4
    if width % heads or (width // heads) % 2:
        raise ValueError(f"width {width} is not a multiple of {heads} heads of an even size")
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = build_model(tokenizer, "llama", layers, heads, width, 1024)
    path = folder / f"llama-w{width}-l{layers}"
    meta = {
        "description": "random init (tether bench)",
        "task": {"name": "addition", "max_digits": 3},
    }
    save_checkpoint(model, tokenizer, path, meta)
    return path


@contextlib.contextmanager
def bench_model(model: str, width: int | None, layers: int) -> Iterator[str]:
    """``model`` itself, or with ``width`` a random checkpoint of that width in a temporary
    folder that lives as long as the context."""
    if width is None:
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
        yield str(random_checkpoint(Path(tmp), width, layers))


# ---------------------------------------------------------------- against TRL


def _tether_side(stage: str, job: StepsJob) -> dict[str, Any]:
    result = run_stage(stage, job, flops=False, memory=False)
    return {
        "median_step_s": result["step_s"],
        "seconds": result["seconds"],
        "cpu_s": result["cpu_s"],
        "tokens_per_s": result["tokens_per_s"],
    }


def _problems(stage: str, job: StepsJob) -> tuple[Any, list[Any]]:
    """The examples the stage draws over the warm-up and timed steps, in order."""
    recipe = stage_recipe(stage, job)
    _, tokenizer = load_model_and_tokenizer(bench_target(job.model).init)
    task = task_from_config(recipe.task, recipe.seed)
    rng = random.Random(recipe.seed)  # the stage's own stream
    steps = job.steps + warmup_steps(job)
    problems = [task.pretrain_problem(rng) for _ in range(job.rows * steps)]
    return tokenizer, [(task.model_input(tokenizer, p), p) for p in problems]


def _run_trl_job(
    job: StepsJob, stage: str, columns: dict[str, Callable[[Any], str]], kind: str, **extra: Any
) -> dict[str, Any]:
    """TRL's ``{kind}Trainer`` (SFT or DPO) on ``stage``'s examples, in the same order and
    batches: a dataset with one column per entry of ``columns`` (the prompt, then each
    ``columns[name](problem)``), the shared TrainingArguments plus ``extra``, a policy (and
    for DPO a frozen reference, or with LoRA the adapters switched off) loaded from the same
    checkpoint, with tether's LoRA adapters where tether's side has them."""
    import trl  # an optional dependency (tether[bench]): only this side needs it

    tokenizer, problems = _problems(stage, job)
    data = {"prompt": [p for p, _ in problems]}
    data.update({name: [get(x) for _, x in problems] for name, get in columns.items()})
    config = getattr(trl, f"{kind}Config")(
        **trl_args(job, warmup_steps(job)),
        per_device_train_batch_size=job.rows,
        max_length=None,
        torch_compile=job.compile,
        **extra,
    )
    # loaded as tether loads it: a Hugging Face folder, or an installed model's GGUF file
    init = bench_target(job.model).init
    models = {"model": load_model_and_tokenizer(init)[0]}
    if kind == "DPO" and not job.lora:  # with LoRA, TRL's reference is the adapters off
        models["ref_model"] = load_model_and_tokenizer(init)[0]
    timer = StepTimer()
    trainer = getattr(trl, f"{kind}Trainer")(
        **models,
        args=config,
        train_dataset=Dataset.from_dict(data),
        processing_class=tokenizer,
        callbacks=[timer],
        peft_config=trl_peft_config(job.lora or 0),
    )
    return run_trl(trainer, timer, warmup_steps(job))


def trl_sft(job: StepsJob) -> dict[str, Any]:
    """TRL's ``SFTTrainer`` on the mle stage's examples (prompt/completion, loss on the
    completion, EOS appended), in the same order and batches."""
    return _run_trl_job(job, "mle", {"completion": lambda x: x.target}, "SFT")


def trl_dpo(job: StepsJob) -> dict[str, Any]:
    """TRL's ``DPOTrainer`` (sigmoid loss, β = 0.1, reference = a frozen copy of the same
    checkpoint, scored every step) on the dpo stage's pairs, in the same order and batches."""
    columns = {"chosen": lambda x: x.chosen, "rejected": lambda x: x.rejected}
    return _run_trl_job(job, "dpo", columns, "DPO", beta=0.1)


def _trl_round(name: str, job: StepsJob, prompts: int) -> dict[str, Any]:
    """One round of one job: tether's side, then TRL's, and their ratios."""
    examples = job.rows  # per step: sequences (SFT), pairs (DPO)
    if name == "sft":
        ours, theirs = _tether_side("mle", job), trl_sft(job)
    elif name == "dpo":
        ours, theirs = _tether_side("dpo", job), trl_dpo(job)
    elif name == "rl":
        rl_job = RLJob(
            job.model,
            prompts,
            job.group,
            job.max_new_tokens,
            1.0,
            job.steps,
            job.seed,
            lora=job.lora,
            precision=job.precision,
            onednn_linear=job.onednn_linear,
        )
        rl = bench_rl(rl_job)
        ours, theirs, examples = rl["tether"], rl["trl_grpo"], prompts * job.group
    else:
        raise ValueError(f"unknown TRL job {name!r}: choose from {', '.join(TRL_JOBS)}")
    for side in (ours, theirs):
        side["examples_per_s"] = examples / side["median_step_s"]
    return {
        "tether": ours,
        "trl": theirs,
        # steady state: the median step, robust to one slow step (a recompile, a
        # neighbour's burst on a shared machine)
        "ratio": theirs["median_step_s"] / ours["median_step_s"],
        # all timed steps: wall-clock, and CPU seconds (steadier at one thread when shared)
        "total_ratio": theirs["seconds"] / ours["seconds"],
        "cpu_ratio": theirs["cpu_s"] / ours["cpu_s"],
    }


def bench_trl(
    job: StepsJob, jobs: tuple[str, ...] = TRL_JOBS, prompts: int = 8, rounds: int = 1
) -> dict[str, Any]:
    """tether against TRL on SFT, RL and DPO, each side right after the other (RL: ``prompts``
    prompts of ``job.group`` completions of up to ``job.max_new_tokens`` tokens).

    ``rounds`` > 1 runs every job that many times, the two sides alternating, and reports the
    median round (by ratio) with every round's ratio in ``ratios``, smallest first: on a
    shared machine the load drifts between runs, and a ratio taken from two sides run one
    after the other is steadier than either side's throughput."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    job = job.resolved()
    torch.set_num_threads(job.threads)
    out: dict[str, Any] = {
        "job": {**dataclasses.asdict(job), "rounds": rounds},
        "machine": machine(job.onednn_linear),
        "results": {},
    }
    for name in jobs:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the figures only
            runs = [_trl_round(name, job, prompts) for _ in range(rounds)]
        runs.sort(key=_by_ratio)
        median = runs[(len(runs) - 1) // 2]  # the lower middle round when there are two
        out["results"][name] = {**median, "ratios": [r["ratio"] for r in runs]}
    out["compiled"] = [n for n in jobs if n != "rl"] if job.compile else []  # RL: eager
    out["trl_trainers"] = {"sft": "SFTTrainer", "rl": "GRPOTrainer", "dpo": "DPOTrainer"}
    out["kl"] = f"rl: GRPO on both sides, k3 in the loss, coefficient {KL_COEF}"
    out["task"] = bench_target(job.model).kind
    return out


def _by_ratio(round_: dict[str, Any]) -> float:
    return float(round_["ratio"])
