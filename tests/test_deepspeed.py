"""DeepSpeed on the CPU (its CPU accelerator, over gloo), 2 processes, and the shipped accelerate
configurations.

The configurations are checked without DeepSpeed: each is turned into the launcher's
environment by accelerate's own code (what ``accelerate launch --config_file`` does) and the
plugin tether's set-up builds from that environment is asked what it holds.

The runs need ``pip install deepspeed`` (not a dev extra: it builds from source, and its
first run on a machine compiles a shared-memory collective, about 3 minutes); without it they
are skipped. One ``accelerate launch`` per ZeRO stage trains every stage it runs in the same
two processes (tests/distributed/stages.py, as tests/test_fsdp.py does), one ``torchrun``
launch trains the sampling stages under DDP, and the runs DeepSpeed refuses end in the same
launches with their one-line message. Measured (``pytest -s`` prints them), largest absolute
parameter difference after 3 AdamW steps: against 1 process, ZeRO-2 mle 2.6e-8, iqlearn
7.5e-9, dpo 1.2e-7; ZeRO-3 mle 2.4e-8, iqlearn 6.5e-9, dpo 1.2e-7; ZeRO-2 against DDP on 2
processes (the same rollouts), rl with RLOO 3.7e-9, rl with REINFORCE, online-dpo, xpo and
dpg 0. (On this tiny model ZeRO-3 keeps every weight whole: each is below DeepSpeed's
``stage3_param_persistence_threshold``; the SmolLM2 memory table in docs/distributed.md is
where its partitioning shows.) The file costs about 105 s on a loaded 2-core machine.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_distributed import ATOL, TINY, max_difference, torchrun, weights
from test_fsdp import losses
from test_fsdp import overrides as fsdp_overrides
from tether.config import load_recipe
from tether.engine.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).parent
CONFIGS = HERE.parent / "configs" / "accelerate"


def launcher_env(config: Path, monkeypatch) -> None:
    """The environment ``accelerate launch --config_file CONFIG`` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(config), "--num_processes", "2", "train.py"]
    )
    args, defaults, mp_from_config_flag = _validate_launch_command(args)
    if args.use_deepspeed:  # as launch_command does before its DeepSpeed launcher
        fields = list(defaults.deepspeed_config.keys())
        if mp_from_config_flag:
            fields.append("mixed_precision")
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)


@pytest.mark.parametrize("name,stage", [("deepspeed-zero2.yaml", 2), ("deepspeed-zero3.yaml", 3)])
def test_the_deepspeed_configs_build_accelerates_plugin(name, stage, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    from tether import distributed

    launcher_env(CONFIGS / name, monkeypatch)
    assert distributed.deepspeed_requested() and not distributed.fsdp_requested()
    plugin = DeepSpeedPlugin()  # what tether.engine.setup builds on CPUs
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == zero["stage"] == stage
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0  # optim.grad_clip's default
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
    if stage == 3:  # tether gathers the whole weights to save a checkpoint
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    config = yaml.safe_load((CONFIGS / name).read_text())
    assert config["mixed_precision"] == "no"  # train.precision does bf16, not accelerate


def test_the_fsdp_config_builds_an_fsdp2_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    from tether import distributed

    launcher_env(CONFIGS / "fsdp.yaml", monkeypatch)
    assert distributed.fsdp_requested() and not distributed.deepspeed_requested()
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap is None  # the model's _no_split_modules


needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed"
)


# the stages DeepSpeed runs (no parameters of their own); ZeRO-3 refuses the sampling ones
OFFLINE = ["mle", "iqlearn", "dpo"]
SAMPLING = ["rl-rloo", "rl-reinforce", "online-dpo", "xpo", "dpg"]


def run_overrides(run: str, reference: Path) -> list[str]:
    """test_fsdp.py's recipes; RL with the algorithms that have no value head (A2C's is a
    parameter of the stage's own, which DeepSpeed's engine does not take)."""
    if not run.startswith("rl-"):
        return fsdp_overrides(run, reference)
    algorithm = run.removeprefix("rl-")
    rl = [f"model.init={reference}", "task.name=first-digit", f"rl.algorithm={algorithm}"]
    rl += ["rl.prompts_per_step=4", "rl.group_size=2"]  # RLOO's leave-one-out needs a group
    return [*TINY, "train.stage=rl", *rl]


