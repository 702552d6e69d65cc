"""CUDA graphs for the packed micro-batch: its forward, loss and backward captured once per token bucket, then
replayed with one launch.

Why: on the default LoRA row (Qwen3-0.6B shape, 1 pair x GA 8) the GPU worked ~63 ms of a ~190 ms step; the rest
was the host issuing ~5.8k kernels one at a time (docs/speed_results.md). A replay issues them all at once.

What is captured: `RewardModel.forward` on one packed row of static shape (rm.batching.PackedPairCollator with
`pair_slots`: the row padded to its token bucket, the pair count to `pair_slots`), the pairwise loss, and its
backward, which adds into every trainable parameter's `.grad` in place. So the `.grad` tensors exist before the
capture and the loop zeroes them in place (`zero_grad(set_to_none=False)`), never replacing them. Clipping, the
optimizer step and the metrics stay eager. Graphs share one memory pool: a replay uses its memory only while it runs.

When (graphs_wanted): CUDA, one process without DeepSpeed (a DDP or ZeRO backward communicates from hooks), packing
with the varlen attention, no gradient checkpointing (its recompute reads the RNG state on the host) and no
torch.compile. Elsewhere the loop runs eager, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rm.loss import pairwise_loss

GRAPH_INPUTS = ("input_ids", "position_ids", "cu_seq_lens", "margin", "pair_weight")


def graphs_wanted(requested: bool | None, device: torch.device, num_processes: int, zero_stage: int, packing: bool,
                  varlen: bool, checkpointing: bool, compiled: bool) -> tuple[bool, str]:
    """--cuda_graphs on or off, and why. Unset: on wherever it can run (see the module docstring); explicitly true
    where it cannot is refused with the reason, explicitly false is off."""
    blockers = [why for blocked, why in (
        (device.type != "cuda", "not on CUDA"), (num_processes > 1, "more than one process"),
        (zero_stage > 0, "under DeepSpeed"), (not packing, "--packing false"),
        (not varlen, "no varlen attention (it needs bf16 and torch >= 2.10)"),
        (checkpointing, "gradient checkpointing is on"), (compiled, "torch.compile is on")) if blocked]
    if requested is False:
        return False, "as set"
    if blockers:
        if requested:
            from rm.config import ConfigError

            raise ConfigError(f"--cuda_graphs true cannot run here: {', '.join(blockers)}")
        return False, f"auto: {blockers[0]}"
    return True, "as set" if requested else "auto: one CUDA process, packed rows, eager"


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    loss: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor


class StepGraphs:
    """Runs a packed micro-batch's forward, loss and backward (scaled by 1 / gradient_accumulation_steps, as
    accelerator.backward does) through the graph of its token bucket, capturing it the first time a bucket comes."""

    def __init__(self, model: torch.nn.Module, pair_slots: int, max_sequence_tokens: int,
                 gradient_accumulation_steps: int, center_rewards_coefficient: float) -> None:
        self.model = model
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.pair_slots = pair_slots
        self.max_sequence_tokens = max_sequence_tokens
        self.loss_scale = 1.0 / gradient_accumulation_steps
        self.center_rewards_coefficient = center_rewards_coefficient
        self.pool: Any = None  # one memory pool for every bucket's graph, made at the first capture
        self.graphs: dict[int, _Graph] = {}

    def _forward_backward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        tokens = inputs["input_ids"].shape[1]
        rewards = self.model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                             cu_seq_lens=inputs["cu_seq_lens"], max_length=min(tokens, self.max_sequence_tokens))
        slots = self.pair_slots
        chosen, rejected = rewards[:slots], rewards[slots:2 * slots]
        loss = pairwise_loss(chosen, rejected, inputs["margin"], self.center_rewards_coefficient, inputs["pair_weight"])
        (loss * self.loss_scale).backward()
        return loss.detach(), chosen.detach(), rejected.detach()

    def _capture(self, batch: dict[str, Any]) -> _Graph:
        inputs = {key: batch[key].clone() for key in GRAPH_INPUTS}
        for parameter in self.parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        kept = torch._foreach_add([p.grad for p in self.parameters], 0.0)  # the step's gradients so far
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: lazy inits (cuBLAS, autograd) happen here
            for _ in range(1 if self.graphs else 2):
                self._forward_backward(inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        # thread_local: the DataLoader's pin-memory thread keeps allocating host memory while this thread captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            loss, chosen, rejected = self._forward_backward(inputs)
        torch._foreach_copy_([p.grad for p in self.parameters], kept)  # the warm-up's gradients out again
        return _Graph(graph, inputs, loss, chosen, rejected)

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """loss, chosen and rejected rewards of the batch's real pairs (views of the graph's outputs: read them
        before the next call)."""
        tokens = batch["input_ids"].shape[1]
        if tokens not in self.graphs:
            self.graphs[tokens] = self._capture(batch)
        entry = self.graphs[tokens]
        for key, static in entry.inputs.items():
            static.copy_(batch[key], non_blocking=True)
        entry.graph.replay()
        pairs = batch["pairs"]
        return entry.loss, entry.chosen[:pairs], entry.rejected[:pairs]
