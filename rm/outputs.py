"""Every file and folder a run writes, named in one place, and the one way JSON files are written.

output_dir/
  model/                     merged model + tokenizer (AutoModelForSequenceClassification.from_pretrained loads it)
  adapter/                   the LoRA adapter with the trained score head (LoRA runs only)
  training_config.json       the settings as they ran (mixed precision resolved)
  run_info.json              what actually ran: distributed type, processes, ZeRO stage, steps
  metrics.json               final metrics and the logged history
  training_curves.png, eval_reward_histogram.png
  runs/                      tensorboard event files
  checkpoint-<step>/         full training state (rm/checkpoint.py), written as .staging-checkpoint-<step>/ first
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

CHECKPOINT_PREFIX = "checkpoint-"
STAGING_PREFIX = ".staging-"
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
DATA_ORDER = "data_order.pt"

FILE_MODE = 0o644  # readable by the people and jobs that load the model, whatever the umask


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
