"""The prioritised KL's weights on a 99-token and a 49k-token vocabulary: what β_c means.

The prioritised KL weighs each completion token's KL by w = Ĵ^β_c, Ĵ = 1 − u/S the frozen
reference's certainty at that state (docs/rl.md, "The certainty's scale"). This measures, for
the reference at the tokens of its own T = 1 samples (what the RL stage sees at its first step,
batch by batch as a step sees them):

- the per-token entropy H (nats) and max-probability p_max of the reference, as quantiles;
- for each candidate rule for Ĵ and β_c in 10, 50, 150, 500: the mean and median weight and
  the shares of tokens below 0.5, below 0.05 and above 0.95. The rules: the paper's
  1 − H/log V; a fixed reference vocabulary, 1 − H/log 99 (β_c means the same per nat on every
  model); the released code's max-probability form (T = 4, and T = 1 against log V or log 99);
  and the default, 1 − H/(κ·H̄) with H̄ the reference's mean entropy over the step's tokens;
- how far the default moves the shipped model's weights from the paper's, per token.

Settings: ``addition-n3`` on the addition task's N+1 RL distribution (the ``critical-tokens``
recipe: T = 1, 50 prompts a step, the task's budget); SmolLM2-135M-Instruct on
``word-problems`` (max_digits 1) and on the prompt-only recipe of issue 18 ("What is 23+58?
Answer with the number only.", two-digit operands, 4 prompts x 4 samples a step, 24 new
tokens), both through the chat template with its default system prompt.

    python benchmarks/kl_weight_distribution.py [--smollm2 /path/to/hf] [--n 96]
"""

from __future__ import annotations

import argparse
import math
import random

import torch

from tether.generation.sampler import sample
from tether.models.loading import load_model_and_tokenizer
from tether.objectives.common import certainty, uncertainty
from tether.scoring import grouped_completion_logits
from tether.tasks import AdditionTask, WordProblemTask
from tether.tasks.prompts import PromptFormat, format_prompt

BETAS = (10.0, 50.0, 150.0, 500.0)
REFERENCE_VOCABULARY = 99  # the "nats" candidate: a fixed vocabulary for every model
CHOSEN = "typical: 1 − H/(343·H̄), H̄ per batch (the default)"
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def reference_at_own_samples(
    model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int
) -> tuple[torch.Tensor, int, int]:
    """The reference's logits [N, V] at every real token of its own T = 1 samples, how many
    samples ended on EOS, and the number of tokens."""
    out = sample(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        generator=torch.Generator().manual_seed(seed),
        batch_size=50,
    )
    ids = torch.cat([out.prompt_ids, out.completion_ids], dim=1)
    mask = torch.cat([out.prompt_mask, out.completion_mask], dim=1)
    with torch.no_grad():
        logits = grouped_completion_logits(model, ids, mask, out.prompt_ids.shape[1], 1.0)
    real = out.completion_mask.bool()
    return logits[real], sum(out.finished), int(real.sum())


