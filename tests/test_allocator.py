"""tether.engine.allocator: freed memory stays in the process, so repeated steps stop page-faulting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tether.engine.allocator import ENV, keep_freed_memory

# A step's pattern: twenty blocks of 1.2-2.1 MB (activations of varied shapes), each beside a
# small one, all live together, then all freed; five steps, minor page faults of the last three.
SCRIPT = """
import resource, sys, torch
from tether.engine.allocator import keep_freed_memory
if sys.argv[1] == "1":
    assert keep_freed_memory()
def step():
    blocks = []
    for i in range(20):
        blocks.append(torch.ones(300_000 + 37_000 * (i % 7)))
        blocks.append(torch.ones(100))
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")


def faults(tuned: bool) -> int:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "GLIBC_TUNABLES")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, "1" if tuned else "0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


@linux_only
def test_repeated_steps_stop_faulting_pages_in():
    default, kept = faults(False), faults(True)
    # glibc's defaults give the freed blocks back and fault ~8,000 pages in every step
    assert default > 5_000, default
    assert kept < 100, (default, kept)


@linux_only
def test_opt_out(monkeypatch):
    monkeypatch.setenv(ENV, "0")
    assert keep_freed_memory() is False
