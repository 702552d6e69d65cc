"""Training checkpoints: full state in output_dir/checkpoint-<step>, saved atomically, verified, rotated, found again.

Saving: every rank writes into a hidden staging directory (`accelerator.save_state`: model, optimizer and RNG
states, under any ZeRO stage); the main process adds the state this project owns as JSON (position, data order,
LR schedule, training config, the train data's fingerprint), then a manifest (size and sha256 of every file), writes
the COMPLETE marker last and renames the directory into place. A crash mid-save leaves only a staging directory
(removed by the next save) or a directory without the marker, which is never resumed from. A full disk stops the
run with EXIT_NO_SPACE and removes the partial save.

Resuming never runs code from a checkpoint (rm/safe_checkpoint.py): it is used only when its manifest matches
every file and every file that is unpickled loads restricted to plain data; DeepSpeed's own loads run restricted
the same way. `latest` skips a damaged checkpoint (with a warning naming the file) for the one
before; a checkpoint that holds anything but plain data is refused. Assumes output_dir is one file system seen by
every node, as multi-node ZeRO checkpoints need anyway.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import json
import os
import re
import shutil
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator

from rm.config import RECIPES, ConfigError, TrainConfig
from rm.data import data_files, is_hub_data_set, train_location
from rm.guards import TrainingStopped, resume_command
from rm.outputs import CHECKPOINT_PREFIX as PREFIX
from rm.outputs import (COMPLETE_MARKER, DATA_ORDER, SCHEDULER_STATE, STAGING_PREFIX, TRAIN_DATA, write_json,
                        written_by_others)
from rm.outputs import TRAINER_STATE as POSITION_FILE
from rm.outputs import TRAINING_CONFIG as CONFIG_FILE
from rm.runtime import check_output_dir, warn
from rm.safe_checkpoint import (CheckpointError, DamagedCheckpointError, restricted_deepspeed_loads, sha256_of,
                                verify_checkpoint, write_manifest)

# Settings that may change between a run and its resume: they do not change what is trained.
RESUMABLE_CHANGES = {"output_dir", "resume_from_checkpoint", "overwrite_output_dir", "cache_dir", "report_to",
                     "logging_steps", "eval_steps", "save_steps", "save_total_limit",  # output_dir: may be moved
                     "allow_changed_data"}
RNG_FILE = re.compile(r"random_states_(\d+)\.pkl")  # accelerate's, one per process
SPACE_MARGIN = 1 << 20  # bytes: less free space than this after a failed save means the disk filled up
EXIT_NO_SPACE = 5  # after 3 (interrupted) and 4 (non-finite step) of rm/guards.py


class DiskFullError(TrainingStopped):
    """No space left while saving a checkpoint: the partial save is removed, the earlier checkpoints stay."""

    exit_code = EXIT_NO_SPACE


@dataclass
class Position:
    """Where training stands: optimizer steps done, the epoch, micro-batches of that epoch consumed, the metrics
    history so far, and the shuffling generator's state at the start of that epoch."""

    global_step: int = 0
    epoch: int = 0
    micro_batches_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_generator_state: torch.Tensor | None = None



# ---------------------------------------------------------------------------------------------- finding them
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


def later_checkpoints(output_dir: str, step: int) -> list[str]:
    """The complete checkpoints in output_dir past `step`: the course a run took after it, which a resume from
    `step` abandons."""
    return [path for path in complete_checkpoints(output_dir) if step_of(os.path.basename(path)) > step]


def latest_checkpoint(output_dir: str) -> str | None:
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _check_settings(checkpoint: str, cfg: TrainConfig) -> None:
    """A checkpoint saved with other settings is another run's: refused whatever its state (its config may be
    unreadable: verify_checkpoint then names that file)."""
    try:
        saved = _read_json(checkpoint, CONFIG_FILE)
    except CheckpointError:
        return
    differences = _config_differences(saved, cfg)
    if differences:
        raise ConfigError(f"--resume_from_checkpoint {checkpoint!r} was saved by a run with other settings ("
                          + "; ".join(differences) + "); resume with the original settings")


