"""PNG plots written at the end of training: the train/eval curves and the eval reward histogram.

matplotlib runs on its file-only Agg backend, so no display is needed (servers, CI, SLURM jobs). It is imported
when the first plot is drawn, at the end of training, not at launch (~0.6 s saved before the first step).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from rm.outputs import CURVES_PLOT, HISTOGRAM_PLOT

CURVES = (("loss", "loss"), ("accuracy", "pairwise accuracy"), ("margin", "mean margin (chosen - rejected)"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: Sequence[dict[str, Any]], path: str) -> str:
    """Loss, accuracy and margin against the optimizer step, train and eval, from metrics.json's history."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.8))
    for axis, (name, title) in zip(axes, CURVES):
        for split, style in (("train", "-"), ("eval", "o-")):
            points = [(h["step"], h[f"{split}/{name}"]) for h in history if f"{split}/{name}" in h]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, style, label=split, markersize=4)
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_reward_histogram(chosen: Sequence[float], rejected: Sequence[float], path: str) -> str:
    """Overlaid histograms of the chosen and rejected rewards on the eval set."""
    chosen, rejected = [float(x) for x in chosen], [float(x) for x in rejected]
    low, high = min(chosen + rejected), max(chosen + rejected)
    bins = [low + (high - low) * i / 30 for i in range(31)] if high > low else 10
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / max(len(chosen), 1)
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.hist(chosen, bins=bins, alpha=0.6, label=f"chosen (mean {sum(chosen) / max(len(chosen), 1):.3f})")
    axis.hist(rejected, bins=bins, alpha=0.6, label=f"rejected (mean {sum(rejected) / max(len(rejected), 1):.3f})")
    axis.set_title(f"eval rewards, {len(chosen)} pairs, accuracy {accuracy:.3f}")
    axis.set_xlabel("reward")
    axis.set_ylabel("count")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_training_plots(output_dir: str, history: Sequence[dict[str, Any]],
                         eval_rewards: tuple[Sequence[float], Sequence[float]] | None) -> list[str]:
    """Both plots into output_dir (the histogram only when there was an eval set); returns the paths written."""
    written = [plot_training_curves(history, os.path.join(output_dir, CURVES_PLOT))]
    if eval_rewards is not None:
        written.append(plot_reward_histogram(*eval_rewards, os.path.join(output_dir, HISTOGRAM_PLOT)))
    return written
