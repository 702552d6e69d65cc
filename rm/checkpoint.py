"""Training checkpoints: full state in output_dir/checkpoint-<step>, saved atomically, verified, rotated, found again;
and the output_dir itself: one run at a time (a lock), an old run's outputs removed on --overwrite_output_dir.

Saving: every rank writes into a hidden staging directory (`accelerator.save_state`: model, optimizer and RNG
states, under any ZeRO stage); the main process adds the state this project owns as JSON (position, data order,
LR schedule, training config, the train data's fingerprint), then a manifest (size and sha256 of every file), writes
the COMPLETE marker last and renames the directory into place. A crash mid-save leaves only a staging directory
(removed by the next save) or a directory without the marker, which is never resumed from. A full disk stops the
run with EXIT_NO_SPACE and removes the partial save.

Resuming never runs code from a checkpoint: it is used only when its manifest matches every file and every file
that is unpickled at resume loads with torch.load(weights_only=True) and allowed_globals() (the numpy types of the
RNG states, three DeepSpeed types of its optimizer states, measured on ZeRO-1/2/3 checkpoints); DeepSpeed's own loads
run restricted the same way. `latest` skips a damaged checkpoint (with a warning naming the file) for the one
before; a checkpoint that holds anything but plain data is refused. Assumes output_dir is one file system seen by
every node, as multi-node ZeRO checkpoints need anyway.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator

from rm.config import ConfigError, TrainConfig
from rm.data import data_files, is_hub_name
from rm.guards import TrainingStopped, resume_command
from rm.outputs import CHECKPOINT_PREFIX as PREFIX
from rm.outputs import (COMPLETE_MARKER, DATA_ORDER, DIR_MODE, MANIFEST, RUN_LOCK, RUN_OUTPUTS, SCHEDULER_STATE,
                        STAGING_PREFIX, TRAIN_DATA, check_writable, write_json)
from rm.outputs import TRAINER_STATE as POSITION_FILE
from rm.outputs import TRAINING_CONFIG as CONFIG_FILE
from rm.runtime import check_output_dir

# Settings that may change between a run and its resume: they do not change what is trained.
RESUMABLE_CHANGES = {"output_dir", "resume_from_checkpoint", "overwrite_output_dir", "cache_dir", "report_to",
                     "logging_steps", "eval_steps", "save_steps", "save_total_limit",  # output_dir: may be moved
                     "allow_changed_data"}
# Files of a checkpoint that nothing unpickles at resume: JSON, safetensors, DeepSpeed's `latest` tag (text) and
# its zero_to_fp32.py helper scripts (never run). Every other file must pass the restricted load.
NOT_PICKLED_SUFFIXES = (".json", ".safetensors", ".py")
NOT_PICKLED_NAMES = {"latest", COMPLETE_MARKER}
RNG_FILE = re.compile(r"random_states_(\d+)\.pkl")  # accelerate's, one per process
SPACE_MARGIN = 1 << 20  # bytes: less free space than this after a failed save means the disk filled up
EXIT_NO_SPACE = 5  # after 3 (interrupted) and 4 (non-finite step) of rm/guards.py


class CheckpointError(ConfigError):
    """A checkpoint cannot be restored exactly; the message names the file. Exit code 2, like every refusal."""


class DamagedCheckpointError(CheckpointError):
    """Its files differ from its manifest (truncated, changed, missing, added) or it has no manifest."""


class UnsafeCheckpointError(CheckpointError):
    """A file would need more than plain tensors and numbers to unpickle: refused, never skipped over."""


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



def _warn(message: str) -> None:
    """Before the Accelerator exists every rank runs the same checks; the global rank 0 says what it found."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- one run per dir
def _process_start(pid: int) -> str | None:
    """Boot id and start time (clock ticks) of a process on this host: a pid reused by another process, or a pid
    from before a reboot, gives another value. None where /proc cannot tell."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return None


def _holder_is_running(holder: dict[str, Any]) -> bool | None:
    """True/False for a lock taken on this host; None when it was taken on another host (cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    started = _process_start(pid)
    return started is None or holder.get("process_start") in (None, started)


def _describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')} "
            f"({holder.get('command', '?')})")


