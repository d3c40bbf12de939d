"""What every tether process sets before it works: the CLI's own process (its callback) and
each run a command spawns (``tether demo --jobs``), so that both behave alike."""

from __future__ import annotations

from transformers.utils import logging as hf_logging

from tether.engine.allocator import keep_freed_memory


def prepare_process() -> None:
    """No "Loading weights" bars from transformers; freed memory kept for the next step instead
    of returned and faulted in again (:func:`keep_freed_memory`); no "Setting accelerator to
    CPU" from DeepSpeed on CPUs (:func:`tether.distributed.name_deepspeeds_accelerator`, which
    imports torch: called here, not at import)."""
    from tether.distributed import name_deepspeeds_accelerator

    hf_logging.disable_progress_bar()
    keep_freed_memory()
    name_deepspeeds_accelerator()
