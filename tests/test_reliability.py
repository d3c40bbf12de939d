"""Reliability: exact resume, safe interrupts (real signals), atomic checkpoints, pruning,
NaN/inf faults, determinism."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import tether.engine.loop as train_module
from tether.config import load_recipe
from tether.engine.checkpoints import RunDirError, step_checkpoints
from tether.engine.faults import NonFiniteError, TrainingInterrupted
from tether.engine.loop import train
from tether.models.loading import ModelLoadError, load_model_and_tokenizer
from tether.stages.imitation import ImitationStage

TIMING = {"tokens_per_s", "elapsed_s", "peak_rss_mb"}  # not the same from run to run

MLE = [
    "task.max_digits=2",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.max_positions=256",
    "model.dropout=0.1",  # dropout draws from torch's global RNG: resume must restore it
    "train.steps=8",
    "train.batch_size=4",
    "train.log_every=1",
    "train.eval_every=4",
    "train.checkpoint_every=3",
    "optim.warmup_steps=2",
    "eval.digits=[1,2]",
    "eval.n=4",
]


def metrics(run, drop=TIMING):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in drop} for row in rows]


def interrupt_at(monkeypatch, stage_cls, step, signum=signal.SIGINT):
    """Send a real signal to this process while the stage draws batch number ``step``."""
    original = stage_cls.next_batch
    calls = {"n": 0}

    def next_batch(self):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signum)
        return original(self)

    monkeypatch.setattr(stage_cls, "next_batch", next_batch)


def assert_resume_is_exact(recipe, stage_cls, tmp_path, monkeypatch, step=3, signum=signal.SIGINT):
    """Train ``recipe`` into tmp_path/whole, and into tmp_path/cut stopped by a real signal
    while the stage draws batch ``step``, then resumed: the two runs log the same metrics.
    Returns the two run directories (cut, whole) for further checks."""
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    train(recipe, whole, progress=False)
    interrupt_at(monkeypatch, stage_cls, step, signum)
    with pytest.raises(TrainingInterrupted) as err:
        train(recipe, cut, progress=False)
    assert err.value.exit_code == 128 + signum
    monkeypatch.undo()
    train(load_recipe(cut / "config.yaml"), cut, progress=False, resume=True)
    assert metrics(cut) == metrics(whole)
    return cut, whole


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("mle") / "run"
    train(load_recipe(None, MLE), run, progress=False)
    return run


def test_same_recipe_and_seed_give_identical_metrics(uninterrupted, tmp_path):
    train(load_recipe(None, MLE), tmp_path / "again", progress=False)
    assert metrics(tmp_path / "again") == metrics(uninterrupted)
    assert len(metrics(uninterrupted)) == 8 + 2  # 8 training rows, 2 evaluations


@pytest.mark.parametrize("stop_at", [3, 5])  # on a checkpoint step and between two
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(
    uninterrupted, tmp_path, monkeypatch, stop_at
):
    run = tmp_path / "run"
    interrupt_at(monkeypatch, ImitationStage, stop_at)
    with pytest.raises(TrainingInterrupted, match=f"SIGINT at step {stop_at}") as err:
        train(load_recipe(None, MLE), run, progress=False)
    assert err.value.exit_code == 130
    assert not (run / "summary.json").exists()  # an unfinished run never looks complete
    assert [s for s, _ in step_checkpoints(run)] == sorted({3, stop_at})
    monkeypatch.undo()

    summary = train(load_recipe(run / "config.yaml"), run, progress=False, resume=True)
    assert metrics(run) == metrics(uninterrupted)
    finished = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["final_loss"] == finished["final_loss"]
    a = load_model_and_tokenizer(str(run))[0].state_dict()
    b = load_model_and_tokenizer(str(uninterrupted))[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


RL = [
    "task.name=first-digit",
    "train.stage=rl",
    "rl.prompts_per_step=8",
    "rl.temperature=1.0",
    "rl.ppo_epochs=2",
    "train.steps=6",
    "train.log_every=1",
    "train.eval_every=3",
    "train.checkpoint_every=2",
    "optim.warmup_steps=0",
    "eval.n=8",
]


@pytest.mark.parametrize("algorithm", ["a2c", "ppo"])  # value head and several epochs
def test_rl_resume_is_exact(tiny_checkpoint, tmp_path, monkeypatch, algorithm):
    from tether.stages.rl import RLStage

    recipe = load_recipe(None, [*RL, f"model.init={tiny_checkpoint}", f"rl.algorithm={algorithm}"])
    assert_resume_is_exact(recipe, RLStage, tmp_path, monkeypatch, signum=signal.SIGTERM)


def test_resume_refuses_finished_and_foreign_directories(uninterrupted, tmp_path):
    with pytest.raises(RunDirError, match="already finished"):
        train(load_recipe(None, MLE), uninterrupted, progress=False, resume=True)
    with pytest.raises(RunDirError, match="not a run directory"):
        train(load_recipe(None, MLE), tmp_path, progress=False, resume=True)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    recipe = load_recipe(None, [*MLE, "train.checkpoint_every=1", "train.keep_checkpoints=2"])
    train(recipe, tmp_path / "run", progress=False)
    assert [s for s, _ in step_checkpoints(tmp_path / "run")] == [6, 7]


def test_a_crash_while_writing_leaves_no_valid_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 6) dies in mid-write
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train_module.torch, "save", failing_save)
    run = tmp_path / "run"
    with pytest.raises(OSError, match="disk full"):
        train(load_recipe(None, MLE), run, progress=False)
    assert [s for s, _ in step_checkpoints(run)] == [3]
    half = run / "checkpoints" / "step-000006.tmp"
    assert (half / "config.json").is_file()  # the weights got written...
    with pytest.raises(ModelLoadError, match="unfinished checkpoint"):
        load_model_and_tokenizer(str(half))  # ...but the folder is not accepted
    assert not (run / "summary.json").exists()
    monkeypatch.undo()
    train(load_recipe(run / "config.yaml"), run, progress=False, resume=True)  # from step 3
    assert (run / "summary.json").is_file()
    assert not half.exists()


def _poison(monkeypatch, at_step, kind):
    original = ImitationStage.loss
    calls = {"n": 0}

    def loss(self, model, batch):
        value, stats = original(self, model, batch)
        calls["n"] += 1
        if calls["n"] == at_step:
            if kind == "loss":
                value = value * float("nan")
            else:  # finite loss, NaN gradient: d/dx sqrt(x) at x = 0
                w = model.get_input_embeddings().weight
                value = value + torch.sqrt(((w - w.detach()) ** 2).sum())
        return value, stats

    monkeypatch.setattr(ImitationStage, "loss", loss)


@pytest.mark.parametrize(
    ("kind", "quantity"), [("loss", "the loss"), ("grad", "the gradient of model.embed_tokens")]
)
def test_nonfinite_stops_with_step_and_quantity(tmp_path, monkeypatch, kind, quantity):
    _poison(monkeypatch, 5, kind)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as err:
        train(load_recipe(None, MLE), run, progress=False)
    assert "step 5" in str(err.value) and quantity in str(err.value)
    assert "step-000003" in str(err.value)  # the last good checkpoint, which is kept
    assert [s for s, _ in step_checkpoints(run)] == [3]
    assert not (run / "summary.json").exists()


def test_nonfinite_skip_policy_counts_and_carries_on(uninterrupted, tmp_path, monkeypatch):
    _poison(monkeypatch, 5, "grad")
    recipe = load_recipe(None, [*MLE, "train.on_nonfinite=skip"])
    summary = train(recipe, tmp_path / "run", progress=False)
    assert summary["skipped_batches"] == 1
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert [r["skipped_batches"] for r in rows] == [0, 0, 0, 0, 1, 1, 1, 1]
    clean = [r for r in metrics(uninterrupted) if "loss" in r]
    assert rows[3]["loss"] == clean[3]["loss"]  # identical until the poisoned batch
    assert rows[5]["loss"] != clean[5]["loss"]  # then the skipped update shows


# ---------------------------------------------------------------- a real `tether train` process


def _start(args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tether", "train", *args, "--quiet"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_rows(path, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run logged nothing")


@pytest.fixture()
def long_recipe(tmp_path):
    data = {
        "name": "long",
        "task": {"max_digits": 2},
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "max_positions": 256},
        "train": {"steps": 100000, "batch_size": 4, "log_every": 1, "eval_every": 100000},
        "eval": {"digits": []},
    }
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_sigint_to_a_real_process_checkpoints_and_resume_continues(long_recipe, tmp_path):
    run = tmp_path / "run"
    proc = _start([str(long_recipe), "--out", str(run)], tmp_path)
    _wait_for_rows(run / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "SIGINT: saving a checkpoint" in err and "Traceback" not in err
    assert f"continue with: tether train --resume {run}" in err
    (step, ckpt), *_ = step_checkpoints(run)
    assert load_model_and_tokenizer(str(ckpt))[0] is not None
    assert not (run / "summary.json").exists()
    assert (
        max(json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()) == step
    )

    # resume it for a while, then stop it with SIGTERM: it goes on from the saved step
    proc = _start(["--resume", str(run)], tmp_path)
    _wait_for_rows(run / "metrics.jsonl", step + 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    steps = [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # no gap, no repeat


def test_a_second_signal_exits_at_once(long_recipe, tmp_path):
    run = tmp_path / "run"
    proc = _start([str(long_recipe), "--out", str(run)], tmp_path)
    _wait_for_rows(run / "metrics.jsonl", 2, proc)
    # two different signals pending while the process is stopped are handled back to back
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (130, 143), err
    assert "exiting now, without a checkpoint" in err
    assert step_checkpoints(run) == [] and not (run / "summary.json").exists()


def test_online_iqlearn_resume_is_exact(tmp_path, monkeypatch):
    """Policy samples (the stage's generator) and the λ warm-up step survive a resume."""
    overrides = [
        "task.name=multistep",
        "task.max_digits=1",
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        "model.max_positions=128",
        "train.stage=iqlearn",
        "imitation.online_fraction=0.25",
        "imitation.lam_warmup_steps=4",
        "train.steps=6",
        "train.batch_size=8",
        "train.log_every=1",
        "train.eval_every=3",
        "train.checkpoint_every=2",
        "eval.n=4",
    ]
    _, whole = assert_resume_is_exact(
        load_recipe(None, overrides), ImitationStage, tmp_path, monkeypatch
    )
    lambdas = [r["lambda"] for r in metrics(whole) if "lambda" in r]
    assert lambdas == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def test_more_threads_than_cores_is_pointed_out(monkeypatch, capsys):
    import tether.engine.setup as tt

    monkeypatch.setattr(tt.os, "sched_getaffinity", lambda pid: {0, 1})
    tt.warn_oversubscribed(2)
    assert capsys.readouterr().err == ""
    tt.warn_oversubscribed(1024)
    err = capsys.readouterr().err
    assert "train.threads=1024 × 1 process(es) exceeds the 2 CPU core(s)" in err
    tt.warn_oversubscribed(2, processes=2)
    assert "exceeds the 2 CPU core(s)" in capsys.readouterr().err
