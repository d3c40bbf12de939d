"""``tether bench rl``: the same GRPO job in tether and in TRL's ``GRPOTrainer``, in one process.

Same model (a policy and a frozen reference from the same checkpoint; on a chat model LoRA
adapters of the same rank on both sides, the reference being the adapters switched off), same
prompts (the task that suits the model, :mod:`tether.bench.models`: the addition task's RL
distribution for an addition checkpoint, one-digit word problems through the chat template for
a chat model), same batch (K prompts × G completions per step), same completion length,
sampling temperature and precision, and the same loss: GRPO with group-normalised advantages,
the clipped ratio (one update per batch), k3 in the loss with β = 0.04 and TRL 1.16's default
``dapo`` token mean (tether: ``rl.algorithm: grpo``, :func:`rl_overrides`). The figure is
completions per second of whole training steps (sampling, reference scoring, update), after
one warm-up step on each side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback

from tether.batches import DemonstrationBatch
from tether.bench.measure import machine
from tether.bench.models import bench_target
from tether.config import Recipe, load_recipe
from tether.engine.precision import check_precision
from tether.engine.setup import build_policy, make_optimizer, prepare_models
from tether.models.loading import load_model_and_tokenizer
from tether.stages.base import make_stage
from tether.stages.imitation import ImitationStage
from tether.tasks import task_from_config

KL_COEF = 0.04  # β of the KL term on both sides (TRL 1.16's default is 0: no KL at all)
GRPO_LOSS = "dapo"  # TRL 1.16's default loss_type; tether's rl.grpo_loss
CLIP_EPS = 0.2  # TRL's epsilon; tether's rl.clip_eps


@dataclass(frozen=True)
class RLJob:
    """One RL job, run identically on both sides."""

    model: str = "addition-n3"
    prompts_per_step: int = 8
    group: int = 4
    max_new_tokens: int | None = None  # None: the model's task's default (bench.models)
    temperature: float = 1.0
    steps: int = 3
    seed: int = 0
    lora: int | None = None  # LoRA rank, 0 = every weight trains; None: the model's default
    precision: str = "fp32"  # train.precision on tether's side, bf16=True on TRL's
    threads: int | None = None  # torch threads (None: as set)
    onednn_linear: str = "false"  # train.onednn_linear on tether's side (auto, true, false)

    @property
    def completions(self) -> int:
        """Completions over the timed steps (the warm-up step is not counted)."""
        return self.steps * self.prompts_per_step * self.group

    def resolved(self) -> RLJob:
        """The job with the model's defaults filled in (completion length, LoRA rank)."""
        target = bench_target(self.model)
        return dataclasses.replace(
            self,
            max_new_tokens=self.max_new_tokens or target.default_max_new_tokens,
            lora=target.default_lora if self.lora is None else self.lora,
        )


def rl_overrides(
    prompts_per_step: int, group: int, max_new_tokens: int, temperature: float
) -> list[str]:
    """The RL stage as the TRL comparison runs it: GRPO as TRL's defaults compute it (group
    std, one update per batch, ``dapo``), k3 KL in the loss with β = :data:`KL_COEF`."""
    return [
        "train.stage=rl",
        "rl.algorithm=grpo",
        f"rl.group_size={group}",
        f"rl.prompts_per_step={prompts_per_step}",
        f"rl.max_new_tokens={max_new_tokens}",
        f"rl.temperature={temperature}",
        "rl.scale_rewards=group",
        f"rl.grpo_loss={GRPO_LOSS}",
        "rl.ppo_epochs=1",
        f"rl.clip_eps={CLIP_EPS}",
        "rl.kl_estimator=k3",
        "rl.kl_placement=loss",
        f"rl.kl_coef={KL_COEF}",
        "rl.entropy_coef=0.0",
    ]


def lora_overrides(rank: int) -> list[str]:
    """LoRA adapters of rank r (alpha 2r, as the SmolLM2 recipes) on every linear layer of
    the blocks; 0: none, every weight trains."""
    return [f"model.lora.r={rank}", f"model.lora.alpha={2 * rank}"] if rank else []


def trl_peft_config(rank: int) -> Any:
    """The same adapters for TRL (``peft_config``): every linear layer but the LM head."""
    if not rank:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
        task_type="CAUSAL_LM",
    )  # fmt: skip


