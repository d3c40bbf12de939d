"""The one training loop: ask the stage for a batch, compute its loss, step, log, evaluate,
checkpoint. It knows nothing about any particular method.

A run directory holds ``config.yaml`` (the resolved recipe), ``metrics.jsonl`` (one JSON object
per logged step, always with ``step``), ``summary.json`` (final figures, written last),
``checkpoints/step-NNNNNN/`` and ``model/`` (the final checkpoint). Every checkpoint is a
``save_pretrained`` directory, loadable with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from tether import distributed
from tether.config import Recipe, RecipeError, dump_recipe, first_line
from tether.lora import is_lora, load_adapter, save_model, with_adapters
from tether.models import build_model, char_tokenizer, load_model_and_tokenizer, prompt_text
from tether.precision import autocast_forward, check_precision, frozen_models
from tether.sampling import sample
from tether.stages import make_stage
from tether.tasks import AdditionTask, Task, task_from_config


class RunDirError(ValueError):
    """The run directory cannot be used; nothing was written."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_new_run_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirError(
            f"run directory {str(out)!r} is a file, not a folder; choose another --out"
        )
    if out.exists() and any(out.iterdir()):
        raise RunDirError(
            f"run directory {str(out)!r} already exists and is not empty; choose another --out"
        )


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    meta: dict[str, Any],
    state: dict[str, Any] | None = None,
    extra: Any = None,
) -> None:
    """Write to a temporary sibling (``NAME.tmp``), then rename, so a crash never leaves a
    half checkpoint under the final name (and loaders refuse ``*.tmp`` folders).
    ``state`` is the trainer state that ``--resume`` needs (optimizer, RNGs, data position)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tmp)  # LoRA: the merged weights, and the adapter in adapter/
    tokenizer.save_pretrained(tmp)
    if state is not None:
        torch.save(state, tmp / TRAINER_STATE)
    if extra is not None:  # files a stage keeps beside the weights (a reward model's head)
        extra(tmp)
    (tmp / "tether.json").write_text(json.dumps(meta, indent=2) + "\n")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


class MetricsLog:
    """metrics.jsonl always; accelerate trackers too when configured. Across processes only
    the main one writes."""

    def __init__(self, path: Path, accelerator: Accelerator):
        self.path = path
        self.accelerator = accelerator
        self.trackers = bool(accelerator.log_with)
        self.enabled = accelerator.is_main_process

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers:
            self.accelerator.log(values, step=step)


def tracker_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe as flat scalars (``optim/lr``...): what TensorBoard's hparams accept."""
    from tether.report import flatten

    flat = flatten(recipe.model_dump(mode="json"))
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def evaluate_during_training(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    task: Task | None = None,
) -> dict[str, float]:
    """Figures logged at each evaluation: for addition, greedy accuracy per length (the
    ``eval.digits`` table), for the sampling stages (RL, online DPO, XPO) the accuracy on the RL
    and pre-training distributions, and
    the critical-token probe; for other tasks, accuracy on the RL distribution."""
    from tether.evaluate import addition_accuracy, critical_token_probabilities

    task = task or task_from_config(recipe.task, recipe.seed)
    was_training = model.training
    model.eval()
    flat: dict[str, float] = {}
    if recipe.task.name == "addition" and recipe.eval.digits:
        result = addition_accuracy(
            model,
            tokenizer,
            digits=recipe.eval.digits,
            n=recipe.eval.n,
            temperature=recipe.eval.temperature,
            seed=recipe.seed + 1,
            batch_size=recipe.eval.batch_size,
        )
        for kind in ("identical", "varying"):
            for d, cell in result[kind].items():
                flat[f"eval/acc_{kind}_{d}"] = cell["accuracy"]
    if recipe.train.stage in ("rl", "online-dpo", "xpo") or recipe.task.name != "addition":
        rng = random.Random(f"tether-eval/{recipe.seed}")
        problems = [task.rl_problem(rng) for _ in range(recipe.eval.n)]
        flat["eval/acc_rl"], score = task_accuracy(model, tokenizer, task, problems, recipe)
        if recipe.task.name != "addition":
            flat["eval/score"] = score
        if recipe.task.name == "addition":  # 1..N digits, without the long_fraction mix
            pretrain = AdditionTask(recipe.task.max_digits)
            problems = [pretrain.pretrain_problem(rng) for _ in range(recipe.eval.n)]
            flat["eval/acc_pretrain"] = task_accuracy(model, tokenizer, task, problems, recipe)[0]
    if recipe.task.name == "addition":  # the Fig. 4/7 probe on a fixed set of N+1-digit problems
        probe_rng = random.Random(f"tether-probe/{recipe.seed}")
        probe = [task.rl_problem(probe_rng) for _ in range(64)]
        for key, value in critical_token_probabilities(
            model, tokenizer, probe, recipe.task.max_digits
        ).items():
            flat[f"eval/{key}"] = value
    model.train(was_training)
    return flat