def _take_lock(lock: str) -> dict[str, Any]:
    """Creates the lock file atomically (a complete temporary file hard-linked into place: never seen half
    written) and returns what it holds; takes over a stale one; raises ConfigError when a live run holds it."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:300]}
    folder = os.path.dirname(lock)
    for _ in range(3):  # a stale lock removed, then a race lost to another starting run: read its lock again
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as f:
                json.dump(me, f)
            os.chmod(temporary, 0o644)
            os.link(temporary, lock)
            return me
        except FileExistsError:
            pass
        finally:
            os.unlink(temporary)
        try:
            identity = os.stat(lock).st_ino
            with open(lock, encoding="utf-8") as f:
                holder = json.load(f)
        except FileNotFoundError:
            continue  # released meanwhile
        except (OSError, ValueError):
            holder = {}
        if not isinstance(holder, dict) or not holder:
            raise ConfigError(f"output_dir {folder!r} has an unreadable lock {lock}: if no run writes there, "
                              "delete it")
        running = _holder_is_running(holder)
        if running is None:
            raise ConfigError(f"output_dir {folder!r} is locked by {_describe(holder)}: a run on another host, which "
                              f"cannot be checked from here; if no run writes there, delete {lock}")
        if running:
            raise ConfigError(f"output_dir {folder!r} is in use by another run: {_describe(holder)}; wait for it "
                              "to finish or choose another output_dir")
        _warn(f"output_dir {folder!r} was locked by a run that is no longer running ({_describe(holder)}); "
              f"taking over its lock {lock}")
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == identity:
                os.unlink(lock)
    raise ConfigError(f"output_dir {folder!r}: could not take the lock {lock} (other runs keep starting there)")


@contextlib.contextmanager
def hold_output_dir(cfg: TrainConfig) -> Iterator[None]:
    """One run per output_dir: the global rank 0 holds output_dir/run.lock (pid, host, start time) while the run
    lasts; a second run into it stops at once naming the holder; the lock of a run that died on this host is taken
    over with a warning. An output_dir created here and left empty is removed again."""
    if os.environ.get("RANK", "0") != "0":  # the other ranks of this run work under rank 0's lock
        yield
        return
    check_writable(cfg.output_dir)
    created = not os.path.isdir(cfg.output_dir)
    lock = os.path.join(cfg.output_dir, RUN_LOCK)
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
        if created:
            os.chmod(cfg.output_dir, DIR_MODE)  # the exported model inside is for others to read (rm/export.py)
        me = _take_lock(lock)
    except OSError as err:
        raise ConfigError(f"output_dir {cfg.output_dir!r}: cannot create it or write there ({err})") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            with open(lock, encoding="utf-8") as f:
                still_mine = json.load(f) == me
            if still_mine:
                os.unlink(lock)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(cfg.output_dir)  # only when empty: nothing else was written


def remove_previous_run(output_dir: str) -> None:
    """--overwrite_output_dir, called just before the first write (after the data and model are checked, so bad
    input never costs the old run): the previous run's outputs go (its checkpoints above all: rotation and `latest`
    must never mix two runs); files this trainer does not write stay."""
    if os.environ.get("RANK", "0") != "0" or not os.path.isdir(output_dir):
        return
    removed = sorted(name for name in os.listdir(output_dir)
                     if name in RUN_OUTPUTS or step_of(name) is not None or name.startswith(STAGING_PREFIX))
    for name in removed:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    if removed:
        _warn(f"--overwrite_output_dir: removed the previous run's outputs from {output_dir}: {', '.join(removed)}")


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


def latest_checkpoint(output_dir: str) -> str | None:
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


# ---------------------------------------------------------------------------------------------- verifying them
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_of(folder: str) -> list[str]:
    """Every file under folder, as sorted relative posix paths."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        found += [Path(root, name).relative_to(folder).as_posix() for name in sorted(names)]
    return found


