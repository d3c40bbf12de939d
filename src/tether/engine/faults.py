"""Interrupts and numerical faults: SIGINT/SIGTERM stop after a checkpoint; NaN/inf losses
and gradients stop the run or skip the batch (``train.on_nonfinite``)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch

# ---------------------------------------------------------------- interrupts and faults


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped the run after saving a checkpoint."""

    def __init__(self, out: Path, step: int, signum: int, checkpoint: Path):
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} at step {step}: checkpoint saved to {checkpoint}; "
            f"continue with: tether train --resume {out}"
        )


class NonFiniteError(FloatingPointError):
    """A NaN or inf loss or gradient with ``train.on_nonfinite: stop``."""


class StopRequests:
    """The first SIGINT or SIGTERM asks the loop to checkpoint and stop after the current step;
    a second one exits at once (no checkpoint; the atomic writes leave nothing half-made)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            sys.stderr.write(f"\n{name} again: exiting now, without a checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        sys.stderr.write(
            f"\n{name}: saving a checkpoint after this step and stopping "
            "(send it again to exit at once)\n"
        )
        sys.stderr.flush()

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def nonfinite_gradient(named: list[tuple[str, torch.nn.Parameter]]) -> str | None:
    """The name of the first parameter whose gradient holds a NaN or inf, if any."""
    for name, p in named:
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return f"the gradient of {name}"
    return None


def gradient_norm(params: list[torch.nn.Parameter]) -> float:
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