@torch.no_grad()
def task_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    problems: list[Any],
    recipe: Recipe,
) -> tuple[float, float]:
    """Accuracy and mean ``task.score`` on ``problems`` at ``eval.temperature`` (greedy by
    default), prompts formatted as the model expects (chat template where it has one)."""
    gen = torch.Generator(device=model.device).manual_seed(recipe.seed)
    out = sample(
        model,
        tokenizer,
        [prompt_text(tokenizer, p.prompt) for p in problems],
        max_new_tokens=task.max_new_tokens(),
        temperature=recipe.eval.temperature,
        generator=gen,
        batch_size=recipe.eval.batch_size,
    )
    correct = [task.is_correct(p, t) for p, t in zip(problems, out.texts, strict=True)]
    scores = [task.score(p, t) for p, t in zip(problems, out.texts, strict=True)]
    return sum(correct) / len(correct), sum(scores) / len(scores)


def build_policy(recipe: Recipe) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if recipe.model.init is not None:
        model, tokenizer = load_model_and_tokenizer(recipe.model.init)
        if recipe.model.lora is not None:  # frozen weights, trainable low-rank adapters
            model = with_adapters(model, recipe.model.lora)
        model.train()
        return model, tokenizer
    tokenizer = char_tokenizer(model_max_length=recipe.model.max_positions)
    m = recipe.model
    model = build_model(
        tokenizer, m.arch, m.n_layer, m.n_head, m.n_embd, m.max_positions, m.dropout
    )
    return model, tokenizer


def compile_models(model: torch.nn.Module, stage: Any, backend: str = "inductor") -> None:
    """``train.compile``: compile the policy and the stage's frozen reference, if it has one,
    in place (``nn.Module.compile``: the modules, their names and state dicts stay as they
    are), with dynamic shapes, as batches change length from step to step."""
    model.compile(dynamic=True, backend=backend)
    reference = getattr(stage, "reference", None)
    if isinstance(reference, torch.nn.Module):
        reference.compile(dynamic=True, backend=backend)


def prepare_models(model: torch.nn.Module, stage: Any, recipe: Recipe, device: Any) -> None:
    """``train.precision`` and ``train.compile`` on the policy and the stage's frozen models,
    in place: with bf16 their forward passes run under autocast and everything after them in
    fp32 (:mod:`tether.precision` says why not accelerate's); then ``torch.compile``."""
    for scored in (model, *frozen_models(stage)):
        autocast_forward(scored, recipe.train.precision, device)
    if recipe.train.compile:
        compile_models(model, stage)


