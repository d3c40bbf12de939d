"""Run by tests/test_distributed.py, as one process or under torchrun: two steps of the RL
stage (A2C, or the algorithm given as a third argument: REINFORCE's baseline is a mean over every
process's tokens) on a global rollout that does not depend on the number of processes, then one
sharded rollout. Writes the trained parameters and the sampled prompts to OUT (a .pt file). A
fourth argument, a number, runs each process's rows in micro-batches of that many rows, as the
loop does (gradients accumulated without synchronising until the last one).

Every process builds the stage and samples the whole global rollout inside
``distributed.local()`` (the same seed, the same samples everywhere), then keeps its rows: what
the processes compute together must equal what one process computes on the whole rollout.
"""

import contextlib
import dataclasses
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from tether import distributed
from tether.config import load_recipe
from tether.engine.setup import build_policy, make_optimizer
from tether.stages.rl import RLStage


def rows_of(rollout, lo, hi):
    """The rollout's rows lo:hi (every tensor field with the batch dimension first)."""
    batch = rollout.input_ids.shape[0]
    out = {}
    for field in dataclasses.fields(rollout):
        value = getattr(rollout, field.name)
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
            value = value[lo:hi]
        out[field.name] = value
    return type(rollout)(**out)


def main(checkpoint: str, out: str, algorithm: str = "a2c", micro: str = "") -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    recipe = load_recipe(
        None,
        [
            "task.name=first-digit",
            f"model.init={checkpoint}",
            "train.stage=rl",
            f"rl.algorithm={algorithm}",  # a2c: a value head outside DDP, averaged by hand
            "rl.prompts_per_step=8",
            "rl.kl_estimator=k3",
            "rl.entropy_coef=0.01",
            "rl.gamma=0.9",  # returns vary along a row, so a per-process baseline would differ
            "rl.max_new_tokens=6",
            "reward.kind=python",
            f"reward.function={Path(__file__).parent / 'varied_reward.py'}:reward",
            "optim.lr=1e-2",
        ],
    )
    torch.manual_seed(0)
    policy, tokenizer = build_policy(recipe)
    with distributed.local():  # every process: the same stage, the same global rollouts
        stage = RLStage(recipe, tokenizer, policy, accelerator.device)
    optimizer = make_optimizer(policy, recipe, stage.parameters())
    model, optimizer = accelerator.prepare(policy, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    for _ in range(2):
        with distributed.local():
            rollout = stage.next_batch()
        share = rollout.input_ids.shape[0] // world
        mine = rows_of(rollout, rank * share, (rank + 1) * share)
        parts = stage.micro_batches(model, mine, int(micro)) if micro else [mine]
        for i, part in enumerate(parts):
            weight = 1.0 if part.share is None else part.share.weight
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                loss, _ = stage.loss(model, part)
                accelerator.backward(loss * weight)
        distributed.average_gradients(stage.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sharded = RLStage(recipe, tokenizer, policy, accelerator.device)  # the training path
    rollout = sharded.next_batch()
    prompts = tokenizer.batch_decode(
        rollout.input_ids[:, : rollout.prompt_len], skip_special_tokens=True
    )
    every = distributed.gather_objects(prompts)
    if accelerator.is_main_process:
        params = {
            n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()
        }
        if stage.value_head is not None:
            head = stage.value_head.named_parameters()
            params.update({f"value_head.{n}": p.detach().clone() for n, p in head})
        torch.save({"params": params, "prompts": every}, out)
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
