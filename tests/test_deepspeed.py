"""DeepSpeed on the CPU (its CPU accelerator, over gloo), 2 processes, and the shipped accelerate
configurations.

The configurations are checked without DeepSpeed: each is turned into the launcher's
environment by accelerate's own code (what ``accelerate launch --config_file`` does) and the
plugin tether's set-up builds from that environment is asked what it holds.

The runs need DeepSpeed, tether's ``deepspeed`` extra, which ``make install`` (and so
``make test`` and CI) installs; without it they are skipped. Nothing is compiled: tether tells
DeepSpeed not to build the shared-memory collective its CPU back end would compile at the
first launch (tether.engine.setup). One ``accelerate launch`` per ZeRO stage trains every
stage it runs in the same two processes (tests/distributed/stages.py, as tests/test_fsdp.py
does), one ``torchrun`` launch trains the sampling stages under DDP, and the runs DeepSpeed
refuses end in the same launches with their one-line message. ZeRO-3 runs with
``stage3_param_persistence_threshold: 0`` (:func:`partitioned_zero3`), so that every weight of
the tiny model is partitioned (by default DeepSpeed keeps a weight under 1e5 elements whole on
every process), and the harness records what each process held: half of each weight, and
nothing of it outside a forward pass. Measured (``pytest -s`` prints them), largest absolute
parameter difference after 3 AdamW steps: against 1 process, ZeRO-2 mle 2.6e-8, iqlearn
7.5e-9, dpo 1.2e-7; ZeRO-3 (partitioned) mle 2.4e-8, iqlearn 6.5e-9, dpo 1.2e-7; ZeRO-2
against DDP on 2 processes (the same rollouts), rl with RLOO 3.7e-9, rl with REINFORCE, rl
with GRPO (2 updates per collect), online-dpo, xpo and dpg 0. The file costs about 135 s on a
loaded 2-core machine (the two DeepSpeed launches 73 s, the DDP launch 25 s, the check that
``tether train`` prints no DeepSpeed warning 18 s).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_distributed import (
    ATOL,
    LOSS_TOL,
    launch_failure,
    max_difference,
    torchrun,
    weights,
)
from test_fsdp import losses
from test_fsdp import overrides as fsdp_overrides
from tether.config import load_recipe
from tether.engine.loop import train
from tether.models.loading import load_model_and_tokenizer

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
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (pip install -e '.[deepspeed]'; make install does)",
)


# the stages DeepSpeed runs (no parameters of their own: RL with the algorithms that have no
# value head, A2C's being a parameter of the stage's own, which DeepSpeed's engine does not
# take); ZeRO-3 refuses the sampling ones. The recipes are test_fsdp.py's.
OFFLINE = ["mle", "iqlearn", "dpo"]
SAMPLING = ["rl-rloo", "rl-reinforce", "rl-grpo", "online-dpo", "xpo", "dpg"]
run_overrides = fsdp_overrides


def partitioned_zero3(where: Path) -> Path:
    """deepspeed-zero3.yaml with every weight partitioned: an accelerate config whose
    DeepSpeed settings (a DeepSpeed config file) are those accelerate builds from the shipped
    one, plus ``stage3_param_persistence_threshold: 0``. DeepSpeed keeps a weight of at most
    that many elements (1e5 by default) whole on every process, which is every weight of the
    tiny model."""
    from accelerate.utils import DeepSpeedPlugin

    shipped = CONFIGS / "deepspeed-zero3.yaml"
    with pytest.MonkeyPatch.context() as env:
        launcher_env(shipped, env)
        settings = DeepSpeedPlugin().deepspeed_config
    settings.pop("steps_per_print")  # accelerate's (infinity): not JSON
    settings["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (where / "zero3.json").write_text(json.dumps(settings, indent=2))
    config = yaml.safe_load(shipped.read_text())
    config.pop("mixed_precision")  # in the DeepSpeed file then ("no": none there)
    config["deepspeed_config"] = {
        "deepspeed_config_file": str(where / "zero3.json"),
        "zero3_init_flag": config["deepspeed_config"]["zero3_init_flag"],
    }
    (where / "zero3.yaml").write_text(yaml.safe_dump(config))
    return where / "zero3.yaml"


def launch(plan: dict[str, list[str]], where: Path, config: Path | None) -> None:
    """Train every run of ``plan`` in one 2-process launch (tests/distributed/stages.py):
    ``accelerate launch`` with a DeepSpeed config, or ``torchrun`` (DDP) for None."""
    plan_file = where / "plan.json"
    plan_file.write_text(json.dumps(plan))
    script = [str(HERE / "distributed" / "stages.py"), str(plan_file)]
    if config is None:
        torchrun([], where, script=script)
        return
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(config), "--num_processes", "2", "--main_process_port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [*cmd, *script], cwd=where, env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, launch_failure(proc.stderr)


def optimizer_shards(run: Path) -> set[str]:
    """The per-process optimizer files of the step-2 checkpoint (none under DDP)."""
    return {p.name for p in (run / "checkpoints" / "step-000002").glob("optimizer-rank-*")}


# {zero: (runs that train, runs it refuses at launch)}
ZERO = {
    "zero2": (OFFLINE + SAMPLING, ["rl-a2c", "reward-model"]),
    "zero3": (OFFLINE, SAMPLING),
}


@pytest.fixture(scope="module")
def deepspeed_runs(tiny_checkpoint, tmp_path_factory):
    """{zero: {run: folder}}: one launch per ZeRO stage trains all of its runs; ZeRO-2 with
    the shipped config, ZeRO-3 with every weight partitioned (:func:`partitioned_zero3`)."""
    runs = {}
    for zero, (trained, refused) in ZERO.items():
        root = tmp_path_factory.mktemp(zero)
        config = CONFIGS / "deepspeed-zero2.yaml" if zero == "zero2" else partitioned_zero3(root)
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
    summary = train(load_recipe(None, run_overrides(stage, tiny_checkpoint)), one, progress=False)
    two = deepspeed_runs[zero][stage]
    worst = max_difference(weights(one), weights(two))
    print(f"{zero} {stage} against 1 process: {worst:.1e}")
    assert worst < ATOL
    assert losses(two) == pytest.approx(losses(one), **LOSS_TOL)
    # ZeRO's partitioned optimizer state: one file per process
    assert optimizer_shards(two) == {"optimizer-rank-0.pt", "optimizer-rank-1.pt"}
    # the whole model's size, though ZeRO-3's processes hold none of it outside a forward pass
    assert json.loads((two / "summary.json").read_text())["parameters"] == summary["parameters"]


@needs_deepspeed
@pytest.mark.parametrize("stage", OFFLINE)
def test_zero3_partitions_every_weight_between_the_processes(stage, deepspeed_runs):
    """Each process holds half of each weight (its partition, ``ds_tensor``) and, outside a
    forward pass, nothing of it, both once the model is prepared and after the run (its
    steps, its evaluations with the whole weights gathered, its gathered saves): the ZeRO-3
    rows above are partitioned runs (tests/distributed/stages.py records what each held)."""
    run = deepspeed_runs["zero3"][stage]
    held = [json.loads(Path(f"{run}.zero3-rank-{r}.json").read_text()) for r in (0, 1)]
    assert held[0] == held[1]
    prepared, trained = held[0]["prepared"], held[0]["trained"]
    assert prepared.keys() == trained.keys()
    assert any("embed_tokens" in n for n in trained) and any("mlp" in n for n in trained)
    for name, (whole, part, now) in [*prepared.items(), *trained.items()]:
        assert part == -(-whole // 2) and now == 0, (name, whole, part, now)
    summary = json.loads((run / "summary.json").read_text())
    assert sum(whole for whole, _, _ in trained.values()) == summary["parameters"]


@needs_deepspeed
def test_sampling_stages_under_zero2_end_where_ddp_does(deepspeed_runs, tiny_checkpoint, tmp_path):
    """ZeRO-2 keeps the whole weights on every process, so each samples its share as under
    DDP, with DDP's generator: the rollouts, and the weights after them, are DDP's (and the
    DeepSpeed runs are DeepSpeed's: ZeRO's optimizer state saved per process)."""
    ddp = {n: tmp_path / n for n in SAMPLING}
    launch({str(ddp[n]): run_overrides(n, tiny_checkpoint) for n in SAMPLING}, tmp_path, None)
    start = load_model_and_tokenizer(str(tiny_checkpoint))[0].state_dict()
    for run in SAMPLING:
        two = deepspeed_runs["zero2"][run]
        worst = max_difference(weights(ddp[run]), weights(two))
        print(f"zero2 {run} against DDP: {worst:.1e}")
        assert worst < ATOL, run
        assert max_difference(start, weights(two)) > 100 * ATOL, run  # they did train
        assert losses(two) == pytest.approx(losses(ddp[run]), **LOSS_TOL), run
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


def test_deepspeed_is_told_its_accelerator_only_where_there_is_none(monkeypatch):
    """DS_ACCELERATOR=cpu where torch has no accelerator; left unset where it has one (DeepSpeed
    detects it), and never changed once set."""
    from tether.distributed import name_deepspeeds_accelerator

    monkeypatch.setenv("DS_ACCELERATOR", "")  # restored after the test, set or not
    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    name_deepspeeds_accelerator()
    assert "DS_ACCELERATOR" not in os.environ
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    name_deepspeeds_accelerator()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    name_deepspeeds_accelerator()
    assert os.environ["DS_ACCELERATOR"] == "xpu"


DEEPSPEED_GUESSES = "Setting accelerator to CPU"  # DeepSpeed's warning when left to guess
# the `tether` command (its arguments after -c), then whether the run imported DeepSpeed
TETHER_SAYING_IF_DEEPSPEED_CAME = """
import sys
from tether.cli import main
try:
    main()
