"""rm.plots: the PNGs train.py writes at the end (curves, eval reward histogram)."""

import matplotlib.image

from rm.outputs import CURVES_PLOT, HISTOGRAM_PLOT
from rm.plots import write_training_plots

HISTORY = [{"step": s, "train/loss": 1 / s, "train/accuracy": 1 - 0.5 / s, "train/margin": 0.1 * s}
           for s in range(10, 60, 10)] + [{"step": 25, "eval/loss": 0.4, "eval/accuracy": 0.8, "eval/margin": 1.0},
                                          {"step": 50, "eval/loss": 0.3, "eval/accuracy": 0.9, "eval/margin": 2.0}]


def read_png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.std() > 0.01  # a real drawing, not a blank canvas
    return image


def test_curves_and_histogram_are_written(tmp_path):
    written = write_training_plots(str(tmp_path), HISTORY, ([1.0, 2.0, 1.5, 0.2], [0.0, -1.0, 0.3, 0.5]))
    assert written == [str(tmp_path / CURVES_PLOT), str(tmp_path / HISTOGRAM_PLOT)]
    curves, histogram = read_png(written[0]), read_png(written[1])
    assert curves.shape[1] > 2 * curves.shape[0]  # three panels side by side
    assert histogram.shape[:2] == (400, 600)


def test_no_eval_set_no_histogram_and_constant_rewards(tmp_path):
    train_only = [h for h in HISTORY if "train/loss" in h]
    assert write_training_plots(str(tmp_path), train_only, None) == [str(tmp_path / CURVES_PLOT)]
    assert not (tmp_path / HISTOGRAM_PLOT).exists()
    write_training_plots(str(tmp_path), train_only, ([0.5, 0.5], [0.5, 0.5]))  # all rewards equal: still drawn
    read_png(tmp_path / HISTOGRAM_PLOT)


def test_launch_does_not_import_matplotlib():
    """The plots are drawn at the end: importing the trainer leaves matplotlib (~0.6 s) for then."""
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", "import sys, train; print('matplotlib' in sys.modules)"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]