def batch_certainties(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ĵ per token under each candidate rule, for one step's batch of tokens [N, V]."""
    log_v0 = math.log(REFERENCE_VOCABULARY)
    h = uncertainty(logits, "entropy", 1.0)
    min_entropy = uncertainty(logits, "max_prob", 1.0)
    return {
        "H": h,
        "vocabulary: 1 − H/log V (paper)": certainty(logits, "entropy"),
        f"nats: 1 − H/log {REFERENCE_VOCABULARY}": (1 - h / log_v0).clamp(0, 1),
        CHOSEN: certainty(logits, "entropy", normalization="typical"),
        "max_prob T=4: 1 + log p_max/log V (code)": certainty(logits, "max_prob"),
        "max_prob T=1: 1 + log p_max/log V": certainty(logits, "max_prob", 1.0),
        f"max_prob T=1: 1 + log p_max/log {REFERENCE_VOCABULARY}": (1 - min_entropy / log_v0).clamp(
            0, 1
        ),
        "max_prob T=4, typical": certainty(logits, "max_prob", normalization="typical"),
    }


def measure(name, model, tokenizer, prompts, max_new_tokens, batch, seed) -> None:
    """Sample and score one step's batch at a time; print the quantiles and weight table."""
    parts: dict[str, list[torch.Tensor]] = {}
    means, finished, tokens = [], 0, 0
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        logits, done, count = reference_at_own_samples(
            model, tokenizer, chunk, max_new_tokens, seed + start
        )
        finished, tokens = finished + done, tokens + count
        for key, value in batch_certainties(logits).items():
            parts.setdefault(key, []).append(value)
        log_p = torch.log_softmax(logits.float(), dim=-1)
        parts.setdefault("p_max", []).append(log_p.amax(-1).exp())
        means.append(float(parts["H"][-1].mean()))
        del logits, log_p
    j = {key: torch.cat(values) for key, values in parts.items()}
    h, p_max = j.pop("H"), j.pop("p_max")
    n = len(prompts)
    print(f"\n### {name}\n")
    print(
        f"{n} samples at T = 1 in batches of {batch}, {tokens / n:.1f} tokens each, "
        f"{finished / n:.0%} ended on EOS; {h.numel()} tokens. Mean entropy per batch: "
        + ", ".join(f"{m:.4f}" for m in means)
        + " nats\n"
    )
    q = torch.tensor(QUANTILES)
    print("| quantile | " + " | ".join(f"{x:.0%}" for x in QUANTILES) + " | mean |")
    print("|---|" + "---|" * (len(QUANTILES) + 1))
    hq, pq = torch.quantile(h, q), torch.quantile(p_max, q)
    print("| H (nats) | " + " | ".join(f"{x:.4f}" for x in hq) + f" | {h.mean():.4f} |")
    print("| p_max | " + " | ".join(f"{x:.4f}" for x in pq) + f" | {p_max.mean():.4f} |")
    paper, chosen = j["vocabulary: 1 − H/log V (paper)"], j[CHOSEN]
    change = (chosen.pow(150) - paper.pow(150)).abs()
    print(
        f"\nβ_c = 150, the chosen rule against the paper's, per token: mean |Δw| "
        f"{change.mean():.4f}, 99th percentile {torch.quantile(change, 0.99):.4f}\n"
    )
    print("| rule | β_c | mean w | median w | w < 0.5 | w < 0.05 | w > 0.95 |")
    print("|---|---|---|---|---|---|---|")
    for rule, cert in j.items():
        for beta in BETAS:
            w = cert.pow(beta)
            print(
                f"| {rule} | {beta:g} | {w.mean():.3f} | {w.median():.3f} "
                f"| {(w < 0.5).float().mean():.1%} | {(w < 0.05).float().mean():.1%} "
                f"| {(w > 0.95).float().mean():.1%} |",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm2", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=96, help="prompts per SmolLM2 setting")
    ap.add_argument("--n-char", type=int, default=200, help="prompts for addition-n3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(f"kl-weights/{args.seed}")

    # the critical-tokens recipe: 50 prompts per step, the task's budget
    model, tokenizer = load_model_and_tokenizer("addition-n3")
    task = AdditionTask(3)
    prompts = [task.model_input(tokenizer, task.rl_problem(rng)) for _ in range(args.n_char)]
    name = "addition-n3 on addition N+1 (critical-tokens), vocabulary 99"
    measure(name, model, tokenizer, prompts, task.max_new_tokens(), 50, args.seed)

    # the recipe: 4 prompts x 4 samples per step
    model, tokenizer = load_model_and_tokenizer(args.smollm2)
    words = WordProblemTask(1)
    prompts = [words.model_input(tokenizer, words.rl_problem(rng)) for _ in range(args.n)]
    name = "SmolLM2 on word-problems (max_digits 1), vocabulary 49152"
    measure(name, model, tokenizer, prompts, words.max_new_tokens(), 16, args.seed)

    fmt = PromptFormat()
    questions = [
        f"What is {rng.randint(10, 99)}+{rng.randint(10, 99)}? Answer with the number only."
        for _ in range(args.n // 4)
    ]
    prompts = [format_prompt(tokenizer, q, fmt) for q in questions for _ in range(4)]
    name = "SmolLM2 on the issue's recipe ('What is a+b? Answer with the number only.', 24 tokens)"
    measure(name, model, tokenizer, prompts, 24, 16, args.seed)


if __name__ == "__main__":
    main()
