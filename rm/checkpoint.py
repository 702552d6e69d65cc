"""Training checkpoints: full state in output_dir/checkpoint-<step>, saved atomically, rotated, found again.

A checkpoint is written into a hidden staging directory by every rank (`accelerator.save_state`: model, optimizer,
registered scheduler, RNG, under any ZeRO stage), then the main process adds the data position and the training
config, writes the COMPLETE marker last and renames the directory into place. A crash mid-save leaves only a
staging directory (removed by the next save) or a directory without the marker, which is never resumed from.
Assumes output_dir is one file system seen by every node, as multi-node ZeRO checkpoints need anyway.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from rm.config import ConfigError, TrainConfig
from rm.outputs import CHECKPOINT_PREFIX as PREFIX
from rm.outputs import COMPLETE_MARKER, STAGING_PREFIX, write_json
from rm.outputs import DATA_ORDER as DATA_ORDER_FILE
from rm.outputs import TRAINER_STATE as POSITION_FILE
from rm.outputs import TRAINING_CONFIG as CONFIG_FILE
from rm.runtime import check_output_dir

# Settings that may change between a run and its resume: they do not change what is trained.
RESUMABLE_CHANGES = {"output_dir", "resume_from_checkpoint", "overwrite_output_dir", "cache_dir", "report_to",
                     "logging_steps", "eval_steps", "save_steps", "save_total_limit"}  # output_dir: may be moved


@dataclass
class Position:
    """Where training stands: optimizer steps done, the epoch, micro-batches of that epoch consumed, the metrics
    history so far, and the shuffling generator's state at the start of that epoch."""

    global_step: int = 0
    epoch: int = 0
    micro_batches_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_generator_state: torch.Tensor | None = None

    @classmethod
    def after_step(cls, global_step: int, epoch: int, micro_batches: int, epoch_length: int,
                   history: list[dict[str, Any]], epoch_generator_state: torch.Tensor,
                   generator: torch.Generator) -> "Position":
        """The position after an optimizer step; at the end of an epoch, the start of the next one (whose shuffle
        continues from the generator's state now, as an uninterrupted run's does)."""
        if micro_batches >= epoch_length:
            return cls(global_step, epoch + 1, 0, list(history), generator.get_state())
        return cls(global_step, epoch, micro_batches, list(history), epoch_generator_state)


def step_of(name: str) -> int | None:
    match = re.fullmatch(re.escape(PREFIX) + r"(\d+)", name)
    return int(match.group(1)) if match else None


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def complete_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoint directories in output_dir, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(step_of(name), os.path.join(output_dir, name)) for name in os.listdir(output_dir)]
    return [path for step, path in sorted(found, key=lambda item: item[0] or 0)
            if step is not None and is_complete(path)]


def latest_checkpoint(output_dir: str) -> str | None:
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _config_differences(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    current = dataclasses.asdict(cfg)
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in sorted(set(saved) | set(current))
            if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)]


def _saved_config(checkpoint: str) -> dict[str, Any]:
    with open(os.path.join(checkpoint, CONFIG_FILE), encoding="utf-8") as f:
        return json.load(f)


def prepare_output_dir(cfg: TrainConfig) -> str | None:
    """Checks output_dir before anything is written; returns the checkpoint to resume from (None: a fresh run).

    A fresh run needs an empty output_dir (or --overwrite_output_dir). A resume accepts an output_dir only when it
    holds this run: its checkpoints' saved training config equals this one, up to RESUMABLE_CHANGES."""
    if not cfg.resume_from_checkpoint:
        latest = latest_checkpoint(cfg.output_dir)
        if latest and not cfg.overwrite_output_dir:
            raise ConfigError(f"output_dir {cfg.output_dir!r} holds checkpoints of a run (newest: "
                              f"{os.path.basename(latest)}); pass --resume_from_checkpoint latest to continue it, "
                              "or choose another output_dir")
        check_output_dir(cfg)
        return None
    if cfg.resume_from_checkpoint == "latest":
        checkpoint = latest_checkpoint(cfg.output_dir)
        if checkpoint is None:
            raise ConfigError(f"--resume_from_checkpoint latest: no complete checkpoint in output_dir "
                              f"{cfg.output_dir!r}")
    else:
        checkpoint = cfg.resume_from_checkpoint
        if not os.path.isdir(checkpoint):
            raise ConfigError(f"--resume_from_checkpoint {checkpoint!r}: no such directory")
        if not is_complete(checkpoint):
            raise ConfigError(f"--resume_from_checkpoint {checkpoint!r}: incomplete checkpoint (no {COMPLETE_MARKER} "
                              "marker: its save was interrupted); resume from an earlier one or from 'latest'")
    differences = _config_differences(_saved_config(checkpoint), cfg)
    if differences:
        raise ConfigError(f"--resume_from_checkpoint {checkpoint!r} was saved by a run with other settings ("
                          + "; ".join(differences) + "); resume with the original settings")
    others = [name for name in os.listdir(cfg.output_dir)] if os.path.isdir(cfg.output_dir) else []
    own = complete_checkpoints(cfg.output_dir)
    if others and not any(not _config_differences(_saved_config(path), cfg) for path in own):
        raise ConfigError(f"output_dir {cfg.output_dir!r} holds another run (no checkpoint with these settings); "
                          "resume into an empty output_dir or the run's own")
    return checkpoint


def save_checkpoint(accelerator: Accelerator, cfg: TrainConfig, position: Position) -> str:
    """Collective (every rank calls it): saves the full training state as output_dir/checkpoint-<step>."""
    name = f"{PREFIX}{position.global_step}"
    final = os.path.join(cfg.output_dir, name)
    staging = os.path.join(cfg.output_dir, STAGING_PREFIX + name)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)
    accelerator.wait_for_everyone()  # every rank's shards are on disk before the marker says so
    if accelerator.is_main_process:
        state = {k: v for k, v in dataclasses.asdict(position).items() if k != "epoch_generator_state"}
        write_json(os.path.join(staging, POSITION_FILE), state)
        torch.save({"epoch_generator_state": position.epoch_generator_state}, os.path.join(staging, DATA_ORDER_FILE))
        write_json(os.path.join(staging, CONFIG_FILE), dataclasses.asdict(cfg))
        write_json(os.path.join(staging, COMPLETE_MARKER), {"global_step": position.global_step})
        if os.path.exists(final):  # an older save of this step (a resume from an earlier checkpoint): replace it
            shutil.rmtree(final)
        os.rename(staging, final)
        rotate_checkpoints(cfg.output_dir, cfg.save_total_limit)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(output_dir: str, total_limit: int) -> list[str]:
    """Keeps the newest `total_limit` complete checkpoints (0 = all); removes older ones, incomplete checkpoint
    directories and leftover staging directories. Returns what was removed."""
    complete = complete_checkpoints(output_dir)
    removed = complete[:-total_limit] if total_limit > 0 and len(complete) > total_limit else []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(STAGING_PREFIX) or (step_of(name) is not None and not is_complete(path)):
            removed.append(path)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def load_checkpoint(accelerator: Accelerator, checkpoint: str) -> Position:
    """Collective: restores model, optimizer, registered scheduler and RNG; returns the saved position."""
    accelerator.load_state(checkpoint)
    with open(os.path.join(checkpoint, POSITION_FILE), encoding="utf-8") as f:
        position = Position(**json.load(f))
    saved = torch.load(os.path.join(checkpoint, DATA_ORDER_FILE), weights_only=True)
    position.epoch_generator_state = saved["epoch_generator_state"]
    return position
