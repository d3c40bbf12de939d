"""``tether bench rl``: the same RL job in tether and in TRL's ``GRPOTrainer``, in one process.

Same model (a policy and a frozen reference from the same checkpoint), same prompts (the
addition task's RL distribution for the checkpoint's N), same batch (K prompts × G completions
per step), same completion length and sampling temperature, KL on (k3 in the loss, as GRPO
does). tether runs its RL stage with RLOO over the same groups. The figure is completions per
second of whole training steps (sampling, reference scoring, update), after one warm-up step
on each side.
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
from tether.config import TaskConfig, load_recipe
from tether.engine.setup import build_policy, make_optimizer
from tether.models.loading import (
    checkpoint_max_digits,
    load_model_and_tokenizer,
    resolve_checkpoint,
)
from tether.stages.imitation import ImitationStage
from tether.stages.rl import RLStage
from tether.tasks import addition

KL_COEF = 0.04  # TRL's GRPO beta for the KL term; tether uses the same coefficient


@dataclass(frozen=True)
class RLJob:
    """One RL job, run identically on both sides."""

    model: str = "addition-n3"
    prompts_per_step: int = 8
    group: int = 4
    max_new_tokens: int = 300
    temperature: float = 1.0
    steps: int = 3
    seed: int = 0

    @property
    def completions(self) -> int:
        """Completions over the timed steps (the warm-up step is not counted)."""
        return self.steps * self.prompts_per_step * self.group


def rl_overrides(
    prompts_per_step: int, group: int, max_new_tokens: int, temperature: float
) -> list[str]:
    """The RL stage as the TRL comparison runs it: RLOO over groups, k3 KL in the loss."""
    return [
        "train.stage=rl",
        "rl.algorithm=rloo",
        f"rl.group_size={group}",
        f"rl.prompts_per_step={prompts_per_step}",
        f"rl.max_new_tokens={max_new_tokens}",
        f"rl.temperature={temperature}",
        "rl.kl_estimator=k3",
        f"rl.kl_coef={KL_COEF}",
        "rl.entropy_coef=0.0",
    ]


def trl_args(job: Any, warmup: int = 1) -> dict[str, Any]:
    """TrainingArguments every TRL side shares: ``job.steps`` timed steps after ``warmup``
    steps, on the CPU, in fp32 without gradient checkpointing (tether's way; TRL's defaults
    are bf16 autocast and recomputation), the examples in order, no logging or saving."""
    return dict(
        output_dir="/tmp/tether-bench-trl",
        max_steps=job.steps + warmup,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        seed=job.seed,
        learning_rate=3e-4,
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
    recipe = load_recipe(
        "critical-tokens",
        [
            f"model.init={job.model}",
            f"seed={job.seed}",
            *rl_overrides(job.prompts_per_step, job.group, job.max_new_tokens, job.temperature),
        ],
    )
    torch.manual_seed(job.seed)
    policy, tokenizer = build_policy(recipe)
    policy.train()
    stage = RLStage(recipe, tokenizer, policy, torch.device("cpu"))
    optimizer = make_optimizer(policy, recipe, stage.parameters())
    params = list(policy.parameters())
    split = {"sample_s": 0.0, "reference_s": 0.0, "update_s": 0.0}
    elapsed = cpu = 0.0
    steps = []
    for step in range(job.steps + 1):  # step 0 warms up
        t0, c0 = time.perf_counter(), time.process_time()
        rollout = stage.next_batch()
        t1 = time.perf_counter()
        loss, _ = stage.loss(policy, rollout)
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
    # an optional dependency (tether[bench]): only the TRL side needs it
    from trl import GRPOConfig, GRPOTrainer

    # N of the addition prompts: the checkpoint's, else the recipe's default (a pretrained
    # model or Hugging Face folder records none)
    max_digits = checkpoint_max_digits(resolve_checkpoint(job.model)) or TaskConfig().max_digits
    policy, tokenizer = load_model_and_tokenizer(job.model)
    rng = random.Random(job.seed)
    problems = [
        addition.rl_problem(rng, max_digits) for _ in range(job.prompts_per_step * (job.steps + 1))
    ]
    answers = {p.prompt: p for p in problems}

    def reward(prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
        return [
            1.0 if addition.is_correct(answers[p], c) else -1.0
            for p, c in zip(prompts, completions, strict=True)
        ]

    timer = StepTimer()
    config = GRPOConfig(
        **trl_args(job),
        per_device_train_batch_size=job.prompts_per_step * job.group,
        num_generations=job.group,
        max_completion_length=job.max_new_tokens,
        temperature=job.temperature,
        beta=KL_COEF,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": [p.prompt for p in problems]}),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    timed = run_trl(trainer, timer)
    return {"completions_per_s": job.completions / timed["seconds"], **timed}


def bench_rl(job: RLJob) -> dict[str, Any]:
    ours = bench_tether(job)
    theirs = bench_trl(job)
    return {
        "job": {
            **dataclasses.asdict(job),
            "kl": f"k3 in the loss, coefficient {KL_COEF}",
            "threads": torch.get_num_threads(),
        },
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
