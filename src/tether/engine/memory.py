"""Peak memory of a run, for ``summary.json`` and the logged figures.

``peak_rss_mb``: the largest resident set of this process so far (``getrusage``'s
``ru_maxrss``: kilobytes on Linux, bytes on macOS), in MiB: weights, optimizer state,
activations, the reference, the data, the Python heap, all of it. On CUDA also
``cuda_peak_allocated_mb``: ``torch.cuda.max_memory_allocated`` of the run's device, the most
its tensors held at once.
"""

from __future__ import annotations

import sys

import torch

MB = 2**20


def peak_rss_mb() -> float | None:
    """The peak resident set size of this process in MiB (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kilobytes on Linux
    return round(peak * scale / MB, 1)


def peak_memory(device: torch.device) -> dict[str, float]:
    """``peak_rss_mb`` and, on a CUDA device, ``cuda_peak_allocated_mb``."""
    figures = {}
    rss = peak_rss_mb()
    if rss is not None:
        figures["peak_rss_mb"] = rss
    if device.type == "cuda" and torch.cuda.is_available():
        figures["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / MB, 1)
    return figures