def _choose_checkpoint(cfg: TrainConfig) -> str:
    """The checkpoint to resume from, its settings checked and its files verified. `latest`: the newest complete
    one that is not damaged (each damaged one skipped with a warning naming the file)."""
    if cfg.resume_from_checkpoint != "latest":
        checkpoint = cfg.resume_from_checkpoint
        if not os.path.isdir(checkpoint):
            raise ConfigError(f"--resume_from_checkpoint {checkpoint!r}: no such directory")
        if not is_complete(checkpoint):
            raise ConfigError(f"--resume_from_checkpoint {checkpoint!r}: incomplete checkpoint (no {COMPLETE_MARKER} "
                              "marker: its save was interrupted); resume from an earlier one or from 'latest'")
        _check_settings(checkpoint, cfg)
        _check_output_dir_holds_this_run(cfg)
        try:
            verify_checkpoint(checkpoint)
        except DamagedCheckpointError as err:
            raise DamagedCheckpointError(f"--resume_from_checkpoint {checkpoint!r}: {err}; resume from an earlier "
                                         "checkpoint or from 'latest'") from None
        later = later_checkpoints(cfg.output_dir, _read_json(checkpoint, COMPLETE_MARKER)["global_step"])
        if later and not cfg.overwrite_output_dir:
            raise ConfigError(f"--resume_from_checkpoint {checkpoint!r}: output_dir {cfg.output_dir!r} holds later "
                              f"checkpoints ({', '.join(os.path.basename(c) for c in later)}); the resumed run's "
                              "saves would mix with them (`latest` and --save_total_limit go by step). Pass "
                              "--overwrite_output_dir true to remove them, or resume into another output_dir")
        return checkpoint
    candidates = complete_checkpoints(cfg.output_dir)
    if not candidates:
        raise ConfigError(f"--resume_from_checkpoint latest: no complete checkpoint in output_dir {cfg.output_dir!r} "
                          "(a run stopped before its first checkpoint: start it again with --overwrite_output_dir "
                          "true)")
    skipped = []
    for checkpoint in reversed(candidates):
        _check_settings(checkpoint, cfg)
        try:
            verify_checkpoint(checkpoint)
        except DamagedCheckpointError as err:
            warn(f"skipping damaged checkpoint {checkpoint}: {err}")
            skipped.append(os.path.basename(checkpoint))
            continue
        return checkpoint
    raise ConfigError(f"--resume_from_checkpoint latest: no usable checkpoint in output_dir {cfg.output_dir!r} "
                      f"({', '.join(skipped)} damaged, see the warnings above)")


def _check_output_dir_holds_this_run(cfg: TrainConfig) -> None:
    holds_this_run = any(_is_this_run(path, cfg) for path in complete_checkpoints(cfg.output_dir))
    if written_by_others(cfg.output_dir) and not holds_this_run:
        raise ConfigError(f"output_dir {cfg.output_dir!r} holds another run (no checkpoint with these settings); "
                          "resume into an empty output_dir or the run's own")


def agreed_checkpoint(accelerator: Accelerator, checkpoint: str | None) -> str | None:
    """Every rank chose the checkpoint to resume from on its own, before the processes could talk. A rank that saw
    the file system otherwise (a stale network file system cache, a read error that made a checkpoint look damaged
    there) would resume from another one, silently: refused, naming each rank's choice."""
    from accelerate.utils import gather_object

    chosen = gather_object([checkpoint])
    if len(set(chosen)) > 1:
        raise ConfigError("the processes chose different checkpoints to resume from (" +
                          ", ".join(f"rank {rank}: {path}" for rank, path in enumerate(chosen)) +
                          "): every node must see the same output_dir; name the checkpoint with "
                          "--resume_from_checkpoint PATH")
    return checkpoint


# ---------------------------------------------------------------------------------------------- the train data
_STARTED_WITH: dict[str, Callable[[], dict[str, Any]]] = {}  # output_dir -> the train data's fingerprint at the start
_HASHING: dict[tuple, Future] = {}  # (path, size, mtime, inode) -> its sha256, within one run (prepare_output_dir
# clears it): the resume check, the token cache key and each checkpoint wait for one hash of each data file


