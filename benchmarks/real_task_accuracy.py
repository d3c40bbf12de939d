"""How hard is the word-problem task for a real model? Accuracy of candidate designs.

For each design (an instruction style, ``max_digits`` and the operations) it draws ``--n``
problems from a fixed seed, puts them to the model through the task's prompt path (the chat
template with its default system prompt, as ``task.chat_template: auto`` does), samples one
completion per problem at T = 1 and one greedily, and reports the accuracies with 95% Wilson
intervals, the share of completions cut at the generation budget and their mean length.
``task.name: word-problems`` ships the design chosen from this table (docs/tasks.md).

    python benchmarks/real_task_accuracy.py                       # every design, 200 each
    python benchmarks/real_task_accuracy.py --model /path/to/hf --n 400 --designs number-2
    python benchmarks/real_task_accuracy.py --json out.json

The model defaults to the installed SmolLM2-135M-Instruct (``smollm2-135m-instruct``); any
local Hugging Face folder works.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass

import torch

from tether.eval.stats import wilson_ci
from tether.generation.sampler import sample
from tether.models.loading import load_model_and_tokenizer
from tether.tasks import WordProblemTask
from tether.tasks.word_problems import INSTRUCTIONS, KINDS, MAX_NEW_TOKENS, Kind


@dataclass(frozen=True)
class Design:
    instruction: str  # a key of INSTRUCTIONS
    max_digits: int
    kinds: tuple[Kind, ...] = KINDS

    @property
    def name(self) -> str:
        kinds = "mixed" if self.kinds == KINDS else "+".join(self.kinds)
        return f"{kinds}-{self.max_digits}-{self.instruction}"


# the shipped design (task.name: word-problems, task.max_digits: 1) first
DESIGNS = [
    Design("number", 1),
    Design("number", 1, ("story",)),
    Design("number", 1, ("question",)),
    Design("number", 2),
    Design("number", 2, ("story",)),
    Design("answer-line", 1, ("story",)),
    Design("none", 1, ("story",)),
]


def measure(model, tokenizer, design: Design, n: int, seed: int, batch: int) -> dict:
    task = WordProblemTask(
        design.max_digits, instruction=INSTRUCTIONS[design.instruction], kinds=design.kinds
    )
    rng = random.Random(f"real-task-accuracy/{seed}")
    problems = [task.rl_problem(rng) for _ in range(n)]
    prompts = [task.model_input(tokenizer, p) for p in problems]
    generator = torch.Generator().manual_seed(seed)
    row: dict = {"design": design.name, "n": n}
    for mode, temperature in (("sampled", 1.0), ("greedy", 0.0)):
        out = sample(
            model,
            tokenizer,
            prompts,
            max_new_tokens=MAX_NEW_TOKENS,
            temperature=temperature,
            generator=generator,
            batch_size=batch,
        )
        right = sum(task.is_correct(p, t) for p, t in zip(problems, out.texts, strict=True))
        low, high = wilson_ci(right, n)
        row[mode] = {
            "correct": right,
            "accuracy": right / n,
            "ci95": [low, high],
            "truncated": sum(not f for f in out.finished) / n,
            "mean_tokens": float(out.completion_mask.sum(1).float().mean()),
            "examples": [
                {"prompt": p.prompt, "completion": t, "answer": p.answer}
                for p, t in list(zip(problems, out.texts, strict=True))[:3]
            ],
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=200, help="problems per design")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--designs", nargs="*", help="names to run (default: all)")
    ap.add_argument("--json", help="write the rows (with example completions) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    designs = [d for d in DESIGNS if not args.designs or d.name in args.designs]
    rows = []
    print(
        "| design | n | sampled T=1 [95% Wilson] | greedy [95% Wilson] | cut (T=1) | tokens (T=1) |"
    )
    print("|---|---|---|---|---|---|")
    for design in designs:
        row = measure(model, tokenizer, design, args.n, args.seed, args.batch)
        rows.append(row)
        s, g = row["sampled"], row["greedy"]
        print(
            f"| {row['design']} | {row['n']} "
            f"| {s['accuracy']:.1%} [{s['ci95'][0]:.1%}, {s['ci95'][1]:.1%}] "
            f"| {g['accuracy']:.1%} [{g['ci95'][0]:.1%}, {g['ci95'][1]:.1%}] "
            f"| {s['truncated']:.0%} | {s['mean_tokens']:.1f} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
