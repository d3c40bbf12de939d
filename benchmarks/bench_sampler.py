"""Tokens/s of tether's sampler against ``transformers``' ``model.generate`` on a tiny model.

    python benchmarks/bench_sampler.py --arch llama --layers 4 --width 128 --heads 4 \
        --batch 64 --new-tokens 300 --repeats 3 [--threads 2] [--eos] [--json]

Builds a randomly initialised model with the character tokenizer and takes addition prompts
(left padding included: the operands have different lengths).

Default mode, the like-for-like comparison: greedy decoding of exactly ``--new-tokens``
tokens per row on both sides (tether with ``ignore_eos=True``, HF with
``min_new_tokens == max_new_tokens``), so both do the same work and produce the same tokens.

``--eos``: temperature-1 sampling with EOS enabled on both sides (HF with ``top_k=0``, so
the same distribution). A random model emits EOS on ~1% of steps, so rows end at scattered
steps, as completions of real tasks do; tokens/s counts each row's tokens up to its EOS.
This shows what retiring finished rows is worth: ``generate`` keeps computing them.

Each side gets one untimed warm-up, then the best of ``--repeats`` runs is reported (the one
least disturbed by other processes on the machine).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from tether.generation.sampler import sample
from tether.models.loading import build_model, char_tokenizer
from tether.tasks.addition import pretrain_problem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["llama", "gpt2"], default="llama")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--digits", type=int, default=8, help="operand digits of the prompts (1..N)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eos", action="store_true", help="temperature-1 sampling, EOS enabled")
    ap.add_argument("--skip-hf", action="store_true", help="time tether only")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = char_tokenizer()
    eos = tokenizer.eos_token_id
    n_new = args.new_tokens
    rng = random.Random(args.seed)
    prompts = [pretrain_problem(rng, args.digits).prompt for _ in range(args.batch)]
    model = build_model(
        tokenizer,
        arch=args.arch,
        n_layer=args.layers,
        n_head=args.heads,
        n_embd=args.width,
        max_positions=max(1024, 64 + n_new),
    ).eval()
    gen = torch.Generator().manual_seed(args.seed)

    def run_tether() -> int:
        if args.eos:
            out = sample(
                model, tokenizer, prompts, max_new_tokens=n_new, temperature=1.0, generator=gen
            )
        else:
            out = sample(model, tokenizer, prompts, max_new_tokens=n_new, ignore_eos=True)
        return int(out.completion_mask.sum())

    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"

    def run_hf() -> int:
        # called as users call it (generate applies no_grad itself)
        if args.eos:
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=n_new,
                pad_token_id=tokenizer.pad_token_id,
            )
        else:
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                pad_token_id=tokenizer.pad_token_id,
            )
        completions = out[:, enc["input_ids"].shape[1] :].tolist()
        # tokens up to and including each row's first EOS (generate pads after it)
        return sum(row.index(eos) + 1 if eos in row else len(row) for row in completions)

    def timed(fn) -> tuple[float, list[float], int]:
        fn()  # warm-up
        times, tokens = [], 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            n = fn()
            times.append(time.perf_counter() - t0)
            tokens += n
        # tokens/s of the fastest run; in --eos mode each run draws different lengths, so
        # use the mean token count over the runs
        return tokens / args.repeats / min(times), times, tokens // args.repeats

    result: dict = {
        "arch": args.arch,
        "layers": args.layers,
        "width": args.width,
        "heads": args.heads,
        "batch": args.batch,
        "new_tokens": n_new,
        "mode": "eos-sampling" if args.eos else "fixed-length-greedy",
        "prompt_tokens_max": int(enc["input_ids"].shape[1]),
        "threads": args.threads,
    }
    result["tether_tok_s"], result["tether_times_s"], result["tether_tokens"] = timed(run_tether)
    if not args.skip_hf:
        result["hf_tok_s"], result["hf_times_s"], result["hf_tokens"] = timed(run_hf)
        result["ratio"] = result["tether_tok_s"] / result["hf_tok_s"]

    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{args.arch} {args.layers}x{args.width} ({args.heads} heads), batch {args.batch}, "
        f"up to {n_new} new tokens, {result['mode']}, {args.threads} threads"
    )
    print(f"  tether sample : {result['tether_tok_s']:10.0f} tok/s")
    if not args.skip_hf:
        print(f"  HF generate   : {result['hf_tok_s']:10.0f} tok/s")
        print(f"  ratio         : {result['ratio']:10.2f}x")


if __name__ == "__main__":
    main()
