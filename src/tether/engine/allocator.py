"""Keep freed memory inside the process (Linux, glibc), so a training step reuses the pages
the previous step freed instead of faulting fresh ones in.

A training step allocates activations of several MB each, frees them all in the backward,
and allocates them again in the next step. glibc's defaults hand the freed top of the heap
back to the kernel once more than twice the largest recent allocation is free (the trim
threshold), and serve blocks above an adaptive threshold with their own ``mmap``; the next
step then page-faults every 4 KiB again, and the kernel zeroes each page. On the development
machine an MLE step of the demo model (64 rows) took 17,000–86,000 minor page faults (70–340
MB zeroed per step) and 0.59–0.78 s; with the thresholds below, mostly fewer than 100 (up to
18,000 in a step whose longer batch grows the heap) and 0.55–0.62 s.

:func:`keep_freed_memory` raises both thresholds to glibc's limits: blocks up to 32 MiB come
from the heap, and freed memory stays mapped until 2 GiB of it sits free at the top. The
peak resident size does not change (the same memory is live at the peak); what is freed
after the peak stays with the process until it exits. The ``tether`` command calls it once at
start-up; ``TETHER_KEEP_FREED_MEMORY=0`` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1  # an int, as mallopt takes
ENV = "TETHER_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if both were set.
    False (and nothing changed) off Linux, on a C library without ``mallopt`` (musl's
    accepts nothing), or when ``TETHER_KEEP_FREED_MEMORY=0``."""
    if os.environ.get(ENV, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # the mmap threshold first: setting either turns off glibc's adaptive thresholds
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
