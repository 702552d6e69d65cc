"""Evaluation on every rank, packed by token budget: each process scores its contiguous share of the eval pairs in
packed rows of at most `max_tokens` real tokens (rm/batching.py's PackedPairCollator), in file order, then every
rank gathers every reward. No padding is computed, and the batching depends on the token budget alone, so
`per_device_eval_batch_size` changes no reported number. Every process runs the same number of forwards (ZeRO-3
gathers parameters collectively in each one): a process with fewer rows repeats its first one and drops the result.
A compiled model is evaluated eagerly: evaluation shapes would otherwise compile new graphs mid-run."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from rm.batching import KeyedPairs, PackedPairCollator, model_inputs, pair_token_counts
from rm.loss import reward_metrics, split_rewards


def shard_bounds(pairs: int, num_processes: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) of the eval pairs per process, sizes differing by at most one."""
    cuts = [pairs * rank // num_processes for rank in range(num_processes + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def pack_in_order(pair_tokens: Sequence[int], start: int, end: int, max_tokens: int) -> list[list[int]]:
    """Consecutive pairs start..end-1 grouped greedily into rows of at most max_tokens (a pair alone may exceed)."""
    rows: list[list[int]] = []
    load = 0
    for index in range(start, end):
        if rows and load + pair_tokens[index] <= max_tokens:
            rows[-1].append(index)
            load += pair_tokens[index]
        else:
            rows.append([index])
            load = pair_tokens[index]
    return rows


def eval_rows(pair_tokens: Sequence[int], max_tokens: int, num_processes: int) -> tuple[list[list[list[int]]], int]:
    """Per process: its packed rows of eval-pair indices; and the number of forwards every process runs."""
    per_process = [pack_in_order(pair_tokens, a, b, max_tokens) for a, b in shard_bounds(len(pair_tokens),
                                                                                          num_processes)]
    return per_process, max(len(rows) for rows in per_process)


@contextlib.contextmanager
def eager(model: torch.nn.Module) -> Iterator[None]:
    """Run compiled modules eagerly (torch.compiler.set_stance), so evaluation compiles nothing."""
    stance = getattr(torch.compiler, "set_stance", None)
    with stance("force_eager") if stance is not None else contextlib.nullcontext():
        yield


@torch.no_grad()
def collect_rewards(accelerator: Accelerator, model: torch.nn.Module, pairs: Any,
                    max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected, margin) rewards of every eval pair, in the pairs' order, identical on every rank."""
    tokens = pair_token_counts(pairs)
    per_process, forwards = eval_rows(tokens, max_tokens, accelerator.num_processes)
    rows = per_process[accelerator.process_index]
    keyed, collate = KeyedPairs(pairs), PackedPairCollator()
    was_training = model.training
    model.eval()
    mine = []
    with eager(model):
        for n in tqdm(range(forwards), desc="Evaluating", leave=False,
                      disable=None if accelerator.is_local_main_process else True):  # None: not on a non-TTY
            row = rows[n] if n < len(rows) else (rows or [[0]])[0]  # a repeat: keeps the collectives in step
            batch = collate([keyed[(i, 1)] for i in row])
            inputs = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                      for k, v in model_inputs(batch).items()}
            chosen, rejected = split_rewards(model(**inputs))
            if n < len(rows):
                mine.append(torch.stack([chosen.float(), rejected.float(),
                                         batch["margin"].to(accelerator.device, non_blocking=True)], dim=1))
    model.train(was_training)
    local = torch.cat(mine) if mine else torch.zeros((0, 3), device=accelerator.device)
    if accelerator.num_processes > 1:
        local = accelerator.gather(accelerator.pad_across_processes(local, dim=0))
        size = local.shape[0] // accelerator.num_processes
        local = torch.cat([local[rank * size:rank * size + b - a]
                           for rank, (a, b) in enumerate(shard_bounds(len(tokens), accelerator.num_processes))])
    local = local.cpu()
    return local[:, 0], local[:, 1], local[:, 2]


FEW_EVAL_PAIRS = 100  # below this, the accuracy comes with its 95% interval: 10 pairs cannot tell 0.3 from 0.9 apart


def wilson_interval(correct: float, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion correct/total (sound at 0, at 1 and for few trials)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize_rewards(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> dict[str, float]:
    """Eval metrics; on fewer than FEW_EVAL_PAIRS pairs also accuracy_ci95_low / _high (Wilson)."""
    metrics = reward_metrics(chosen, rejected, margin)
    metrics["pairs"] = float(chosen.numel())
    if 0 < chosen.numel() < FEW_EVAL_PAIRS:
        correct = round(metrics["accuracy"] * chosen.numel())
        metrics["accuracy_ci95_low"], metrics["accuracy_ci95_high"] = wilson_interval(correct, chosen.numel())
    return metrics


def accuracy_note(final: dict[str, float]) -> str | None:
    """The log's sentence for a final eval accuracy measured on few pairs; None when there are enough."""
    if "eval/accuracy_ci95_low" not in final:
        return None
    return (f"eval accuracy {final['eval/accuracy']:.3f} on {int(final['eval/pairs'])} pairs: 95% interval "
            f"{final['eval/accuracy_ci95_low']:.2f}-{final['eval/accuracy_ci95_high']:.2f} "
            f"(Wilson); fewer than {FEW_EVAL_PAIRS} pairs tell only large differences apart (--max_eval_samples, "
            "--validation_file_dir)")


def evaluate(accelerator: Accelerator, model: torch.nn.Module, pairs: Any, max_tokens: int) -> dict[str, float]:
    return summarize_rewards(*collect_rewards(accelerator, model, pairs, max_tokens))
