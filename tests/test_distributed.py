"""Many processes (DDP over gloo, on the CPU): 2 processes launched with torchrun end with the
same parameters as 1 process on the same global batch, and rollouts are sharded.

Tolerance: the processes sum their shares in another order than one process sums the whole
batch, so gradients differ in the last bits; after three AdamW steps every parameter agrees
within 1e-5 (absolute). Measured (``pytest -s`` prints them): mle 2.4e-8, iqlearn 3.7e-9,
dpo 6.2e-8, reward-model 3.2e-7, dpo with LoRA 1.5e-8, RL with A2C (value head)
1.2e-6.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tether.config import load_recipe
from tether.engine.checkpoints import RunDirError
from tether.engine.loop import train
from tether.models.loading import load_model_and_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
# The RL runs take two Adam steps at lr 1e-2: each weight moves by some 1e-2, and a weight whose
# gradient is near 0 takes a full-size Adam step whose sign the last float bits decide, so the
# two layouts' reduction orders show up as 0.85e-5 (the whole log-softmax) to 1.35e-5 (the
# chunked log-probs) of difference; a wrong baseline, count or synchronisation moves weights
# by the size of a step, 100 times this bound
RL_ATOL = 1e-4
HERE = Path(__file__).parent
# Logged losses agree to rel 1e-5, and to 1e-5 absolute where a loss is a sum of terms of both
# signs that nearly cancel: DPG's weighted loss of -0.126 from terms of size 1.6 came out
# 1.4e-6 apart under ZeRO-2 and DDP (the terms' last bits, 1e-6 of their size)
LOSS_TOL = {"rel": 1e-5, "abs": 1e-5}

TINY = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.max_positions=64",
    "train.steps=3",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=3",
    "train.checkpoint_every=2",
    "train.threads=1",
    "optim.warmup_steps=1",  # the schedule must step once per step in both runs
    "optim.min_lr_ratio=0.1",
    "eval.n=4",
]

STAGES = {
    "mle": ["task.max_digits=2", "model.max_positions=128", "eval.digits=[1,2]"],
    "iqlearn": ["task.name=multistep", "task.max_digits=1", "model.max_positions=128"],
    "dpo": ["task.name=multistep-prefs", "task.max_digits=1", "train.stage=dpo"],
    "reward-model": ["task.name=multistep-prefs", "task.max_digits=1"],
    # LoRA under DDP: only the adapters train, the reference is the policy with them off
    "dpo-lora": [
        "task.name=multistep-prefs",
        "task.max_digits=1",
        "train.stage=dpo",
        "model.lora.r=4",
    ],
}


def torchrun(
    args: list[str],
    cwd: Path,
    script: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """``torchrun --standalone --nproc_per_node 2 -m tether ARGS`` (or a script)."""
    target = script if script is not None else ["-m", "tether", *args]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [*cmd, *target], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, launch_failure(proc.stderr)
    return proc.stderr


def launch_failure(stderr: str) -> str:
    """What a failed 2-process launch said: its error lines and how each process ended
    (torchrun's ``exitcode`` and ``Signal`` lines). A process killed by a signal prints no
    traceback, so its error lines alone are only ``ChildFailedError``: ``exitcode: -9``
    (SIGKILL) is the kernel's OOM killer on a machine short of memory."""
    # a C++ abort says why in lines of its own: "terminate called ...", "what(): ...", a
    # glibc "free(): ..." or "corrupted ..." line
    keep = ("rror", "exitcode", "Signal ", "terminate", "what()", "xception", "free()", "corrupt")
    said = [line for line in stderr.splitlines() if any(k in line for k in keep)]
    return "\n".join(said[-40:]) or stderr[-3000:]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max abs difference {worst:.2e}")  # shown with pytest -s
    return worst


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_model_and_tokenizer(str(run / "model"))[0].state_dict()


def train_args(out: Path, overrides: list[str]) -> list[str]:
    """``tether train`` arguments: an empty recipe and the overrides."""
    recipe = out.parent / "empty.yaml"
    recipe.write_text("{}\n")
    return ["train", str(recipe), "--out", str(out), "--quiet"] + [
        a for kv in overrides for a in ("--set", kv)
    ]


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_processes_end_where_one_does(stage, tiny_checkpoint, tmp_path):
    overrides = [*TINY, *STAGES[stage]]
    if stage in ("iqlearn", "reward-model"):
        overrides.append(f"train.stage={stage}")
    if stage in ("dpo", "dpo-lora"):
        overrides.append(f"model.init={tiny_checkpoint}")
    one = tmp_path / "one"
    train(load_recipe(None, overrides), one, progress=False)
    two = tmp_path / "two"
    torchrun(train_args(two, overrides), tmp_path)

    assert max_difference(weights(one), weights(two)) < ATOL
    rows = [json.loads(r) for r in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # one writer, no repeats
    loss_one = [
        json.loads(r)["loss"]
        for r in (one / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(r)
    ]
    assert [r["loss"] for r in rows if "loss" in r] == pytest.approx(loss_one, **LOSS_TOL)
    assert (two / "summary.json").is_file() and (two / "checkpoints" / "step-000002").is_dir()


@pytest.mark.parametrize(
    "algorithm,micro",
    [("a2c", ""), ("reinforce", ""), ("reinforce", "1")],  # 1: micro-batches of one row
)
def test_rl_two_processes_equal_one_on_the_same_rollouts_and_shard_sampling(
    algorithm, micro, tiny_checkpoint, tmp_path
):
    """Also with micro-batches on the two processes: REINFORCE's baseline is the mean over
    every process's whole share, and the gradients synchronise once, on the last one."""
    script = str(HERE / "distributed" / "rl_same_batch.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, script, str(tiny_checkpoint), str(tmp_path / "one.pt"), algorithm],
        check=True,
        env=env,
        timeout=300,
    )
    args = [script, str(tiny_checkpoint), str(tmp_path / "two.pt"), algorithm, micro]
    torchrun([], tmp_path, script=args)
    one = torch.load(tmp_path / "one.pt")
    two = torch.load(tmp_path / "two.pt")
    assert max_difference(one["params"], two["params"]) < RL_ATOL
    assert any("value_head" in k for k in one["params"]) == (algorithm == "a2c")
    # the sharded rollout: each process sampled half the prompts, together the same ones
    (everything,) = one["prompts"]
    first, second = two["prompts"]
    assert len(first) == len(second) == len(everything) // 2
    assert first + second == everything


def test_two_processes_in_micro_batches_end_where_one_whole_batch_does(tiny_checkpoint, tmp_path):
    """train.micro_batch_size under DDP: each process's 4 rows in 2 micro-batches, the
    gradients synchronised on the second only, end where one process on the whole batch does."""
    overrides = [*TINY, *STAGES["mle"]]
    one = tmp_path / "one"
    train(load_recipe(None, overrides), one, progress=False)
    two = tmp_path / "two"
    torchrun(train_args(two, [*overrides, "train.micro_batch_size=2"]), tmp_path)
    assert max_difference(weights(one), weights(two)) < ATOL

    def losses(run):
        rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert losses(two) == pytest.approx(losses(one), **LOSS_TOL)


def test_a_batch_that_does_not_divide_is_one_clear_error(tiny_checkpoint, tmp_path):
    overrides = [*TINY, *STAGES["mle"], "train.batch_size=7"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, "-m", "tether", *train_args(tmp_path / "run", overrides)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "train.batch_size (demonstrations): 7 per step does not divide among 2" in proc.stderr


@pytest.mark.parametrize("stage", ["dpg", "online-dpo"])
def test_sampling_stages_run_on_two_processes_with_one_shared_state(
    stage, tiny_checkpoint, tmp_path
):
    """Their samples differ from one process's (each process samples its own share with its
    own generator), so the check is that they run, and that what must be common is: DPG's
    running log Z table and adaptive proposal are the same on both processes."""
    overrides = [*TINY, f"model.init={tiny_checkpoint}", f"train.stage={stage}"]
    if stage == "dpg":
        overrides += [
            "task.name=enumerable",
            "dpg.prompts_per_step=2",
            "dpg.samples_per_step=8",
            "dpg.proposal=adaptive",
            "dpg.log_z=running",
        ]
    else:
        overrides += ["task.name=first-digit"]
    run = tmp_path / "run"
    torchrun(train_args(run, overrides), tmp_path)
    assert (run / "summary.json").is_file()
    state = torch.load(run / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=False)
    first, second = (r["stage"] for r in state["ranks"])
    assert first["generator"] is not None and not torch.equal(
        first["generator"], second["generator"]
    )  # each process samples its own share
    if stage == "dpg":
        assert first["running"] == second["running"] and first["running"]
        assert first["proposal_updates"] == second["proposal_updates"]

    # a 2-process checkpoint resumes only with 2 processes
    (run / "summary.json").unlink()
    with pytest.raises(RunDirError, match="written by 2 process.*resumed with 1"):
        train(load_recipe(run / "config.yaml"), run, progress=False, resume=True)


def test_sampling_stages_refuse_zero3_but_not_fsdp():
    """ZeRO-3 shards the weights and tether does not gather them for sampling; FSDP does
    (tether.distributed.full_weights, tests/test_fsdp.py), but not LoRA's adapters."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from tether.config import RecipeError
    from tether.engine.loop import check_sharded_weights

    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace())
    zero3 = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)),
    )
    zero2 = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2)),
    )
    rl = load_recipe(None, ["task.name=first-digit", "model.init=x", "train.stage=rl"])
    online = load_recipe(None, ["train.stage=iqlearn", "imitation.online_fraction=0.25"])
    for recipe in (rl, online):
        with pytest.raises(RecipeError, match="launch it with DDP"):
            check_sharded_weights(zero3, recipe)
        check_sharded_weights(fsdp, recipe)
        check_sharded_weights(zero2, recipe)
    check_sharded_weights(zero3, load_recipe(None, ["train.stage=mle"]))
    micro = load_recipe(None, ["train.stage=mle", "train.micro_batch_size=2"])
    with pytest.raises(RecipeError, match="^train.micro_batch_size: under DeepSpeed"):
        check_sharded_weights(zero2, micro)
    check_sharded_weights(fsdp, micro)
    lora = load_recipe(None, ["train.stage=mle", "model.init=x", "model.lora.r=4"])
    with pytest.raises(RecipeError, match="^model.lora: .*launch LoRA runs with DDP"):
        check_sharded_weights(fsdp, lora)


def test_one_process_shards_nothing():
    from tether import distributed

    assert distributed.shard([1, 2, 3], "x") == [1, 2, 3]
    assert distributed.rank_seed(5) == 5 and not distributed.active()
    count = torch.tensor(7.0)
    assert distributed.mean_count(count) is count


def test_collectives_take_cpu_tensors_to_the_gpu_under_nccl(monkeypatch):
    """NCCL, accelerate's backend on GPUs, refuses CPU tensors; the loop's own counts (the
    non-finite check, tokens/s) are CPU tensors, so they travel to this process's GPU for the
    collective. gloo takes them where they are. (tests/test_gpu.py runs a real NCCL group.)"""
    from tether import distributed

    x = torch.tensor(3)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "gloo")
    assert distributed.collective_device(x) == torch.device("cpu")
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert distributed.collective_device(x) == torch.device("cuda", 1)
    on_meta = torch.empty(2, device="meta")  # not a CPU tensor: stays where it is
    assert distributed.collective_device(on_meta) == on_meta.device


def test_a_two_process_rl_run_resumes_exactly(tiny_checkpoint, tmp_path):
    """Each process's prompt stream and sampling generator come back from the checkpoint:
    resuming from step 4 with two processes repeats the uninterrupted run's step 5 exactly."""
    overrides = [
        *TINY,
        "task.name=first-digit",
        f"model.init={tiny_checkpoint}",
        "train.stage=rl",
        "rl.algorithm=a2c",
        "rl.prompts_per_step=4",
        "train.steps=5",
        "train.checkpoint_every=2",
        "train.eval_every=5",
    ]
    run = tmp_path / "run"
    torchrun(train_args(run, overrides), tmp_path)
    whole = (run / "metrics.jsonl").read_text().splitlines()
    final = weights(run)
    # the run as if stopped after its step-4 checkpoint
    (run / "summary.json").unlink()
    shutil.rmtree(run / "model")
    torchrun(["train", "--resume", str(run), "--quiet"], tmp_path)
    timing = ("tokens_per_s", "elapsed_s", "peak_rss_mb")

    def rows(lines):
        return [{k: v for k, v in json.loads(r).items() if k not in timing} for r in lines]

    assert rows((run / "metrics.jsonl").read_text().splitlines()) == rows(whole)
    assert max_difference(final, weights(run)) == 0.0


def test_two_nodes_on_one_machine_end_where_one_node_does(tmp_path):
    """Two launches, node ranks 0 and 1, one process each, meeting at 127.0.0.1 (what two
    machines do, with the first one's address) train as 2 processes on one node do."""
    import socket

    overrides = [*TINY, *STAGES["mle"]]
    one_node = tmp_path / "one-node"
    torchrun(train_args(one_node, overrides), tmp_path)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two_nodes = tmp_path / "two-nodes"
    args = ["-m", "tether", *train_args(two_nodes, overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}"]
            + ["--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    assert max_difference(weights(one_node), weights(two_nodes)) == 0.0
    assert (two_nodes / "metrics.jsonl").read_text().count('"loss"') == 3
