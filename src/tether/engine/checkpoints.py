"""Checkpoints and exact resume.

Every checkpoint is a ``save_pretrained`` folder written atomically (``NAME.tmp``, then a
rename), with ``tether.json`` (how it was trained) and, for ``checkpoints/step-N``,
``trainer_state.pt``: the optimizer, scheduler, the stage's data position and every RNG, so
that ``--resume`` continues bit for bit."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tether import distributed
from tether.config import first_line
from tether.models.lora import is_lora, load_adapter, save_model
from tether.stages.base import Stage


class RunDirError(ValueError):
    """The run directory cannot be used; nothing was written."""


def check_new_run_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirError(
            f"run directory {str(out)!r} is a file, not a folder; choose another --out"
        )
    if out.exists() and any(out.iterdir()):
        raise RunDirError(
            f"run directory {str(out)!r} already exists and is not empty; choose another --out"
        )


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    meta: dict[str, Any],
    state: dict[str, Any] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Write to a temporary sibling (``NAME.tmp``), then rename, so a crash never leaves a
    half checkpoint under the final name (and loaders refuse ``*.tmp`` folders).
    ``state`` is the trainer state that ``--resume`` needs (optimizer, RNGs, data position)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tmp)  # LoRA: the merged weights, and the adapter in adapter/
    tokenizer.save_pretrained(tmp)
    if state is not None:
        torch.save(state, tmp / TRAINER_STATE)
    if extra is not None:  # files a stage keeps beside the weights (a reward model's head)
        extra(tmp)
    (tmp / "tether.json").write_text(json.dumps(meta, indent=2) + "\n")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


# ---------------------------------------------------------------- checkpoints and resuming

TRAINER_STATE = "trainer_state.pt"


_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete ``checkpoints/step-N`` folders of a run, oldest first. A folder is complete once
    it has its final name: it is written under ``step-N.tmp`` and renamed as a whole."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(out: Path, keep: int | None) -> None:
    if keep is not None:
        for _, path in step_checkpoints(out)[:-keep]:
            shutil.rmtree(path)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def training_state(
    step: int, optimizer: Any, scheduler: Any, stage: Stage[Any], carried: dict[str, Any]
) -> dict[str, Any]:
    """Everything besides the weights that makes a resumed run continue bit for bit. Across
    processes (every one calls this) ``ranks`` holds each process's stage and RNG states: its
    share of the prompts is sampled with its own generator."""
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "stage": stage.state_dict(),
        "rng": rng_state(),
        "carried": carried,
    }
    if distributed.active():  # each process's own, in place of the main process's alone
        state["ranks"] = distributed.gather_objects(
            {"stage": state.pop("stage"), "rng": state.pop("rng")}
        )
    return state


def check_resumable(out: Path) -> Path:
    """The newest checkpoint of an unfinished run, or RunDirError saying why not."""
    if not (out / "config.yaml").is_file():
        raise RunDirError(f"--resume {str(out)!r}: not a run directory (no config.yaml)")
    if (out / "summary.json").is_file():
        raise RunDirError(f"--resume {str(out)!r}: the run already finished (summary.json)")
    found = step_checkpoints(out)
    if not found:
        raise RunDirError(f"--resume {str(out)!r}: no checkpoint to resume from in checkpoints/")
    return found[-1][1]


def restore_training(
    checkpoint: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, stage: Stage[Any]
) -> tuple[int, dict[str, Any]]:
    """Load weights, optimizer, scheduler, the stage's data position and every RNG."""
    from transformers import AutoModelForCausalLM

    try:
        if is_lora(model):  # the base weights are model.init's: only the adapter was trained
            load_adapter(model, checkpoint)
        else:
            saved = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True)
            model.load_state_dict(saved.state_dict())  # in place: the optimizer keeps its own
    except Exception as err:  # a damaged file: safetensors, JSON, shapes
        raise RunDirError(
            f"--resume: the weights in {str(checkpoint)!r} cannot be loaded ({first_line(err)}); "
            "remove that checkpoint folder to resume from the one before it"
        ) from err
    try:  # our own file, written by save_checkpoint: it holds Python and NumPy RNG tuples
        state = torch.load(checkpoint / TRAINER_STATE, weights_only=False)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a trainer state")
    except Exception as err:  # truncated, overwritten, not a torch file
        raise RunDirError(
            f"--resume: {str(checkpoint / TRAINER_STATE)!r} cannot be read ({first_line(err)}); "
            "remove that checkpoint folder to resume from the one before it"
        ) from err
    saved_world = len(state.get("ranks", [None]))
    world = distributed.world_size() if distributed.active() else 1
    if saved_world != world:
        raise RunDirError(
            f"--resume {str(checkpoint)!r}: written by {saved_world} process(es), resumed with "
            f"{world}; resume with {saved_world} (each process's prompt share and sampling "
            "generator are part of the state)"
        )
    own = state["ranks"][distributed.rank()] if world > 1 else state
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stage.load_state_dict(own["stage"])
    random.setstate(own["rng"]["python"])
    np.random.set_state(own["rng"]["numpy"])
    torch.set_rng_state(own["rng"]["torch"])
    if own["rng"].get("cuda") and torch.cuda.is_available():  # dropout on the GPU
        torch.cuda.set_rng_state_all(own["rng"]["cuda"])
    return int(state["step"]), state["carried"]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (the lost part of the run), and a
    partial last line (the process was killed while writing it). RunDirError naming the file
    and line for a damaged line before the last."""
    from tether.eval.report import read_metrics

    if not path.is_file():
        return
    try:
        rows = read_metrics(path)
    except ValueError as err:
        raise RunDirError(f"--resume: {err}") from err
    kept = [json.dumps(row) for row in rows if row["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
