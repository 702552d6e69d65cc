"""Evaluation on every rank: rewards of all eval pairs gathered with gather_for_metrics (no duplicates)."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rm.loss import reward_metrics, split_rewards


@torch.no_grad()
def collect_rewards(accelerator: Accelerator, model: torch.nn.Module,
                    loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected, margin) rewards of every eval pair, identical on every rank."""
    was_training = model.training
    model.eval()
    chosen, rejected, margins = [], [], []
    for batch in tqdm(loader, desc="Evaluating", leave=False, disable=not accelerator.is_local_main_process):
        c, r = split_rewards(model(batch["input_ids"], batch["attention_mask"]))
        c, r, m = accelerator.gather_for_metrics((c, r, batch["margin"]))
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
        margins.append(m.float().cpu())
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected), torch.cat(margins)


def summarize_rewards(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> dict[str, float]:
    metrics = reward_metrics(chosen, rejected, margin)
    metrics["pairs"] = float(chosen.numel())
    return metrics


def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    return summarize_rewards(*collect_rewards(accelerator, model, loader))
