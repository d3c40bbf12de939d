"""Peak memory (RSS) per process of SmolLM2-135M training on the CPU: 1 process, and 2
processes under DDP, FSDP (FSDP2) and DeepSpeed ZeRO-2 / ZeRO-3, two steps of the mle stage
(AdamW: weights, gradients and two moments per parameter, what sharding divides).

    .venv/bin/python benchmarks/distributed_memory.py [--modes one,ddp,fsdp,zero2,zero3]

Prints a Markdown table (docs/distributed.md). Each process reports its own peak RSS
(``resource.getrusage``); RSS also counts what every process holds besides the policy (torch,
the tokenizer, the frozen reference where a stage has one), the same under every mode.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"
LAUNCH = {
    "one": [],
    "ddp": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
    "fsdp": ["-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml")],
    "zero2": ["-m", "accelerate.commands.launch", "--config_file"]
    + [str(CONFIGS / "deepspeed-zero2.yaml")],
    "zero3": ["-m", "accelerate.commands.launch", "--config_file"]
    + [str(CONFIGS / "deepspeed-zero3.yaml")],
}


def overrides(model: str) -> list[str]:
    return [
        f"model.init={model}",
        "train.stage=mle",
        "task.max_digits=2",
        "train.steps=2",
        "train.batch_size=4",
        "train.eval_every=2",
        "train.checkpoint_every=1000",
        "train.threads=1",
        "eval.n=4",
        "eval.digits=[]",  # no evaluation table: the memory of training, checked quickly
    ]


def worker(model: str, out: str, report: str) -> None:
    """One process of a run: train, then append this process's peak RSS to ``report``."""
    from tether import distributed
    from tether.config import load_recipe
    from tether.engine.loop import train

    train(load_recipe(None, overrides(model)), out, progress=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open(report, "a") as f:
        f.write(json.dumps({"rank": distributed.rank(), "peak_rss_mb": round(peak_mb)}) + "\n")


def measure(mode: str, model: str, where: Path) -> list[int]:
    report = where / f"{mode}.jsonl"
    launcher = LAUNCH[mode]
    if mode in ("fsdp", "zero2", "zero3"):
        launcher = [*launcher, "--num_processes", "2", "--main_process_port", "0"]
    cmd = [sys.executable, *launcher, __file__, "--worker", model, str(where / mode), str(report)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        said = [line for line in proc.stderr.splitlines() if "rror" in line]
        raise SystemExit(f"{mode} failed:\n" + "\n".join(said[-15:]))
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    return [r["peak_rss_mb"] for r in sorted(rows, key=lambda r: r["rank"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="one,ddp,fsdp,zero2,zero3")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "OUT", "REPORT"))
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    from tether.models.loading import SMOLLM2, load_model_and_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        model, tokenizer = load_model_and_tokenizer(SMOLLM2)  # saved once: reloads in ~3 s
        model.save_pretrained(where / "smollm2")
        tokenizer.save_pretrained(where / "smollm2")
        del model
        print("| launch | peak RSS per process (MB) |\n|---|---|")
        for mode in args.modes.split(","):
            peaks = measure(mode, str(where / "smollm2"), where)
            print(f"| {mode} | {' / '.join(str(p) for p in peaks)} |", flush=True)


if __name__ == "__main__":
    main()
