"""FSDP (FSDP2, through accelerate's FSDP plugin) on the CPU over gloo, 2 processes: every
stage ends where 1 process (the stages that read their batches from data) or DDP on 2
processes (the stages that sample: their rollouts are the same under DDP and FSDP, each
process sampling its share with its own generator) ends; a sharded checkpoint resumes exactly.

One ``accelerate launch`` with ``configs/accelerate/fsdp.yaml`` trains every stage in the same
two processes (tests/distributed/stages.py), so the processes start once. Measured (``pytest
-s`` prints them), largest absolute parameter difference after 3 AdamW steps: against 1
process mle 2.6e-8, iqlearn 3.7e-9, dpo 1.2e-7, reward-model 3.4e-7; against DDP rl (A2C, with
its value head, 5 steps) 7.5e-9, rl with GRPO (2 updates per collect) 3.4e-7, online-dpo 0,
xpo 0, dpg 0. The file costs about 95 s on 2 cores (one FSDP launch for every stage, one DDP
launch, one resumed launch; 109 s with other jobs running)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_distributed import (
    ATOL,
    LOSS_TOL,
    STAGES,
    TINY,
    launch_failure,
    max_difference,
    torchrun,
    weights,
)
from tether.config import load_recipe
from tether.engine.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).parent
FSDP_CONFIG = HERE.parent / "configs" / "accelerate" / "fsdp.yaml"
# what `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets, for torchrun
FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
}
OFFLINE = ["mle", "iqlearn", "dpo", "reward-model"]
SAMPLING = ["rl", "rl-grpo", "online-dpo", "xpo", "dpg"]


def overrides(stage: str, reference: Path) -> list[str]:
    """The recipe of ``stage``; ``rl-ALGORITHM``: the rl stage with an algorithm that has no
    value head (RLOO, REINFORCE, GRPO), on groups of 2 samples per prompt."""
    init = f"model.init={reference}"
    if stage.startswith("rl-"):
        algorithm = stage.removeprefix("rl-")
        rl = [init, "task.name=first-digit", f"rl.algorithm={algorithm}"]
        rl += ["rl.prompts_per_step=4", "rl.group_size=2"]  # RLOO's and GRPO's groups
        if algorithm == "grpo":  # a second pass over each collect: the clipped ratio to the
            rl += ["rl.ppo_epochs=2"]  # sampling policy moves off 1 (TRL's num_iterations)
        return [*TINY, "train.stage=rl", *rl]
    extra = {
        **{s: STAGES[s] for s in OFFLINE},
        # 5 steps, a checkpoint at 2 and 4: the resumed run repeats step 5
        "rl": [init, "task.name=first-digit", "rl.algorithm=a2c", "rl.prompts_per_step=4"]
        + ["train.steps=5", "train.eval_every=5"],
        "online-dpo": [init, "task.name=first-digit"],
        "xpo": [init, "task.name=first-digit"],
        "dpg": [init, "task.name=enumerable", "dpg.prompts_per_step=2", "dpg.samples_per_step=8"]
        + ["dpg.proposal=adaptive", "dpg.log_z=running"],
    }[stage]
    if stage == "dpo":
        extra = [*extra, init]
    return [*TINY, f"train.stage={stage}", *extra]


def launch(plan: dict[str, list[str]], where: Path, fsdp: bool) -> None:
    """Train every run of ``plan`` in one 2-process launch: ``accelerate launch`` with the
    FSDP config, or ``torchrun`` (DDP)."""
    plan_file = where / "plan.json"
    plan_file.write_text(json.dumps(plan))
    script = [str(HERE / "distributed" / "stages.py"), str(plan_file)]
    if not fsdp:
        torchrun([], where, script=script)
        return
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG)]
    cmd += ["--num_processes", "2", "--main_process_port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [*cmd, *script], cwd=where, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, launch_failure(proc.stderr)


@pytest.fixture(scope="module")
def fsdp_runs(tiny_checkpoint, tmp_path_factory):
    """Every stage trained under FSDP on 2 processes: {stage: run folder}."""
    root = tmp_path_factory.mktemp("fsdp")
    runs = {s: root / s for s in OFFLINE + SAMPLING}
    launch({str(runs[s]): overrides(s, tiny_checkpoint) for s in runs}, root, fsdp=True)
    return runs


def losses(run: Path) -> list[float]:
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("stage", OFFLINE)
def test_fsdp_on_two_processes_ends_where_one_process_does(
    stage, fsdp_runs, tiny_checkpoint, tmp_path
):
    one = tmp_path / "one"
    train(load_recipe(None, overrides(stage, tiny_checkpoint)), one, progress=False)
    two = fsdp_runs[stage]
    assert max_difference(weights(one), weights(two)) < ATOL
    assert losses(two) == pytest.approx(losses(one), **LOSS_TOL)
    # a sharded checkpoint: the whole weights, and each process's optimizer shard
    saved = two / "checkpoints" / "step-000002"
    assert {p.name for p in saved.glob("optimizer-rank-*.pt")} == {
        "optimizer-rank-0.pt",
        "optimizer-rank-1.pt",
    }
    assert not list((two / "checkpoints").glob("*.tmp"))


def test_sampling_stages_under_fsdp_end_where_ddp_does(fsdp_runs, tiny_checkpoint, tmp_path):
    """The processes sample with the whole weights gathered (tether.distributed.full_weights)
    and with the generators DDP's processes have, so the rollouts, and the weights after
    them, are DDP's."""
    ddp = {s: tmp_path / s for s in SAMPLING}
    launch({str(ddp[s]): overrides(s, tiny_checkpoint) for s in SAMPLING}, tmp_path, fsdp=False)
    for stage in SAMPLING:
        worst = max_difference(weights(ddp[stage]), weights(fsdp_runs[stage]))
        print(f"fsdp {stage} against DDP: {worst:.1e}")
        assert worst < ATOL, stage
        assert losses(fsdp_runs[stage]) == pytest.approx(losses(ddp[stage]), **LOSS_TOL), stage


def test_a_sharded_fsdp_checkpoint_resumes_exactly(fsdp_runs, tmp_path):
    """The A2C run (the policy sharded, its value head outside FSDP, both in one optimizer)
    resumed from its step-4 checkpoint with torchrun and the FSDP variables repeats the
    uninterrupted run's metrics and final weights exactly."""
    run = tmp_path / "rl"
    shutil.copytree(fsdp_runs["rl"], run)
    whole = (run / "metrics.jsonl").read_text().splitlines()
    final = weights(run)
    (run / "summary.json").unlink()  # the run as if stopped after its step-4 checkpoint
    shutil.rmtree(run / "model")
    env = {**os.environ, **FSDP_ENV}
    torchrun(["train", "--resume", str(run), "--quiet"], tmp_path, env=env)
    timing = ("tokens_per_s", "elapsed_s", "peak_rss_mb")

    def rows(lines):
        return [{k: v for k, v in json.loads(r).items() if k not in timing} for r in lines]

    assert rows((run / "metrics.jsonl").read_text().splitlines()) == rows(whole)
    assert max_difference(final, weights(run)) == 0.0
