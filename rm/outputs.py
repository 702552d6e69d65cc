"""Every file and folder a run writes, named in one place, and the one way JSON files are written.

output_dir/
  model/                     merged model + tokenizer (AutoModelForSequenceClassification.from_pretrained loads it)
  adapter/                   the LoRA adapter with the trained score head (LoRA runs only)
  training_config.json       the settings as they ran (mixed precision resolved)
  run_info.json              what actually ran: distributed type, processes, ZeRO stage, steps
  metrics.json               final metrics and the logged history
  training_curves.png, eval_reward_histogram.png
  runs/                      tensorboard event files
  scores/                    rm.score's output when no --output is given
  checkpoint-<step>/         full training state (rm/checkpoint.py), written as .staging-checkpoint-<step>/ first
  run.lock                   while a run writes here: its pid, host and start time (one run per output_dir)
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
TRAINING_CONFIG = "training_config.json"
RUN_INFO = "run_info.json"
METRICS = "metrics.json"
CURVES_PLOT = "training_curves.png"
HISTOGRAM_PLOT = "eval_reward_histogram.png"
TENSORBOARD_DIR = "runs"
SCORES_DIR = "scores"  # rm.score's default output folder

CHECKPOINT_PREFIX = "checkpoint-"
STAGING_PREFIX = ".staging-"
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
DATA_ORDER = "data_order.json"
SCHEDULER_STATE = "scheduler.json"
TRAIN_DATA = "train_data.json"  # size and sha256 of each train data file: a resume on changed data is refused
MANIFEST = "manifest.json"  # size and sha256 of every file of a checkpoint, checked at resume
RUN_LOCK = "run.lock"  # pid, host and start time of the run writing into output_dir
RUN_LOCK_DRAFT_PREFIX = RUN_LOCK + ".tmp-"  # the lock while it is written, before it is linked into place

# What a run writes into output_dir besides checkpoints: --overwrite_output_dir removes these (and checkpoints).
RUN_OUTPUTS = (MODEL_DIR, ADAPTER_DIR, TRAINING_CONFIG, RUN_INFO, METRICS, CURVES_PLOT, HISTOGRAM_PLOT,
               TENSORBOARD_DIR, SCORES_DIR)

FILE_MODE = 0o644  # readable by the people and jobs that load the model, whatever the umask
DIR_MODE = 0o755


def written_by_others(output_dir: str) -> list[str]:
    """What output_dir holds besides this run's lock (and the lock's draft: another rank of this run may look while
    the global rank 0 is taking it). Empty when output_dir does not exist."""
    if not os.path.isdir(output_dir):
        return []
    return [name for name in os.listdir(output_dir)
            if name != RUN_LOCK and not name.startswith(RUN_LOCK_DRAFT_PREFIX)]


def check_writable(output_dir: str) -> None:
    """Refuse, before any training, an output_dir that is a file, sits under a file, or cannot be created or
    written; nothing is created here."""
    from rm.config import ConfigError

    path = os.path.abspath(output_dir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"sits under {existing}, which is a file"
        raise ConfigError(f"output_dir {output_dir!r} {where}; choose a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"output_dir {output_dir!r} {what}")


def write_json(path: str, data: Any) -> None:
    """Atomically: a temporary file in the same folder, flushed to disk, then renamed over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
