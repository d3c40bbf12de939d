"""Run by tests/test_fsdp.py and tests/test_deepspeed.py under a 2-process launch (FSDP,
DeepSpeed or DDP, from the launcher's environment): ``tether.train`` on several recipes one
after the other in the same processes, so the cost of starting the processes is paid once.
Argument: a JSON file {run folder: [override, ...]}. A run the launch refuses (a
:class:`~tether.config.RecipeError`, raised on every process before any collective) leaves
its one-line message in ``FOLDER.refused`` and the next run goes on.

Under DeepSpeed ZeRO-3 each process also writes ``FOLDER.zero3-rank-R.json``: for every
weight of the policy, its whole size, the size of this process's partition and the size of
what the process holds outside a forward pass, once when accelerate has prepared the model
(``prepared``) and once after the run (``trained``: its steps, evaluations and gathered
saves done)."""

import json
import os
import sys
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from tether import distributed
from tether.config import RecipeError, load_recipe
from tether.engine.loop import train


def held(model: Any) -> dict[str, list[int]]:
    """ZeRO-3's partitioned weights: {name: [whole size (``ds_numel``), this process's
    partition (``ds_tensor``), what it holds now]}; {} when none is partitioned."""
    return {
        name: [p.ds_numel, p.ds_tensor.numel(), p.numel()]
        for name, p in model.named_parameters()
        if hasattr(p, "ds_numel")
    }


def main(plan: str) -> None:
    prepared: list[Any] = []  # the run's prepared model and what it held then
    prepare = Accelerator.prepare

    def watched(self: Accelerator, *args: Any, **kwargs: Any) -> Any:
        result = prepare(self, *args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result
        prepared[:] = [model, held(model)]
        return result

    Accelerator.prepare = watched  # type: ignore[method-assign]
    rank = os.environ.get("RANK", "0")
    for out, overrides in json.loads(open(plan).read()).items():
        prepared.clear()
        try:
            train(load_recipe(None, overrides), out, progress=False)
        except RecipeError as err:
            if rank == "0":
                Path(out + ".refused").write_text(f"{err}\n")
            continue
        if prepared and prepared[1]:
            model, then = prepared
            shares = {"prepared": then, "trained": held(model)}
            Path(f"{out}.zero3-rank-{rank}.json").write_text(json.dumps(shares))
        prepared.clear()
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
