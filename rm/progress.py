"""The loop's bookkeeping, kept out of its body: where it is in the data, and the metrics between two log lines."""

from __future__ import annotations

import time
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from rm.checkpoint import Position
from rm.loss import pair_statistics
from rm.runtime import peak_memory_gb


class DataPosition:
    """Every epoch's micro-batches in order, resuming mid-epoch from a checkpoint's Position, and the Position after
    any optimizer step (for the next checkpoint).

    Each epoch is shuffled by the loader's seeded generator; its state at the epoch's start is what a checkpoint
    keeps, and skip_first_batches then skips the micro-batches already trained (it counts micro-batches, GA
    included). Placeholders of the packed path count as micro-batches too (rm/batching.py)."""

    def __init__(self, accelerator: Accelerator, loader: DataLoader, start: Position, total_steps: int,
                 epochs: int) -> None:
        self.accelerator = accelerator
        self.loader = loader
        self.start = start
        self.total_steps = total_steps
        self.epochs = epochs
        self.generator: torch.Generator = loader.generator
        self.epoch = start.epoch
        self.micro_batches = 0  # of the current epoch, consumed
        self._epoch_start_state = start.epoch_generator_state

    def __iter__(self) -> Iterator[Any]:
        if self.start.global_step >= self.total_steps:  # resumed from the last step's checkpoint: nothing left
            return
        for epoch in range(self.start.epoch, self.epochs):
            self.epoch, loader, self.micro_batches = epoch, self.loader, 0
            if epoch == self.start.epoch and self.start.epoch_generator_state is not None:  # resuming mid-run
                self.generator.set_state(self.start.epoch_generator_state)
                self.micro_batches = self.start.micro_batches_in_epoch
                if self.micro_batches:
                    loader = self.accelerator.skip_first_batches(self.loader, self.micro_batches)
            self._epoch_start_state = self.generator.get_state()
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            for batch in loader:
                self.micro_batches += 1
                yield batch

    def after_step(self, global_step: int, history: list[dict[str, Any]]) -> Position:
        """The position after optimizer step `global_step`; at an epoch's end, the start of the next one (whose
        shuffle continues from the generator's state now, as an uninterrupted run's does)."""
        if self.micro_batches >= len(self.loader):
            return Position(global_step, self.epoch + 1, 0, list(history), self.generator.get_state())
        return Position(global_step, self.epoch, self.micro_batches, list(history), self._epoch_start_state)


class MetricsWindow:
    """Train metrics summed between two log lines: loss, correct pairs, margin and tokens in one vector on the device
    (one add per micro-batch, no host sync), plain micro-batches and pairs on the host, where they are known. Summed
    over processes in one reduce and read to the host in one copy, only when logged."""

    DEVICE_KEYS = ("loss", "correct", "margin", "tokens")

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.device_sums = torch.zeros(len(self.DEVICE_KEYS), device=accelerator.device)
        self.micro = 0
        self.pairs = 0
        self.started = time.perf_counter()

    def add(self, batch: dict[str, Any], loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        statistics = pair_statistics(chosen, rejected)
        self.device_sums += torch.stack([loss.detach().float(), statistics["correct"], statistics["margin"],
                                         batch["num_tokens"].float()])
        self.micro += batch.get("micro_batches", 1)  # plain micro-batches a packed one stands for
        self.pairs += chosen.numel()

    def collect(self, **extra: float) -> dict[str, float]:
        """Collective (every rank): the window's metrics, then a fresh window."""
        counts = torch.tensor([self.micro, self.pairs], dtype=self.device_sums.dtype).to(self.device_sums.device)
        summed = self.accelerator.reduce(torch.cat([self.device_sums, counts]), reduction="sum").tolist()
        totals = dict(zip((*self.DEVICE_KEYS, "micro", "pairs"), summed))
        elapsed = time.perf_counter() - self.started
        metrics = {
            "train/loss": totals["loss"] / totals["micro"],
            "train/accuracy": totals["correct"] / totals["pairs"],
            "train/margin": totals["margin"] / totals["pairs"],
            **{f"train/{k}": v for k, v in extra.items()},
            "train/tokens_per_s": totals["tokens"] / elapsed,
            "train/pairs_per_s": totals["pairs"] / elapsed,
            "train/peak_memory_gb": peak_memory_gb(self.accelerator),
        }
        self.device_sums.zero_()
        self.micro = self.pairs = 0
        self.started = time.perf_counter()
        return metrics
