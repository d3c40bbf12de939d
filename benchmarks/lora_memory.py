"""Memory a KL-tethered stage holds, with and without LoRA: the parameter bytes of the policy
and its reference (each storage counted once), and the training state of one AdamW step
(gradients and the two moment estimates), measured on real tensors.

    python benchmarks/lora_memory.py [--model addition-n3] [--model smollm2-135m-instruct]
        [--r 8] [--json]

Without LoRA the reference is a second, frozen copy of ``model.init``; with LoRA it is the
policy with its adapters off (no copy), and only the adapters have gradients and moments.
"""

from __future__ import annotations

import argparse
import json

import torch

from tether.config import load_recipe
from tether.engine.setup import build_policy, make_optimizer
from tether.models.loading import SMOLLM2, smollm2_gguf
from tether.models.lora import held_parameter_bytes, reference_policy
from tether.objectives import mle_loss, shifted_token_logprobs

MB = 1024**2


def measure(init: str, lora: bool, r: int) -> dict[str, float]:
    overrides = [f"model.init={init}", "train.stage=rl"]
    if lora:
        overrides.append(f"model.lora.r={r}")
    recipe = load_recipe(None, overrides)
    policy, tokenizer = build_policy(recipe)
    reference = reference_policy(recipe, policy, torch.device("cpu"))
    optimizer = make_optimizer(policy, recipe)
    ids = tokenizer(["12+34=46"] * 2, return_tensors="pt")["input_ids"]
    loss, _ = mle_loss(
        shifted_token_logprobs(policy(input_ids=ids).logits, ids), torch.ones(ids.shape)
    )
    loss.backward()
    grads = sum(p.grad.nbytes for p in policy.parameters() if p.grad is not None)
    optimizer.step()
    moments = sum(
        t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    weights = held_parameter_bytes(policy, reference)
    return {
        "parameters_mb": weights / MB,
        "trainable": trainable,
        "grads_and_adam_mb": (grads + moments) / MB,
        "total_mb": (weights + grads + moments) / MB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model.init (repeatable)")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    models = args.model or ["addition-n3"] + ([SMOLLM2] if smollm2_gguf() else [])
    rows = []
    for init in models:
        for lora in (False, True):
            rows.append({"model": init, "lora": lora, **measure(init, lora, args.r)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| model | LoRA | policy + reference weights | trainable | grads + AdamW | total |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model']} | {f'r={args.r}' if row['lora'] else 'off'} "
            f"| {row['parameters_mb']:.1f} MB | {row['trainable']:,} "
            f"| {row['grads_and_adam_mb']:.1f} MB | {row['total_mb']:.1f} MB |"
        )


if __name__ == "__main__":
    main()