def make_optimizer(
    model: torch.nn.Module, recipe: Recipe, extra: list[torch.nn.Parameter] | None = None
) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases, norms)."""
    params = [p for p in model.parameters() if p.requires_grad] + list(extra or [])
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    o = recipe.optim
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
    )


# ---------------------------------------------------------------- checkpoints and resuming

TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete ``checkpoints/step-N`` folders of a run, oldest first. A folder is complete once
    it has its final name: it is written under ``step-N.tmp`` and renamed as a whole."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(out: Path, keep: int | None) -> None:
    if keep is not None:
        for _, path in step_checkpoints(out)[:-keep]:
            shutil.rmtree(path)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def training_state(
    step: int, optimizer: Any, scheduler: Any, stage: Any, carried: dict[str, Any]
) -> dict[str, Any]:
    """Everything besides the weights that makes a resumed run continue bit for bit. Across
    processes (every one calls this) ``ranks`` holds each process's stage and RNG states: its
    share of the prompts is sampled with its own generator."""
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "stage": stage.state_dict(),
        "rng": rng_state(),
        "carried": carried,
    }
    if distributed.active():  # each process's own, in place of the main process's alone
        state["ranks"] = distributed.gather_objects(
            {"stage": state.pop("stage"), "rng": state.pop("rng")}
        )
    return state


def check_resumable(out: Path) -> Path:
    """The newest checkpoint of an unfinished run, or RunDirError saying why not."""
    if not (out / "config.yaml").is_file():
        raise RunDirError(f"--resume {str(out)!r}: not a run directory (no config.yaml)")
    if (out / "summary.json").is_file():
        raise RunDirError(f"--resume {str(out)!r}: the run already finished (summary.json)")
    found = step_checkpoints(out)
    if not found:
        raise RunDirError(f"--resume {str(out)!r}: no checkpoint to resume from in checkpoints/")
    return found[-1][1]


def restore_training(
    checkpoint: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, stage: Any
) -> tuple[int, dict[str, Any]]:
    """Load weights, optimizer, scheduler, the stage's data position and every RNG."""
    from transformers import AutoModelForCausalLM

    try:
        if is_lora(model):  # the base weights are model.init's: only the adapter was trained
            load_adapter(model, checkpoint)
        else:
            saved = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True)
            model.load_state_dict(saved.state_dict())  # in place: the optimizer keeps its own
    except Exception as err:  # a damaged file: safetensors, JSON, shapes
        raise RunDirError(
            f"--resume: the weights in {str(checkpoint)!r} cannot be loaded ({first_line(err)}); "
            "remove that checkpoint folder to resume from the one before it"
        ) from err
    try:  # our own file, written by save_checkpoint: it holds Python and NumPy RNG tuples
        state = torch.load(checkpoint / TRAINER_STATE, weights_only=False)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a trainer state")
    except Exception as err:  # truncated, overwritten, not a torch file
        raise RunDirError(
            f"--resume: {str(checkpoint / TRAINER_STATE)!r} cannot be read ({first_line(err)}); "
            "remove that checkpoint folder to resume from the one before it"
        ) from err
    saved_world = len(state.get("ranks", [None]))
    world = distributed.world_size() if distributed.active() else 1
    if saved_world != world:
        raise RunDirError(
            f"--resume {str(checkpoint)!r}: written by {saved_world} process(es), resumed with "
            f"{world}; resume with {saved_world} (each process's prompt share and sampling "
            "generator are part of the state)"
        )
    own = state["ranks"][distributed.rank()] if world > 1 else state
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stage.load_state_dict(own["stage"])
    random.setstate(own["rng"]["python"])
    np.random.set_state(own["rng"]["numpy"])
    torch.set_rng_state(own["rng"]["torch"])
    if own["rng"].get("cuda") and torch.cuda.is_available():  # dropout on the GPU
        torch.cuda.set_rng_state_all(own["rng"]["cuda"])
    return int(state["step"]), state["carried"]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (the lost part of the run), and a
    partial last line (the process was killed while writing it). RunDirError naming the file
    and line for a damaged line before the last."""
    from tether.report import read_metrics

    if not path.is_file():
        return
    try:
        rows = read_metrics(path)
    except ValueError as err:
        raise RunDirError(f"--resume: {err}") from err
    kept = [json.dumps(row) for row in rows if row["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


# ---------------------------------------------------------------- interrupts and faults


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped the run after saving a checkpoint."""

    def __init__(self, out: Path, step: int, signum: int, checkpoint: Path):
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} at step {step}: checkpoint saved to {checkpoint}; "
            f"continue with: tether train --resume {out}"
        )