def write_manifest(folder: str) -> None:
    """manifest.json: the size and sha256 of every file of the checkpoint (all but itself and the marker)."""
    files = {rel: {"size": os.path.getsize(os.path.join(folder, rel)), "sha256": _sha256(os.path.join(folder, rel))}
             for rel in _files_of(folder) if rel not in (MANIFEST, COMPLETE_MARKER)}
    write_json(os.path.join(folder, MANIFEST), {"files": files})


@functools.lru_cache(maxsize=None)
def allowed_globals() -> tuple[Any, ...]:
    """What a checkpoint's pickles may name besides torch's own tensor types: numpy's array and uint32 dtype and
    codecs.encode (accelerate's RNG states) and, when DeepSpeed is installed, its loss scaler, ZeRO stage enum and
    fragment address (its optimizer states, ZeRO-1/2/3, fp32 and bf16)."""
    import codecs

    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list[Any] = [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), codecs.encode]
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return tuple(allowed)
    return tuple(allowed + [LossScaler, ZeroStageEnum, fragment_address])


def restricted_load(path: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load with weights_only=True and only allowed_globals() beyond torch's tensor types."""
    with torch.serialization.safe_globals(list(allowed_globals())):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def _refusal_reason(err: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    named = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if named:
        return f"it names {named.group(1)}, which is not a tensor or plain data type"
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _check_manifest(checkpoint: str) -> list[str]:
    """Raises DamagedCheckpointError naming the first file that differs from the manifest; returns the files."""
    manifest_path = os.path.join(checkpoint, MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            listed = json.load(f)["files"]
        sizes = {rel: int(entry["size"]) for rel, entry in listed.items()}
    except FileNotFoundError:
        raise DamagedCheckpointError(f"{manifest_path} is missing: the checkpoint cannot be verified (saved by an "
                                     "older version of this trainer, or damaged)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DamagedCheckpointError(f"{manifest_path} is unreadable ({err})") from None
    present = [rel for rel in _files_of(checkpoint) if rel not in (MANIFEST, COMPLETE_MARKER)]
    added = sorted(set(present) - set(listed))
    if added:
        raise DamagedCheckpointError(f"{os.path.join(checkpoint, added[0])} was not part of the saved checkpoint")
    for rel, entry in listed.items():
        path = os.path.join(checkpoint, rel)
        if rel not in present:
            raise DamagedCheckpointError(f"{path} is missing")
        size = os.path.getsize(path)
        if size != sizes[rel]:
            raise DamagedCheckpointError(f"{path} has {size} bytes, {sizes[rel]} bytes when saved (truncated or "
                                         "changed)")
        if _sha256(path) != entry.get("sha256"):
            raise DamagedCheckpointError(f"{path} changed since it was saved (its sha256 differs)")
    return present


def verify_checkpoint(checkpoint: str) -> None:
    """Raises DamagedCheckpointError (manifest) or UnsafeCheckpointError (a pickle beyond plain data), each naming
    the file. Nothing is executed: pickles are read with restricted_load, memory-mapped (tensors not read)."""
    if not is_complete(checkpoint):
        raise DamagedCheckpointError(f"{checkpoint} is an incomplete checkpoint (no {COMPLETE_MARKER} marker: its "
                                     "save was interrupted)")
    for rel in _check_manifest(checkpoint):
        if rel.endswith(NOT_PICKLED_SUFFIXES) or os.path.basename(rel) in NOT_PICKLED_NAMES:
            continue
        path = os.path.join(checkpoint, rel)
        try:
            restricted_load(path, mmap=zipfile.is_zipfile(path))
        except Exception as err:  # noqa: BLE001  (whatever the unpickler objects to, the file is refused)
            raise UnsafeCheckpointError(
                f"{path} refused: it does not load as plain tensors and numbers with torch.load(weights_only=True) "
                f"({_refusal_reason(err)}); nothing from this checkpoint was loaded") from None


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
        return checkpoint
    candidates = complete_checkpoints(cfg.output_dir)
    if not candidates:
        raise ConfigError(f"--resume_from_checkpoint latest: no complete checkpoint in output_dir {cfg.output_dir!r}")
    skipped = []
    for checkpoint in reversed(candidates):
        _check_settings(checkpoint, cfg)
        try:
            verify_checkpoint(checkpoint)
        except DamagedCheckpointError as err:
            _warn(f"skipping damaged checkpoint {checkpoint}: {err}")
            skipped.append(os.path.basename(checkpoint))
            continue
        return checkpoint
    raise ConfigError(f"--resume_from_checkpoint latest: no usable checkpoint in output_dir {cfg.output_dir!r} "
                      f"({', '.join(skipped)} damaged, see the warnings above)")


def _check_output_dir_holds_this_run(cfg: TrainConfig) -> None:
    others = [name for name in os.listdir(cfg.output_dir) if name != RUN_LOCK] if os.path.isdir(cfg.output_dir) \
        else []
    if others and not any(_is_this_run(path, cfg) for path in complete_checkpoints(cfg.output_dir)):
        raise ConfigError(f"output_dir {cfg.output_dir!r} holds another run (no checkpoint with these settings); "
                          "resume into an empty output_dir or the run's own")


# ---------------------------------------------------------------------------------------------- the train data
_STARTED_WITH: dict[str, dict[str, Any]] = {}  # output_dir -> the train data's fingerprint when this run started


def train_data_fingerprint(location: str) -> dict[str, Any]:
    """Size and sha256 of every data file the reader takes from `location` (a hub dataset: its name only)."""
    if is_hub_name(location):
        return {"location": location, "files": None}
    base = Path(location)
    name = (lambda p: p.name) if base.is_file() else (lambda p: p.relative_to(base).as_posix())  # noqa: E731
    return {"location": location, "files": {name(p): {"size": p.stat().st_size, "sha256": _sha256(str(p))}
                                            for p in data_files(location)}}


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
    _warn(f"continuing on changed train data at {cfg.train_file_dir} ({summary}); --allow_changed_data is set")


# ---------------------------------------------------------------------------------------------- the output_dir
def _read_json(checkpoint: str, name: str) -> Any:
    path = os.path.join(checkpoint, name)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is missing or unreadable ({err})") from None


def _config_differences(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    current = dataclasses.asdict(cfg)
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
    if not cfg.resume_from_checkpoint:
        latest = latest_checkpoint(cfg.output_dir)
        if latest and not cfg.overwrite_output_dir:
            raise ConfigError(f"output_dir {cfg.output_dir!r} holds checkpoints of a run (newest: "
                              f"{os.path.basename(latest)}); pass --resume_from_checkpoint latest to continue it, "
                              "or --overwrite_output_dir true to replace that run, or choose another output_dir")
        check_output_dir(cfg)
        _STARTED_WITH[key] = train_data_fingerprint(cfg.train_file_dir)
        return None
    checkpoint = _choose_checkpoint(cfg)
    _STARTED_WITH[key] = train_data_fingerprint(cfg.train_file_dir)
    _check_train_data(checkpoint, cfg, _STARTED_WITH[key])
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
    key = os.path.realpath(cfg.output_dir)
    write_json(os.path.join(folder, TRAIN_DATA), _STARTED_WITH.get(key) or train_data_fingerprint(cfg.train_file_dir))


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
@contextlib.contextmanager
def _restricted_deepspeed_loads(accelerator: Accelerator) -> Iterator[None]:
    """DeepSpeed's torch checkpoint engine unpickles with weights_only=False; while loading, it uses
    restricted_load instead (the files were verified with it already: this closes the gap between the two reads)."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    engine = wrapped.engine.checkpoint_engine if wrapped is not None else None
    if engine is None:
        yield
        return
    engine.load = lambda path, map_location=None: restricted_load(path, map_location)
    try:
        yield
    finally:
        del engine.load


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
    with _restricted_deepspeed_loads(accelerator):
        accelerator.load_state(checkpoint)
    try:
        scheduler.load_state_dict(_read_json(checkpoint, SCHEDULER_STATE))
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{os.path.join(checkpoint, SCHEDULER_STATE)} is not an LR schedule state "
                              f"({err})") from None
    return _position(checkpoint)