def _sha256_soon(path: Path) -> Future:
    """The file's sha256, computed in a thread (hashlib releases the GIL: a 1 GB file costs ~1 s, spent while the
    run goes on to load its tokenizer)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _HASHING:
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(sha256_of(str(path)))
            except BaseException as err:  # noqa: BLE001  (raised where the hash is asked for)
                future.set_exception(err)

        threading.Thread(target=run, name="rm-sha256", daemon=True).start()
        _HASHING[key] = future
    return _HASHING[key]


def _fingerprint_soon(location: str) -> Callable[[], dict[str, Any]]:
    """train_data_fingerprint, started now (every file's hash in a thread) and waited for when called."""
    if is_hub_data_set(location):
        return lambda: {"location": location, "files": None}
    base = Path(train_location(location))  # the embedded sample, from any directory
    name = (lambda p: p.name) if base.is_file() else (lambda p: p.relative_to(base).as_posix())  # noqa: E731
    files = [(name(p), p.stat().st_size, _sha256_soon(p)) for p in data_files(str(base))]
    return lambda: {"location": location,
                    "files": {rel: {"size": size, "sha256": sha.result()} for rel, size, sha in files}}


def train_data_fingerprint(location: str) -> dict[str, Any]:
    """Size and sha256 of every data file the reader takes from `location` (a hub dataset: its name only)."""
    return _fingerprint_soon(location)()


def _data_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    before, after = saved.get("files") or {}, now.get("files") or {}
    return ([f"{rel}: added" for rel in sorted(set(after) - set(before))]
            + [f"{rel}: removed" for rel in sorted(set(before) - set(after))]
            + [f"{rel}: content changed" for rel in sorted(set(before) & set(after)) if before[rel] != after[rel]])


def _check_train_data(checkpoint: str, cfg: TrainConfig, now: dict[str, Any]) -> None:
    saved = _read_json(checkpoint, TRAIN_DATA)
    changes = _data_changes(saved, now)
    if not changes:
        return
    summary = f"{'; '.join(changes[:5])}{'; ...' if len(changes) > 5 else ''}"
    if not cfg.allow_changed_data:
        raise CheckpointError(f"the train data at {cfg.train_file_dir} changed since {checkpoint} was saved "
                              f"({summary}): the run cannot continue exactly. Restore the data, or pass "
                              "--allow_changed_data true to continue on the new data")
    warn(f"continuing on changed train data at {cfg.train_file_dir} ({summary}); --allow_changed_data is set")


# ---------------------------------------------------------------------------------------------- the output_dir
def _read_json(checkpoint: str, name: str) -> Any:
    path = os.path.join(checkpoint, name)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is missing or unreadable ({err})") from None


# a checkpoint saved before recipes existed trained with the original one: its missing keys mean these values
BEFORE_RECIPES = {"recipe": "original", **RECIPES["original"]}


def _config_differences(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    saved, current = {**BEFORE_RECIPES, **saved}, dataclasses.asdict(cfg)
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in sorted(set(saved) | set(current))
            if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)]


def _is_this_run(checkpoint: str, cfg: TrainConfig) -> bool:
    try:
        return not _config_differences(_read_json(checkpoint, CONFIG_FILE), cfg)
    except CheckpointError:
        return False


def prepare_output_dir(cfg: TrainConfig) -> str | None:
    """Checks output_dir (and the checkpoint to resume from) before anything is written; returns that checkpoint,
    verified (None: a fresh run).

    A fresh run needs an empty output_dir, or --overwrite_output_dir (remove_previous_run, later). A
    resume accepts an output_dir only when it holds this run: its checkpoints' saved training config equals this
    one, up to RESUMABLE_CHANGES; and the train data must be the data the checkpoint was trained on."""
    key = os.path.realpath(cfg.output_dir)
    _HASHING.clear()  # a new run hashes the data anew
    if not cfg.resume_from_checkpoint:
        latest = latest_checkpoint(cfg.output_dir)
        if latest and not cfg.overwrite_output_dir:
            raise ConfigError(f"output_dir {cfg.output_dir!r} holds checkpoints of a run (newest: "
                              f"{os.path.basename(latest)}); pass --resume_from_checkpoint latest to continue it, "
                              "or --overwrite_output_dir true to replace that run, or choose another output_dir")
        check_output_dir(cfg)
        _STARTED_WITH[key] = _fingerprint_soon(cfg.train_file_dir)
        return None
    checkpoint = _choose_checkpoint(cfg)
    _STARTED_WITH[key] = _fingerprint_soon(cfg.train_file_dir)
    _check_train_data(checkpoint, cfg, _STARTED_WITH[key]())
    return checkpoint


