"""Run by tests/test_fsdp.py and tests/test_deepspeed.py under a 2-process launch (FSDP,
DeepSpeed or DDP, from the launcher's environment): ``tether.train`` on several recipes one
after the other in the same processes, so the cost of starting the processes is paid once.
Argument: a JSON file {run folder: [override, ...]}. A run the launch refuses (a
:class:`~tether.config.RecipeError`, raised on every process before any collective) leaves
its one-line message in ``FOLDER.refused`` and the next run goes on."""

import json
import os
import sys
from pathlib import Path

from tether.config import RecipeError, load_recipe
from tether.engine.loop import train


def main(plan: str) -> None:
    for out, overrides in json.loads(open(plan).read()).items():
        try:
            train(load_recipe(None, overrides), out, progress=False)
        except RecipeError as err:
            if os.environ.get("RANK", "0") == "0":
                Path(out + ".refused").write_text(f"{err}\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