class NonFiniteError(FloatingPointError):
    """A NaN or inf loss or gradient with ``train.on_nonfinite: stop``."""


class StopRequests:
    """The first SIGINT or SIGTERM asks the loop to checkpoint and stop after the current step;
    a second one exits at once (no checkpoint; the atomic writes leave nothing half-made)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            sys.stderr.write(f"\n{name} again: exiting now, without a checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        sys.stderr.write(
            f"\n{name}: saving a checkpoint after this step and stopping "
            "(send it again to exit at once)\n"
        )
        sys.stderr.flush()

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def nonfinite_gradient(named: list[tuple[str, torch.nn.Parameter]]) -> str | None:
    """The name of the first parameter whose gradient holds a NaN or inf, if any."""
    for name, p in named:
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return f"the gradient of {name}"
    return None


def gradient_norm(params: list[torch.nn.Parameter]) -> float:
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


# ---------------------------------------------------------------- the loop


def check_sharded_weights(accelerator: Accelerator, recipe: Recipe) -> None:
    """FSDP and ZeRO-3 shard the weights across processes; tether's samplers read the whole
    weights of the policy, so the sampling stages run under DDP or ZeRO-2 only."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    sharded = kind == DistributedType.FSDP or (
        kind == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3
    )
    if sharded and recipe.samples_from_policy:
        raise RecipeError(
            f"train.stage {recipe.train.stage}: samples from the policy while training, which "
            "needs its whole weights on every process; launch it with DDP "
            "(configs/accelerate/ddp.yaml) or DeepSpeed ZeRO-2, not FSDP or ZeRO-3"
        )


