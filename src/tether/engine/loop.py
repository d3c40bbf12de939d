"""The one training loop: ask the stage for a batch, compute its loss, step, log, evaluate,
checkpoint. It knows nothing about any particular method or task: it calls the hooks of
:class:`tether.stages.base.Stage` and reads the stage's registry row
(:mod:`tether.stages.registry`).

A run directory holds ``config.yaml`` (the resolved recipe), ``metrics.jsonl`` (one JSON object
per logged step, always with ``step``), ``summary.json`` (final figures, written last),
``checkpoints/step-NNNNNN/`` and ``model/`` (the final checkpoint). Every checkpoint is a
``save_pretrained`` directory, loadable with ``AutoModelForCausalLM.from_pretrained``.

With ``train.micro_batch_size`` each update runs the stage's micro-batches
(:meth:`~tether.stages.base.Stage.micro_batches`) one after the other, their gradients
accumulating (under DDP synchronised on the last one only), then steps once: the step of the
whole batch, whose figures are the micro-batches' weighted sums. Every step's figures go
through :class:`~tether.engine.signals.SetupMonitor` (warnings of a broken set-up);
``peak_rss_mb`` (and ``cuda_peak_allocated_mb`` on a GPU) are logged and kept in the summary.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import (
    get_cosine_with_min_lr_schedule_with_warmup,
)

from tether import distributed
from tether.config import Recipe, RecipeError, dump_recipe
from tether.engine.checkpoints import (
    check_new_run_dir,
    check_resumable,
    prune_checkpoints,
    restore_training,
    save_checkpoint,
    step_checkpoints,
    training_state,
    truncate_metrics,
)
from tether.engine.faults import (
    NonFiniteError,
    StopRequests,
    TrainingInterrupted,
    gradient_norm,
    nonfinite_gradient,
)
from tether.engine.memory import peak_memory
from tether.engine.precision import check_precision
from tether.engine.setup import (
    build_policy,
    make_accelerator,
    make_optimizer,
    prepare_models,
    seed_everything,
    warn_oversubscribed,
)
from tether.engine.signals import KEYS as SIGNAL_KEYS
from tether.engine.signals import SetupMonitor
from tether.eval.during_training import Evaluation, evaluate_run, paired_gains
from tether.stages.base import Stage, make_stage, reward_recipe


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
    from tether.eval.report import flatten

    flat = flatten(recipe.model_dump(mode="json"))
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


# ---------------------------------------------------------------- the loop


def check_sharded_weights(accelerator: Accelerator, recipe: Recipe) -> None:
    """ZeRO-3 shards the weights across processes; tether's samplers read the whole weights of
    the policy, so the sampling stages run under DDP, FSDP (which gathers them for sampling,
    :func:`tether.distributed.full_weights`) or ZeRO-2. LoRA runs under DDP, not FSDP."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP and recipe.model.lora is not None:
        raise RecipeError(
            "model.lora: adapters are not sharded by tether's FSDP set-up (their weights are "
            "small; the frozen base is what FSDP would shard); launch LoRA runs with DDP"
        )
    if kind == DistributedType.DEEPSPEED and recipe.train.micro_batch_size is not None:
        raise RecipeError(
            "train.micro_batch_size: under DeepSpeed accelerate steps the optimizer on every "
            "backward pass, so micro-batches cannot accumulate; remove the key, or use DDP or FSDP"
        )
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    sharded = kind == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3
    if sharded and recipe.samples_from_policy:
        raise RecipeError(
            f"train.stage {recipe.train.stage}: samples from the policy while training, which "
            "needs its whole weights on every process; launch it with DDP "
            "(configs/accelerate/ddp.yaml), FSDP or DeepSpeed ZeRO-2, not ZeRO-3"
        )


def check_micro_batches(recipe: Recipe, stage: Stage[Any]) -> None:
    """``train.micro_batch_size`` needs a stage that can cut its batches."""
    if recipe.train.micro_batch_size is not None and not stage.splits_batches:
        raise RecipeError(
            f"train.micro_batch_size: train.stage {recipe.train.stage} cannot split its batch "
            "into micro-batches; remove the key"
        )