def rl_recipe(job: RLJob) -> Recipe:
    """tether's side of an RL job: the ``critical-tokens`` recipe's optimizer (AdamW, lr
    1e-4, gradient clipping at 1) with the model's task and :func:`rl_overrides`."""
    target = bench_target(job.model)
    assert job.max_new_tokens is not None and job.lora is not None, "resolve the job first"
    return load_recipe(
        "critical-tokens",
        [
            f"model.init={target.init}",
            f"seed={job.seed}",
            f"train.precision={job.precision}",
            f"train.onednn_linear={job.onednn_linear}",
            *target.task,
            *lora_overrides(job.lora),
            *rl_overrides(job.prompts_per_step, job.group, job.max_new_tokens, job.temperature),
        ],
    )


def trl_args(job: Any, warmup: int = 1) -> dict[str, Any]:
    """TrainingArguments every TRL side shares: ``job.steps`` timed steps after ``warmup``
    steps, on the CPU, without gradient checkpointing (tether's way; TRL's defaults are bf16
    autocast and recomputation), in fp32 or, with ``job.precision`` bf16, bf16 autocast (as
    tether's ``train.precision: bf16``), the examples in order, no logging or saving."""
    return dict(
        output_dir="/tmp/tether-bench-trl",
        max_steps=job.steps + warmup,
        use_cpu=getattr(job, "device", "cpu") == "cpu",
        bf16=getattr(job, "precision", "fp32") == "bf16",
        gradient_checkpointing=False,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        seed=job.seed,
        learning_rate=1e-4,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
    )


class StepTimer(TrainerCallback):
    """A TRL ``TrainerCallback`` that notes wall-clock and CPU time at the start and end of
    every training step (``starts``, ``ends``, ``cpu_starts``, ``cpu_ends``)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.cpu_starts: list[float] = []
        self.cpu_ends: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.starts.append(time.perf_counter())
        self.cpu_starts.append(time.process_time())

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())


def run_trl(trainer: Any, timer: Any, warmup: int = 1) -> dict[str, float]:
    """Train, with TRL's printed metrics sent to stderr (stdout carries ours); wall-clock and
    CPU seconds of the steps after the first ``warmup``, and their median step."""
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    steps = [end - start for start, end in zip(timer.starts, timer.ends, strict=True)]
    return {
        "seconds": timer.ends[-1] - timer.starts[warmup],
        "cpu_s": timer.cpu_ends[-1] - timer.cpu_starts[warmup],
        "median_step_s": statistics.median(steps[warmup:]),
    }


def bench_tether(job: RLJob) -> dict[str, Any]:
    """tether's side: the rl stage with GRPO, whole steps as the training loop takes them."""
    recipe = rl_recipe(job)
    device = torch.device("cpu")
    check_precision(recipe.train.precision, device)
    torch.manual_seed(job.seed)
    policy, tokenizer = build_policy(recipe)
    policy.train()
    stage = make_stage(recipe, tokenizer, policy, device)
    prepare_models(policy, stage, recipe, device)  # train.precision
    optimizer = make_optimizer(policy, recipe, stage.parameters())
    params = [p for p in policy.parameters() if p.requires_grad] + list(stage.parameters())
    split = {"sample_s": 0.0, "reference_s": 0.0, "update_s": 0.0}
    elapsed = cpu = 0.0
    steps = []
    for step in range(job.steps + 1):  # step 0 warms up
        t0, c0 = time.perf_counter(), time.process_time()
        rollout = stage.next_batch()
        t1 = time.perf_counter()
        for part in stage.updates(rollout):
            loss, _ = stage.loss(policy, part)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # as the loop (grad_clip 1) and TRL do
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if step:
            steps.append(t2 - t0)
            elapsed += t2 - t0
            cpu += time.process_time() - c0
            split["sample_s"] += stage.last_timing["sample_s"]
            split["reference_s"] += stage.last_timing["reference_s"]
            split["update_s"] += t2 - t1
    return {
        "completions_per_s": job.completions / elapsed,
        "seconds": elapsed,
        "cpu_s": cpu,
        "median_step_s": statistics.median(steps),
        "split": {k: v / elapsed for k, v in split.items()},
    }


