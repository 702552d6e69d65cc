"""Bradley-Terry pairwise loss and the reward-model metrics, in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_rewards(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The collator puts B chosen rows first, then B rejected rows."""
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  center_rewards_coefficient: float = 0.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """mean(-log sigmoid(r_chosen - r_rejected - margin)) + coef * mean((r_chosen + r_rejected)^2).
    With per-pair `weights` the means become weighted sums (packed micro-batches, rm/batching.py)."""
    chosen, rejected = chosen.float(), rejected.float()
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.float()
    per_pair = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        per_pair = per_pair + center_rewards_coefficient * (chosen + rejected) ** 2
    return per_pair.mean() if weights is None else (per_pair * weights.float()).sum()


def pair_statistics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-batch sums (not means) so they can be added over micro-batches and processes, then divided once. The
    pair count is `chosen.numel()`, known on the host (a tensor of it would be a host-to-device copy per batch)."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    return {"correct": (chosen > rejected).float().sum(), "margin": (chosen - rejected).sum()}


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> dict[str, float]:
    """Eval metrics over all pairs: accuracy, loss, margin, reward means and std (the std over both sides)."""
    chosen, rejected = chosen.double(), rejected.double()
    both = torch.cat([chosen, rejected])
    return {
        "accuracy": (chosen > rejected).double().mean().item(),
        "loss": pairwise_loss(chosen, rejected, margin).item(),
        "margin": (chosen - rejected).mean().item(),
        "reward_chosen": chosen.mean().item(),
        "reward_rejected": rejected.mean().item(),
        "reward_mean": both.mean().item(),
        "reward_std": both.std(unbiased=False).item(),
    }
