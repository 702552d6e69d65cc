"""Stop conditions checked once per optimizer step, agreed by every rank: a preemption signal and a non-finite loss
or gradient norm.

SIGTERM / SIGINT (how schedulers preempt, or Ctrl-C) only set a flag; at the next optimizer step every rank learns
whether any rank got one (one small all-reduce, read one step later without blocking), the step finishes, a
checkpoint is saved collectively and the run exits non-zero with the resume command. A second signal stops at once.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from typing import Any

import torch
from accelerate import Accelerator

EXIT_INTERRUPTED = 3
EXIT_NONFINITE = 4
RESUME_FLAG = "--resume_from_checkpoint"


class TrainingStopped(RuntimeError):
    exit_code = 1
    is_error = True  # printed as `error: ...`


class TrainingInterrupted(TrainingStopped):
    """A requested stop (a signal, the checkpoint saved): what was asked for, so not printed as an error."""

    exit_code = EXIT_INTERRUPTED
    is_error = False


class NonFiniteError(TrainingStopped):
    exit_code = EXIT_NONFINITE


class StepGuard:
    """Watches each micro-batch's loss (on device, no sync) and, at each optimizer step, agrees across ranks on
    (non-finite loss or grad norm, stop requested).

    No host sync inside a step: a step's flags are reduced and copied to the host asynchronously and read at the
    next optimizer step (long finished by then), so a stop request or a non-finite step is acted on one step later.
    `settle()` reads them at once: call it before saving a checkpoint or the model, so no non-finite step is ever
    saved. With --skip_nonfinite_steps the step's own flags decide whether it is skipped, so that mode reads them
    at once (a blocking sync per step)."""

    def __init__(self, accelerator: Accelerator, skip_nonfinite: bool) -> None:
        self.accelerator = accelerator
        self.skip_nonfinite = skip_nonfinite
        self.signal_name: str | None = None
        self.stop_requested = False
        self.skipped_steps: list[int] = []
        self._nonfinite = torch.zeros((), device=accelerator.device)
        self._pending: tuple[torch.Tensor, Any, int] | None = None  # (host flags, copy-done event, step)
        self._previous: dict[int, Any] = {}

    # ---- signals
    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:  # a second signal: stop now, without a checkpoint
            self.restore_signal_handlers()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.signal_name = signal.Signals(signum).name

    # ---- per micro-batch and per optimizer step
    def watch(self, loss: torch.Tensor) -> None:
        self._nonfinite += ~torch.isfinite(loss.detach())

    def check_step(self, grad_norm: Any, step: int) -> bool:
        """Called at the optimizer step before `optimizer.step()`; returns True when the step must be skipped
        (its gradients are to be dropped; only with skip_nonfinite). Raises NonFiniteError for this step (with
        skip_nonfinite) or the previous one (without) unless skipping was asked for."""
        device = self._nonfinite.device
        if grad_norm is None:  # not measured
            norm = torch.zeros((), device=device)
        else:
            norm = grad_norm.float() if torch.is_tensor(grad_norm) else torch.full((), float(grad_norm), device=device)
        stop = torch.zeros((), device=device)
        if self.signal_name is not None:
            stop = stop + 1.0  # a scalar add on the device: no host-to-device copy, so no sync
        flags = torch.stack([self._nonfinite.float() + (~torch.isfinite(norm)).float(), stop])
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        flags = torch.cat([flags, norm.reshape(1)])
        self._nonfinite = torch.zeros_like(self._nonfinite)
        if self.skip_nonfinite:
            return self._resolve(flags.cpu(), None, step)
        previous, self._pending = self._pending, self._to_host(flags, step)
        return previous is not None and self._resolve(*previous)

    def settle(self) -> None:
        """Act on the last optimizer step's flags now (before a checkpoint or the export)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._resolve(*pending)

    @staticmethod
    def _to_host(flags: torch.Tensor, step: int) -> tuple[torch.Tensor, Any, int]:
        if flags.device.type != "cuda":
            return flags, None, step
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done, step

    def _resolve(self, flags: torch.Tensor, done: Any, step: int) -> bool:
        if done is not None:
            done.synchronize()
        nonfinite, stop, norm = flags.tolist()
        self.stop_requested = self.stop_requested or stop > 0
        if not nonfinite > 0:
            return False
        if not self.skip_nonfinite:
            raise NonFiniteError(f"non-finite loss or gradient norm at optimizer step {step} (grad norm {norm}); "
                                 "stopped without saving, the last good checkpoint is kept. Lower the learning rate, "
                                 "check the data, or pass --skip_nonfinite_steps true to skip such steps")
        self.skipped_steps.append(step)
        return True


def resume_command() -> str:
    """The command that continues this run: the launcher's own command line when launched (the parent process of
    a torchrun worker), else this python command; with --resume_from_checkpoint latest."""
    command = [sys.executable, *sys.argv]
    if "WORLD_SIZE" in os.environ:
        try:
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
                parent = [part.decode() for part in f.read().split(b"\0") if part]
            command = parent if any(part.endswith("train.py") for part in parent) else ["<your launch command>",
                                                                                         *sys.argv]
        except OSError:
            command = ["<your launch command>", *sys.argv]
    cleaned: list[str] = []
    skip_next = False
    for part in command:
        if skip_next:
            skip_next = False
            continue
        if part == RESUME_FLAG:
            skip_next = True
            continue
        if part.startswith(RESUME_FLAG + "="):
            continue
        cleaned.append(part)
    return shlex.join(cleaned + [RESUME_FLAG, "latest"])