def launch(plan: dict[str, list[str]], where: Path, config: str | None) -> None:
    """Train every run of ``plan`` in one 2-process launch (tests/distributed/stages.py):
    ``accelerate launch`` with a DeepSpeed config, or ``torchrun`` (DDP) for None."""
    plan_file = where / "plan.json"
    plan_file.write_text(json.dumps(plan))
    script = [str(HERE / "distributed" / "stages.py"), str(plan_file)]
    if config is None:
        torchrun([], where, script=script)
        return
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(CONFIGS / config), "--num_processes", "2", "--main_process_port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [*cmd, *script], cwd=where, env=env, capture_output=True, text=True, timeout=1200
    )
    said = [line for line in proc.stderr.splitlines() if "rror" in line]
    assert proc.returncode == 0, "\n".join(said[-20:]) or proc.stderr[-3000:]


def optimizer_shards(run: Path) -> set[str]:
    """The per-process optimizer files of the step-2 checkpoint (none under DDP)."""
    return {p.name for p in (run / "checkpoints" / "step-000002").glob("optimizer-rank-*")}


# {zero: (config, runs that train, runs it refuses at launch)}
ZERO = {
    "zero2": ("deepspeed-zero2.yaml", OFFLINE + SAMPLING, ["rl-a2c", "reward-model"]),
    "zero3": ("deepspeed-zero3.yaml", OFFLINE, SAMPLING),
}


@pytest.fixture(scope="module")
def deepspeed_runs(tiny_checkpoint, tmp_path_factory):
    """{zero: {run: folder}}: one launch per ZeRO stage trains all of its runs."""
    runs = {}
    for zero, (config, trained, refused) in ZERO.items():
        root = tmp_path_factory.mktemp(zero)
        names = trained + refused  # the refused last: they stop before any collective
        runs[zero] = {n: root / n for n in names}
        plan = {str(runs[zero][n]): run_overrides(n, tiny_checkpoint) for n in names}
        launch(plan, root, config)
    return runs


@needs_deepspeed
@pytest.mark.parametrize("zero", list(ZERO))
@pytest.mark.parametrize("stage", OFFLINE)
def test_deepspeed_on_two_processes_ends_where_one_process_does(
    stage, zero, deepspeed_runs, tiny_checkpoint, tmp_path
):
    one = tmp_path / "one"
    train(load_recipe(None, run_overrides(stage, tiny_checkpoint)), one, progress=False)
    two = deepspeed_runs[zero][stage]
    worst = max_difference(weights(one), weights(two))
    print(f"{zero} {stage} against 1 process: {worst:.1e}")
    assert worst < ATOL
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    # ZeRO's partitioned optimizer state: one file per process
    assert optimizer_shards(two) == {"optimizer-rank-0.pt", "optimizer-rank-1.pt"}


@needs_deepspeed
def test_sampling_stages_under_zero2_end_where_ddp_does(deepspeed_runs, tiny_checkpoint, tmp_path):
    """ZeRO-2 keeps the whole weights on every process, so each samples its share as under
    DDP, with DDP's generator: the rollouts, and the weights after them, are DDP's (and the
    DeepSpeed runs are DeepSpeed's: ZeRO's optimizer state saved per process)."""
    ddp = {n: tmp_path / n for n in SAMPLING}
    launch({str(ddp[n]): run_overrides(n, tiny_checkpoint) for n in SAMPLING}, tmp_path, None)
    for run in SAMPLING:
        two = deepspeed_runs["zero2"][run]
        worst = max_difference(weights(ddp[run]), weights(two))
        print(f"zero2 {run} against DDP: {worst:.1e}")
        assert worst < ATOL, run
        assert losses(two) == pytest.approx(losses(ddp[run]), rel=1e-5), run
        assert optimizer_shards(two) == {"optimizer-rank-0.pt", "optimizer-rank-1.pt"}, run
        assert optimizer_shards(ddp[run]) == set(), run


@needs_deepspeed
@pytest.mark.parametrize(
    "zero,run,says",
    [
        ("zero2", "rl-a2c", "its own parameters (a head) live outside the model"),
        ("zero2", "reward-model", "its own parameters (a head) live outside the model"),
        *[("zero3", run, "not ZeRO-3") for run in SAMPLING],
    ],
)
def test_deepspeed_refuses_what_it_cannot_run_at_launch(zero, run, says, deepspeed_runs):
    """Refused with one line on every process before anything trains or is written."""
    folder = deepspeed_runs[zero][run]
    message = folder.with_name(folder.name + ".refused").read_text()
    assert says in message and message.count("\n") == 1, message
    assert not folder.exists()