def bench_trl(job: RLJob) -> dict[str, Any]:
    """TRL's side: ``GRPOTrainer`` on the same prompts (tether's own prompt text, chat template
    applied), rewards from the same checker, the same GRPO settings."""
    # an optional dependency (tether[bench]): only the TRL side needs it
    from trl import GRPOConfig, GRPOTrainer

    recipe = rl_recipe(job)
    task = task_from_config(recipe.task, recipe.seed)
    policy, tokenizer = load_model_and_tokenizer(bench_target(job.model).init)
    rng = random.Random(job.seed)
    problems = [task.rl_problem(rng) for _ in range(job.prompts_per_step * (job.steps + 1))]
    prompts = [task.model_input(tokenizer, p) for p in problems]  # the stage's, in its order
    answers = dict(zip(prompts, problems, strict=True))  # a prompt's text fixes its answer
    reward_correct, reward_wrong = recipe.rl.reward_correct, recipe.rl.reward_wrong

    def reward(prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
        return [
            reward_correct if task.is_correct(answers[p], c) else reward_wrong
            for p, c in zip(prompts, completions, strict=True)
        ]

    timer = StepTimer()
    assert job.max_new_tokens is not None and job.lora is not None, "resolve the job first"
    config = GRPOConfig(
        **trl_args(job),
        per_device_train_batch_size=job.prompts_per_step * job.group,
        num_generations=job.group,
        max_completion_length=job.max_new_tokens,
        temperature=job.temperature,
        beta=KL_COEF,
        loss_type=GRPO_LOSS,
        scale_rewards="group",
        num_iterations=1,
        epsilon=CLIP_EPS,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        callbacks=[timer],
        peft_config=trl_peft_config(job.lora),
    )
    timed = run_trl(trainer, timer)
    return {"completions_per_s": job.completions / timed["seconds"], **timed}


def bench_rl(job: RLJob) -> dict[str, Any]:
    """Both sides of one RL job and their ratio. Whatever the libraries print (TRL's metrics,
    an optional accelerator library's notices on import) goes to stderr: stdout carries the
    figures only."""
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    job = job.resolved()
    with contextlib.redirect_stdout(sys.stderr):
        ours = bench_tether(job)
        theirs = bench_trl(job)
    return {
        "job": {
            **dataclasses.asdict(job),
            "algorithm": f"grpo ({GRPO_LOSS} loss, group std, one update per batch)",
            "kl": f"k3 in the loss, coefficient {KL_COEF}",
            "threads": torch.get_num_threads(),
        },
        "machine": machine(job.onednn_linear),
        "tether": ours,
        "trl_grpo": theirs,
        "ratio": ours["completions_per_s"] / theirs["completions_per_s"],
    }


# ---------------------------------------------------------------- tether bench imitation


def bench_imitation(
    steps: int = 20, batch_size: int = 64, online_fraction: float = 0.1, seed: int = 0
) -> dict[str, Any]:
    """The cost of IQLearn over MLE on the ``imitation-multistep`` recipe's model.

    ``objective``: forward + loss + backward on one identical batch, MLE loss vs IQLearn loss,
    alternated and timed ``steps`` times each (median); this isolates what the TD term costs.
    ``step``: whole training steps (batch drawing, and for online IQLearn the policy samples,
    forward, backward, AdamW) of each variant, median seconds per step.
    """
    variants = {
        "mle": ["train.stage=mle"],
        "iqlearn": ["train.stage=iqlearn"],
        "iqlearn_online": ["train.stage=iqlearn", f"imitation.online_fraction={online_fraction}"],
    }

    def setup(overrides: list[str]) -> tuple[Any, Any, Any]:
        recipe = load_recipe(
            "imitation-multistep", [f"seed={seed}", f"train.batch_size={batch_size}", *overrides]
        )
        torch.manual_seed(seed)
        model, tokenizer = build_policy(recipe)
        stage = ImitationStage(recipe, tokenizer, model, torch.device("cpu"))
        return model, stage, make_optimizer(model, recipe)

    # the objective alone, on one batch
    model, iq_stage, _ = setup(variants["iqlearn"])
    _, mle_stage, _ = setup(variants["mle"])
    batch = iq_stage.next_batch()
    assert isinstance(batch, DemonstrationBatch)
    times: dict[str, list[float]] = {"mle": [], "iqlearn": []}
    for i in range(steps + 2):
        for name, stage, b in (("mle", mle_stage, batch), ("iqlearn", iq_stage, batch)):
            t0 = time.perf_counter()
            loss, _ = stage.loss(model, b)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if i >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
    objective = {k: statistics.median(v) for k, v in times.items()}

    step_s: dict[str, float] = {}
    tokens: dict[str, float] = {}
    for name, overrides in variants.items():
        model, stage, optimizer = setup(overrides)
        per_step, n_tokens = [], []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            b = stage.next_batch()
            loss, _ = stage.loss(model, b)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= 2:
                per_step.append(time.perf_counter() - t0)
                n_tokens.append(b.num_tokens)
        step_s[name] = statistics.median(per_step)
        tokens[name] = sum(n_tokens) / sum(per_step)
    return {
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "objective_s": objective,
        "objective_ratio": objective["iqlearn"] / objective["mle"],
        "step_s": step_s,
        "tokens_per_s": tokens,
        "step_ratio": {k: v / step_s["mle"] for k, v in step_s.items()},
    }