def weighted_stats(parts: Sequence[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """The whole batch's figures from its micro-batches' (weight w_i, stats_i): Σ_i w_i·x_i
    per key, over the micro-batches that logged it (renormalised by their weights)."""
    if len(parts) == 1:
        return parts[0][1]
    total: dict[str, float] = {}
    weight: dict[str, float] = {}
    for w, stats in parts:
        for key, value in stats.items():
            total[key] = total.get(key, 0.0) + w * value
            weight[key] = weight.get(key, 0.0) + w
    return {key: total[key] / weight[key] for key in total}


def train(
    recipe: Recipe, out: str | Path, progress: bool = True, resume: bool = False
) -> dict[str, Any]:
    """Run a recipe into ``out``; returns the summary (also written to summary.json).

    With ``resume`` the run continues from the newest checkpoint in ``out`` and its metrics
    equal those of an uninterrupted run (CPU, same thread count). SIGINT/SIGTERM save a
    checkpoint and raise :class:`TrainingInterrupted`; a NaN/inf raises :class:`NonFiniteError`
    (or skips the batch, by ``train.on_nonfinite``). ``summary.json`` is written only when the
    run completes, so a run directory without it is unfinished.
    """
    out = Path(out)
    accelerator = make_accelerator(recipe, str(out))  # one process, DDP, FSDP, DeepSpeed
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
    check_micro_batches(recipe, stage)
    if accelerator.distributed_type == "DEEPSPEED" and stage.parameters():
        raise RecipeError(
            f"train.stage {recipe.train.stage}: its own parameters (a head) live outside the "
            "model, and DeepSpeed's engine takes the model's only; launch it with DDP or FSDP"
        )
    prepare_models(model, stage, recipe, accelerator.device)
    if resume_from is None and main:  # written once the models load: a bad path leaves no folder
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_recipe(recipe))
    data_report = stage.task.report  # a task read from a file: rows kept and skipped
    if data_report is not None and main:
        tqdm.write(f"data: {data_report.summary()}", file=sys.stderr)
    if recipe.tracking.trackers:
        accelerator.init_trackers(recipe.name, config=tracker_config(recipe))
    if accelerator.is_fsdp2:  # shard first (in place): the optimizer takes the shards and
        model = accelerator.prepare(model)  # the stage's own parameters (accelerate takes
    optimizer = make_optimizer(model, recipe, stage.parameters())  # only the model's)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=recipe.optim.warmup_steps,
        num_training_steps=recipe.train.steps,
        min_lr_rate=recipe.optim.min_lr_ratio,
    )
    if not accelerator.is_fsdp2:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    # FSDP: a process that runs the policy alone (sampling its share, evaluating) holds its
    # whole weights meanwhile (tether.distributed.full_weights)
    sharded = bool(distributed.fsdp_modules(model))
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    zero3 = ds is not None and ds.zero_stage == 3
    alone = sharded and recipe.samples_from_policy
    batch_weights = distributed.full_weights if alone else contextlib.nullcontext
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
        "reward": reward_recipe(recipe, stage.spec).reward.model_dump(),  # as it scored
        **stage.checkpoint_metadata(),
        **({"lora": recipe.model.lora.model_dump()} if recipe.model.lora is not None else {}),
    }
    n_params = sum(distributed.numel(p) for p in model.parameters())
    n_trained = sum(distributed.numel(p) for p in trainable)
    micro_batch_size = recipe.train.micro_batch_size
    monitor = SetupMonitor()

    def update(batch: Any) -> tuple[str | None, float, dict[str, float]]:
        """One optimizer update on ``batch``, micro-batch by micro-batch: the forward and
        backward passes of each (DDP synchronises the gradients on the last one only), then
        one step. Returns what was not finite (None: the step was taken), the gradient norm
        and the batch's figures."""
        parts = [batch]
        if micro_batch_size is not None:
            parts = stage.micro_batches(model, batch, micro_batch_size)
        figures: list[tuple[float, dict[str, float]]] = []
        fault, grad_norm = None, float("nan")
        for i, part in enumerate(parts):
            weight = 1.0 if part.share is None else part.share.weight
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                loss, stats = stage.loss(model, part)
                figures.append((weight, stats))
                finite = bool(torch.isfinite(loss))
                if not distributed.all_true(finite):  # every process skips, or none does
                    fault = f"the loss ({loss.item()})" if not finite else "another process's loss"
                    break
                accelerator.backward(loss if weight == 1.0 else loss * weight)
        if fault is None:
            distributed.average_gradients(stage.parameters())  # DDP holds the model's
            # one pass over the gradients: the total norm (clipping, when on, returns it);
            # only a non-finite norm sends us looking for the parameter to name
            if recipe.optim.grad_clip is not None or sharded:  # FSDP: the norm of the shards'
                clip = recipe.optim.grad_clip or math.inf
                grad_norm = float(accelerator.clip_grad_norm_(trainable, clip))
            else:
                grad_norm = gradient_norm(trainable)
            if not math.isfinite(grad_norm):
                fault = nonfinite_gradient(named) or f"the gradient norm ({grad_norm})"
        if fault is None:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return fault, grad_norm, weighted_stats(figures)

    def watch(step: int, stats: dict[str, float]) -> None:
        """The step's figures through the set-up monitor (every process's, averaged); its
        warnings on stderr, from the main process."""
        watched = distributed.mean_stats({k: v for k, v in stats.items() if k in SIGNAL_KEYS})
        for line in monitor.observe(step, watched):
            if main:
                tqdm.write(line, file=sys.stderr)

    def evaluate() -> dict[str, float]:
        """The task's evaluation (generation, judged by the task and by the stage's reward),
        plus the stage's own figures where it has them (preference stages: pairwise accuracy);
        a reward model has only its own. The first and the latest evaluation's per-problem
        outcomes are kept for the summary's paired gains."""
        unwrapped = accelerator.unwrap_model(model)
        result = Evaluation()
        # every process evaluates alone; the main one logs
        with distributed.full_weights(model), distributed.local():
            if stage.generation_eval:
                result = evaluate_run(unwrapped, tokenizer, recipe, stage.task, stage.reward)
            last_outcomes.clear()
            last_outcomes.update(result.outcomes)
            return {**result.figures, **stage.evaluate(unwrapped)}

    last_outcomes: dict[str, list[float]] = {}  # per held-out problem, the latest evaluation
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
    elif stage.spec.evaluates_at_start and recipe.train.eval_at_start:  # the start's figures
        carried["last_eval"] = evaluate()
        carried["first_outcomes"] = dict(last_outcomes)  # step 0's, kept through a resume
        log.log(0, carried["last_eval"])

    def whole_weights() -> dict[str, torch.Tensor] | None:
        """FSDP, ZeRO-3: the whole weights, gathered on the main process (every process
        calls this); None where ``state_dict()`` is already whole."""
        if sharded:
            return distributed.whole_state_dict(model)
        if zero3:  # needs zero3_save_16bit_model (configs/accelerate/deepspeed-zero3.yaml)
            return accelerator.get_state_dict(model)  # type: ignore[no-any-return]
        return None

    def checkpoint(step: int) -> Path:
        path = out / "checkpoints" / f"step-{step:06d}"
        carried["elapsed_s"] = elapsed_before + time.perf_counter() - t_start
        state = training_state(step, optimizer, scheduler, stage, carried)  # every process
        save_checkpoint(
            accelerator.unwrap_model(model),
            tokenizer,
            path,
            {**meta, "step": step},
            state,
            stage.save_extra,
            main=main,  # FSDP: every process writes its optimizer shard
            weights=whole_weights(),
        )
        if main:
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
            with batch_weights(model):
                batch = stage.next_batch()
            parts_stats: list[dict[str, float]] = []
            for part in stage.updates(batch):  # PPO's epochs, RL's minibatches: one step each
                fault, grad_norm, stats = update(part)
                parts_stats.append(stats)
                if fault is not None:
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
            scheduler.step()
            if fault is None:  # the step's figures: the mean over its updates (near-equal parts)
                stats = weighted_stats([(1.0, s) for s in parts_stats])
            tokens_since += batch.num_tokens
            watch(step, stats)

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
                    **peak_memory(accelerator.device),
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

    weights = whole_weights()
    if main:
        save_checkpoint(
            accelerator.unwrap_model(model),
            tokenizer,
            out / "model",
            {**meta, "step": recipe.train.steps},
            extra=stage.save_extra,
            weights=weights,
        )
    if not main:
        distributed.barrier()  # the main process writes the summary
        return json.loads((out / "summary.json").read_text())
    last, last_eval = carried["last"], carried["last_eval"]
    summary = {
        "name": recipe.name,
        "steps": recipe.train.steps,
        "parameters": n_params,
        "trainable_parameters": n_trained,
        "train_time_s": round(elapsed_before + time.perf_counter() - t_start, 2),
        "final_loss": last.get("loss"),
        "skipped_batches": carried["skipped"],
        **peak_memory(accelerator.device),
        "warnings": monitor.warnings,
        **({"data": data_report.summary()} if data_report is not None else {}),
        **last_eval,
        # held-out gains from the first evaluation to the last, paired by problem
        **paired_gains(carried.get("first_outcomes", {}), last_outcomes),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if recipe.tracking.trackers:
        accelerator.end_training()
    distributed.barrier()
    return summary
