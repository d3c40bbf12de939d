"""``tether bench rl``: the same RL job in tether and in TRL's ``GRPOTrainer``, in one process.

Same model (a policy and a frozen reference from the same checkpoint), same prompts (the
addition task's RL distribution), same batch (K prompts × G completions per step), same
completion length and sampling temperature, KL on (k3 in the loss, as GRPO does). tether runs
its RL stage with RLOO over the same groups. The figure is completions per second of whole
training steps (sampling, reference scoring, update), after one warm-up step on each side.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from typing import Any

import torch

from tether.config import load_recipe


def bench_tether(
    model: str,
    prompts_per_step: int,
    group: int,
    max_new_tokens: int,
    temperature: float,
    steps: int,
    seed: int = 0,
) -> dict[str, Any]:
    from tether.rl import RLStage
    from tether.train import build_policy, make_optimizer

    recipe = load_recipe(
        "critical-tokens",
        [
            f"model.init={model}",
            f"seed={seed}",
            "rl.algorithm=rloo",
            f"rl.group_size={group}",
            f"rl.prompts_per_step={prompts_per_step}",
            f"rl.max_new_tokens={max_new_tokens}",
            f"rl.temperature={temperature}",
            "rl.kl_estimator=k3",
            "rl.kl_coef=0.04",
            "rl.entropy_coef=0.0",
        ],
    )
    torch.manual_seed(seed)
    policy, tokenizer = build_policy(recipe)
    policy.train()
    stage = RLStage(recipe, tokenizer, policy, torch.device("cpu"))
    optimizer = make_optimizer(policy, recipe, stage.parameters())
    split = {"sample_s": 0.0, "reference_s": 0.0, "update_s": 0.0}
    elapsed = 0.0
    for step in range(steps + 1):  # step 0 warms up
        t0 = time.perf_counter()
        rollout = stage.next_batch()
        t1 = time.perf_counter()
        loss, _ = stage.loss(policy, rollout)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if step:
            elapsed += t2 - t0
            split["sample_s"] += stage.last_timing["sample_s"]
            split["reference_s"] += stage.last_timing["reference_s"]
            split["update_s"] += t2 - t1
    completions = steps * prompts_per_step * group
    return {
        "completions_per_s": completions / elapsed,
        "seconds": elapsed,
        "split": {k: v / elapsed for k, v in split.items()},
    }


def bench_trl(
    model: str,
    prompts_per_step: int,
    group: int,
    max_new_tokens: int,
    temperature: float,
    steps: int,
    seed: int = 0,
) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tether.models import resolve_checkpoint
    from tether.tasks import addition

    path = str(resolve_checkpoint(model))
    rng = random.Random(seed)
    problems = [addition.rl_problem(rng, 3) for _ in range(prompts_per_step * (steps + 1))]
    answers = {p.prompt: p for p in problems}

    def reward(prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
        return [
            1.0 if addition.is_correct(answers[p], c) else -1.0
            for p, c in zip(prompts, completions, strict=True)
        ]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.starts.append(time.perf_counter())

    timer = StepTimer()
    config = GRPOConfig(
        output_dir="/tmp/tether-bench-trl",
        per_device_train_batch_size=prompts_per_step * group,
        num_generations=group,
        max_completion_length=max_new_tokens,
        temperature=temperature,
        beta=0.04,
        max_steps=steps + 1,
        use_cpu=True,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        seed=seed,
        learning_rate=3e-4,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": [p.prompt for p in problems]}),
        processing_class=AutoTokenizer.from_pretrained(path),
        callbacks=[timer],
    )
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints its metrics: keep stdout for ours
        trainer.train()
    end = time.perf_counter()
    elapsed = end - timer.starts[1]  # from the start of the second step: the first warms up
    completions = steps * prompts_per_step * group
    return {"completions_per_s": completions / elapsed, "seconds": elapsed}


def bench_rl(
    model: str = "addition-n3",
    prompts_per_step: int = 8,
    group: int = 4,
    max_new_tokens: int = 300,
    temperature: float = 1.0,
    steps: int = 3,
) -> dict[str, Any]:
    job = dict(
        model=model,
        prompts_per_step=prompts_per_step,
        group=group,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        steps=steps,
    )
    ours = bench_tether(**job)  # type: ignore[arg-type]
    theirs = bench_trl(**job)  # type: ignore[arg-type]
    return {
        "job": {
            **job,
            "kl": "k3 in the loss, coefficient 0.04",
            "threads": torch.get_num_threads(),
        },
        "tether": ours,
        "trl_grpo": theirs,
        "ratio": ours["completions_per_s"] / theirs["completions_per_s"],
    }