finally:
    print("deepspeed imported" if "deepspeed" in sys.modules else "no deepspeed", file=sys.stderr)
"""


@needs_deepspeed
@pytest.mark.skipif(torch.accelerator.is_available(), reason="DeepSpeed finds the GPU itself")
def test_tether_commands_do_not_print_deepspeeds_accelerator_warning(tmp_path):
    """accelerate imports DeepSpeed in every run where it is installed; tether names the CPU
    as DeepSpeed's accelerator first (tether.distributed.name_deepspeeds_accelerator), so
    DeepSpeed, which warns on every process when left to guess, says nothing. DeepSpeed
    imported alone on this machine does warn: the check can see the warning."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env |= {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    alone = subprocess.run(
        [sys.executable, "-c", "import deepspeed"], env=env, capture_output=True, text=True
    )
    assert DEEPSPEED_GUESSES in alone.stdout + alone.stderr
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("{}\n")
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "train.steps=1", "eval.n=2"]
    args = ["train", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]
    args += [a for kv in tiny for a in ("--set", kv)]
    proc = subprocess.run(
        [sys.executable, "-c", TETHER_SAYING_IF_DEEPSPEED_CAME, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deepspeed imported" in proc.stderr  # by accelerate, in the run: the warning was due
    assert DEEPSPEED_GUESSES not in proc.stdout + proc.stderr, proc.stderr[-3000:]