def warn_oversubscribed(threads: int, processes: int = 1) -> None:
    """A line on stderr when ``train.threads`` × processes exceeds the CPU cores this process
    may use: OpenMP threads then wait on one another (measured: 1,024 threads on 2 cores made
    a 6-second run take about 7 minutes)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if threads * processes > cores:
        tqdm.write(
            f"warning: train.threads={threads} × {processes} process(es) exceeds the {cores} CPU "
            "core(s) available; each step will wait on oversubscribed threads",
            file=sys.stderr,
        )


def train(recipe: Recipe, out: Path, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Run a recipe into ``out``; returns the summary (also written to summary.json).

    With ``resume`` the run continues from the newest checkpoint in ``out`` and its metrics
    equal those of an uninterrupted run (CPU, same thread count). SIGINT/SIGTERM save a
    checkpoint and raise :class:`TrainingInterrupted`; a NaN/inf raises :class:`NonFiniteError`
    (or skips the batch, by ``train.on_nonfinite``). ``summary.json`` is written only when the
    run completes, so a run directory without it is unfinished.
    """
    # launched with `accelerate launch` or `torchrun`, this joins the process group (DDP);
    # the scheduler steps once per optimizer step, as in one process (every process sees
    # a share of the same global batch, not a batch of its own)
    accelerator = Accelerator(
        log_with=recipe.tracking.trackers or None,
        project_dir=str(out),
        step_scheduler_with_optimizer=False,
        cpu=distributed.launched_on_cpu(),  # accelerate sets up gloo DDP on CPUs only if asked
    )
    main = accelerator.is_main_process
    check_sharded_weights(accelerator, recipe)
    resume_from = check_resumable(out) if resume else None
    if resume_from is None:
        check_new_run_dir(out)
    distributed.barrier()  # every process has checked before the main one writes
    if recipe.train.threads:
        if main:  # one line, not one per process
            warn_oversubscribed(recipe.train.threads, accelerator.num_processes)
        torch.set_num_threads(recipe.train.threads)
    seed_everything(recipe.seed)

    check_precision(recipe.train.precision, accelerator.device)
    model, tokenizer = build_policy(recipe)
    model.to(accelerator.device)
    stage = make_stage(recipe, tokenizer, model, accelerator.device)
    prepare_models(model, stage, recipe, accelerator.device)
    if resume_from is None and main:  # written once the models load: a bad path leaves no folder
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_recipe(recipe))
    extra = getattr(stage, "save_extra", None)  # optional: files beside each checkpoint
    data_report = getattr(stage.task, "report", None)  # a JSONL file: rows kept and skipped
    if data_report is not None and main:
        tqdm.write(f"data: {data_report.summary()}", file=sys.stderr)
    if recipe.tracking.trackers:
        accelerator.init_trackers(recipe.name, config=tracker_config(recipe))
    optimizer = make_optimizer(model, recipe, stage.parameters())
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=recipe.optim.warmup_steps,
        num_training_steps=recipe.train.steps,
        min_lr_rate=recipe.optim.min_lr_ratio,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    named += [(f"stage parameter {i}", p) for i, p in enumerate(stage.parameters())]
    trainable = [p for _, p in named]
    log = MetricsLog(out / "metrics.jsonl", accelerator)
    meta = {
        "description": recipe.description,
        "recipe": recipe.name,
        "task": recipe.task.model_dump(),
        "seed": recipe.seed,
        "stage": recipe.train.stage,
        "init": recipe.model.init,  # the reference of a KL-tethered stage
        "reward": recipe.reward.model_dump(),
        **({"dpg": recipe.dpg.model_dump()} if recipe.train.stage == "dpg" else {}),
        **({"lora": recipe.model.lora.model_dump()} if recipe.model.lora is not None else {}),
    }
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in trainable)

    def evaluate() -> dict[str, float]:
        """The task's evaluation (generation), plus the stage's own figures where it has
        them (preference stages: pairwise accuracy); a reward model has only its own."""
        unwrapped = accelerator.unwrap_model(model)
        figures: dict[str, float] = {}
        with distributed.local():  # every process evaluates alone; the main one logs
            if getattr(stage, "generation_eval", True):
                figures = evaluate_during_training(unwrapped, tokenizer, recipe, stage.task)
            own = getattr(stage, "evaluate", None)
            return {**figures, **(own(unwrapped) if own is not None else {})}

    first_step = 1
    # figures that outlive a step and must survive a resume
    carried: dict[str, Any] = {"last": {}, "last_eval": {}, "elapsed_s": 0.0, "skipped": 0}
    if resume_from is not None:
        done, carried = restore_training(
            resume_from, accelerator.unwrap_model(model), optimizer, scheduler, stage
        )
        if main:
            truncate_metrics(out / "metrics.jsonl", done)
        first_step = done + 1
    elif recipe.train.stage in ("rl", "dpg", "online-dpo", "xpo"):  # the start's figures
        carried["last_eval"] = evaluate()
        log.log(0, carried["last_eval"])

    def checkpoint(step: int) -> Path:
        path = out / "checkpoints" / f"step-{step:06d}"
        carried["elapsed_s"] = elapsed_before + time.perf_counter() - t_start
        state = training_state(step, optimizer, scheduler, stage, carried)  # every process
        if main:
            unwrapped = accelerator.unwrap_model(model)
            save_checkpoint(unwrapped, tokenizer, path, {**meta, "step": step}, state, extra)
            prune_checkpoints(out, recipe.train.keep_checkpoints)
        distributed.barrier()
        return path

    elapsed_before = float(carried["elapsed_s"])
    t_start = time.perf_counter()
    tokens_since, t_since = 0, t_start
    bar = tqdm(
        range(first_step, recipe.train.steps + 1),
        desc=recipe.name,
        disable=not progress or not main,
        dynamic_ncols=True,
        initial=first_step - 1,
        total=recipe.train.steps,
    )
    with StopRequests() as stops:
        for step in bar:
            batch = stage.next_batch()
            for _ in range(stage.epochs_per_batch):  # PPO: several updates on one rollout
                loss, stats = stage.loss(model, batch)
                finite = bool(torch.isfinite(loss))
                fault = None
                if not distributed.all_true(finite):  # every process skips, or none does
                    fault = f"the loss ({loss.item()})" if not finite else "another process's loss"
                if fault is None:
                    accelerator.backward(loss)
                    distributed.average_gradients(stage.parameters())  # DDP holds the model's
                    # one pass over the gradients: the total norm (clipping, when on, returns
                    # it); only a non-finite norm sends us looking for the parameter to name
                    if recipe.optim.grad_clip is not None:
                        clip = recipe.optim.grad_clip
                        grad_norm = float(accelerator.clip_grad_norm_(trainable, clip))
                    else:
                        grad_norm = gradient_norm(trainable)
                    if not math.isfinite(grad_norm):
                        fault = nonfinite_gradient(named) or f"the gradient norm ({grad_norm})"
                if fault is not None:
                    optimizer.zero_grad(set_to_none=True)
                    if recipe.train.on_nonfinite == "stop":
                        kept = step_checkpoints(out)
                        where = str(kept[-1][1]) if kept else "none yet"
                        raise NonFiniteError(
                            f"step {step}: {fault} is not finite; stopped "
                            f"(last good checkpoint: {where}; "
                            "train.on_nonfinite=skip skips such batches instead)"
                        )
                    carried["skipped"] += 1
                    break
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            tokens_since += batch.num_tokens

            if step % recipe.train.log_every == 0 or step == recipe.train.steps:
                now = time.perf_counter()
                stats = distributed.mean_stats(stats)  # the global batch's figures
                tokens_since = int(distributed.all_sum(torch.tensor(tokens_since)))
                carried["last"] = {
                    **stats,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm if fault is None else float("nan"),
                    "skipped_batches": carried["skipped"],
                    "tokens_per_s": tokens_since / max(now - t_since, 1e-9),
                    "elapsed_s": elapsed_before + now - t_start,
                }
                tokens_since, t_since = 0, now
                log.log(step, carried["last"])
                bar.set_postfix(loss=f"{carried['last']['loss']:.4f}")
            if step % recipe.train.eval_every == 0 or step == recipe.train.steps:
                carried["last_eval"] = evaluate()
                log.log(step, carried["last_eval"])
                t_since = time.perf_counter()  # evaluation time is not training throughput
            if step == recipe.train.steps:
                break
            stop = distributed.any_true(stops.signum is not None)  # one stops, all stop
            signum = stops.signum or signal.SIGTERM
            if step % recipe.train.checkpoint_every == 0:
                saved = checkpoint(step)
                if stop:
                    raise TrainingInterrupted(out, step, signum, saved)
            elif stop:
                raise TrainingInterrupted(out, step, signum, checkpoint(step))
    bar.close()

    if not main:
        distributed.barrier()  # the main process writes the model and the summary
        return json.loads((out / "summary.json").read_text())
    save_checkpoint(
        accelerator.unwrap_model(model),
        tokenizer,
        out / "model",
        {**meta, "step": recipe.train.steps},
        extra=extra,
    )
    last, last_eval = carried["last"], carried["last_eval"]
    summary = {
        "name": recipe.name,
        "steps": recipe.train.steps,
        "parameters": n_params,
        "trainable_parameters": n_trained,
        "train_time_s": round(elapsed_before + time.perf_counter() - t_start, 2),
        "final_loss": last.get("loss"),
        "skipped_batches": carried["skipped"],
        **({"data": data_report.summary()} if data_report is not None else {}),
        **last_eval,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if recipe.tracking.trackers:
        accelerator.end_training()
    distributed.barrier()
    return summary
