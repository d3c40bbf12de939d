"""Checkpoints and exact resume.

Every checkpoint is a ``save_pretrained`` folder written atomically (``NAME.tmp``, then a
rename), with ``tether.json`` (how it was trained) and, for ``checkpoints/step-N``,
``trainer_state.pt``: the optimizer, scheduler, the stage's data position and every RNG, so
that ``--resume`` continues bit for bit.

Under FSDP every process holds a shard of the weights and of the optimizer's state. The
weights are saved whole (gathered on the main process by
:func:`tether.distributed.whole_state_dict`: the folder stays a ``save_pretrained`` one), the optimizer's state as one file per process
(``optimizer-rank-R.pt``, that process's shard, never gathered): every process writes its
file into ``NAME.tmp`` before the main one renames the folder, so the checkpoint appears whole
or not at all."""

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
    main: bool = True,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write to a temporary sibling (``NAME.tmp``), then rename, so a crash never leaves a
    half checkpoint under the final name (and loaders refuse ``*.tmp`` folders).
    ``state`` is the trainer state that ``--resume`` needs (optimizer, RNGs, data position).
    A state from :func:`training_state` with a sharded optimizer (FSDP) is saved by every
    process, each writing its own shard; the main one (``main``) writes everything else.
    ``weights``: the model's whole state dict, where ``model.state_dict()`` is not it (FSDP:
    :func:`tether.distributed.whole_state_dict`)."""
    tmp = path.with_name(path.name + ".tmp")
    shard = None if state is None else state.pop(_OWN_SHARD, None)
    if main and tmp.exists():
        shutil.rmtree(tmp)
    if shard is not None:  # every process: its optimizer shard, into the folder being written
        if main:
            tmp.mkdir(parents=True)
        distributed.barrier()
        torch.save(shard, tmp / _shard_file(distributed.rank()))
        distributed.barrier()
    if not main:
        return
    if weights is not None:
        model.save_pretrained(tmp, state_dict=weights)
    else:
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
_OWN_SHARD = "own_optimizer_shard"  # in a training_state(), until save_checkpoint writes it


def _shard_file(rank: int) -> str:
    return f"optimizer-rank-{rank}.pt"


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
    optimizer_state = optimizer.state_dict()
    own = None
    if _sharded(optimizer_state):  # FSDP, ZeRO: each process's shard goes to its own file
        own, optimizer_state = _local_shards(optimizer_state), None
    state = {
        "step": step,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "stage": stage.state_dict(),
        "rng": rng_state(),
        "carried": carried,
    }
    if distributed.active():  # each process's own, in place of the main process's alone
        state["ranks"] = distributed.gather_objects(
            {"stage": state.pop("stage"), "rng": state.pop("rng")}
        )
    if own is not None:
        state[_OWN_SHARD] = own
    return state


def _sharded(optimizer_state: dict[str, Any]) -> bool:
    """Whether an optimizer's state is this process's alone: it holds DTensors (shards of
    FSDP2's parameters), or it is DeepSpeed ZeRO's (partitioned, in its own format)."""
    from torch.distributed.tensor import DTensor

    if "state" not in optimizer_state:  # DeepSpeed's ZeRO optimizer
        return True
    return any(
        isinstance(v, DTensor) for per in optimizer_state["state"].values() for v in per.values()
    )


def _local_shards(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's state with each DTensor replaced by this process's shard (a plain
    tensor, copied when it is a view of a larger buffer, so the file holds the shard only)."""
    from torch.distributed.tensor import DTensor

    if "state" not in optimizer_state:  # DeepSpeed's: already this process's partition
        return optimizer_state

    def local(v: Any) -> Any:
        if not isinstance(v, DTensor):
            return v
        t = v.to_local()
        return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()

    per_param = {
        i: {k: local(v) for k, v in per.items()} for i, per in optimizer_state["state"].items()
    }
    return {**optimizer_state, "state": per_param}


def _as_shards_of(shard_state: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """Undo :func:`_local_shards` for this optimizer: a saved tensor of a DTensor parameter's
    local shape becomes a DTensor sharded as the parameter is."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for i, per in shard_state["state"].items():
        p = params[int(i)]
        if isinstance(p, DTensor):
            per = {
                k: DTensor.from_local(
                    v,
                    p.device_mesh,
                    p.placements,
                    run_check=False,
                    shape=p.shape,
                    stride=p.stride(),
                )
                if torch.is_tensor(v) and v.dim() > 0 and v.shape == p.to_local().shape
                else v
                for k, v in per.items()
            }
        out[i] = per
    return {**shard_state, "state": out}


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
            if distributed.fsdp_modules(model):  # each process keeps its shard of each weight
                distributed.load_whole_weights(model, saved.state_dict())
            else:
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
    if state["optimizer"] is None:  # sharded (FSDP): this process's own file
        shard = torch.load(checkpoint / _shard_file(distributed.rank()), weights_only=False)
        if "state" not in shard:
            raise RunDirError(
                f"--resume {str(checkpoint)!r}: written under DeepSpeed, whose partitioned "
                "optimizer state tether does not restore; resume runs of DDP or FSDP"
            )
        optimizer.load_state_dict(_as_shards_of(shard, optimizer))
    else:
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