# ---------------------------------------------------------------------------------------------- saving
def is_out_of_space(err: BaseException, folder: str) -> bool:
    """A failed write ran out of space: ENOSPC/EDQUOT somewhere in the exception chain (safetensors and torch wrap
    it in their own errors, torch's zip writer without any errno), or the file system is full now."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < SPACE_MARGIN


def out_of_space_error(action: str, output_dir: str) -> DiskFullError:
    """The plain words for a full disk: what was being written, and what is left to resume from."""
    earlier = latest_checkpoint(output_dir)
    then = (f"the earlier checkpoints are kept (newest: {os.path.basename(earlier)}). Free space, then resume with: "
            f"{resume_command()}") if earlier else "no checkpoint was saved yet. Free space and run again"
    return DiskFullError(f"no space left on device while {action}; the partial save was removed, {then}")


def save_checkpoint(accelerator: Accelerator, cfg: TrainConfig, position: Position, scheduler: Any) -> str:
    """Collective (every rank calls it): saves the full training state as output_dir/checkpoint-<step>. A full disk
    raises DiskFullError (EXIT_NO_SPACE) after removing the partial save; the earlier checkpoints stay."""
    name = f"{PREFIX}{position.global_step}"
    final = os.path.join(cfg.output_dir, name)
    staging = os.path.join(cfg.output_dir, STAGING_PREFIX + name)
    try:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(staging)
        accelerator.wait_for_everyone()  # every rank's shards are on disk before the marker says so
        if accelerator.is_main_process:
            _write_own_state(staging, cfg, position, scheduler)
            write_manifest(staging)
            write_json(os.path.join(staging, COMPLETE_MARKER), {"global_step": position.global_step})
            if os.path.exists(final):  # an older save of this step (a resume from an earlier checkpoint): replace
                shutil.rmtree(final)
            os.rename(staging, final)
            rotate_checkpoints(cfg.output_dir, cfg.save_total_limit)
    except Exception as err:
        full = is_out_of_space(err, cfg.output_dir)
        shutil.rmtree(staging, ignore_errors=True)
        if full:
            raise out_of_space_error(f"saving {name} to {cfg.output_dir}", cfg.output_dir) from err
        raise
    accelerator.wait_for_everyone()
    return final


def _write_own_state(folder: str, cfg: TrainConfig, position: Position, scheduler: Any) -> None:
    state = {k: v for k, v in dataclasses.asdict(position).items() if k != "epoch_generator_state"}
    write_json(os.path.join(folder, POSITION_FILE), state)
    generator = position.epoch_generator_state
    write_json(os.path.join(folder, DATA_ORDER), {"epoch_generator_state": None if generator is None else
                                                  base64.b64encode(generator.numpy().tobytes()).decode()})
    write_json(os.path.join(folder, SCHEDULER_STATE), scheduler.state_dict())
    write_json(os.path.join(folder, CONFIG_FILE), dataclasses.asdict(cfg))
    started = _STARTED_WITH.get(os.path.realpath(cfg.output_dir))
    write_json(os.path.join(folder, TRAIN_DATA), started() if started else train_data_fingerprint(cfg.train_file_dir))


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


# ---------------------------------------------------------------------------------------------- loading
def _position(checkpoint: str) -> Position:
    state = _read_json(checkpoint, POSITION_FILE)
    order = _read_json(checkpoint, DATA_ORDER)
    try:
        position = Position(**state)
        encoded = order["epoch_generator_state"]
        if encoded is not None:
            position.epoch_generator_state = torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8)
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{checkpoint}: {POSITION_FILE} or {DATA_ORDER} does not hold a training position "
                              f"({err})") from None
    return position


def load_checkpoint(accelerator: Accelerator, checkpoint: str, scheduler: Any) -> Position:
    """Collective: restores model, optimizer, RNG and the LR schedule; returns the saved position. A checkpoint of
    another number of processes is refused: its RNG and data order cannot be restored exactly."""
    saved = sorted(int(m.group(1)) for m in map(RNG_FILE.fullmatch, os.listdir(checkpoint)) if m)
    if saved != list(range(accelerator.num_processes)):
        raise CheckpointError(f"{checkpoint} holds the RNG states of processes {saved}; this run has "
                              f"{accelerator.num_processes} process(es): resume with the number of processes that "
                              "saved it")
    with restricted_deepspeed_loads(accelerator):
        accelerator.load_state(checkpoint)
    try:
        scheduler.load_state_dict(_read_json(checkpoint, SCHEDULER_STATE))
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{os.path.join(checkpoint, SCHEDULER_STATE)} is not an LR schedule state "
                              f"({err})") from None
    return _position(checkpoint)
