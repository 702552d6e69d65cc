"""One run per output_dir: a lock held by the run's global rank 0, and --overwrite_output_dir's removal of the
previous run's outputs (so rotation and `latest` never mix two runs)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from rm.checkpoint import later_checkpoints, step_of
from rm.config import ConfigError, TrainConfig
from rm.outputs import DIR_MODE, RUN_LOCK, RUN_LOCK_DRAFT_PREFIX, RUN_OUTPUTS, STAGING_PREFIX, check_writable
from rm.runtime import warn


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


def _read_holder(lock: str) -> dict[str, Any]:
    """What a lock file holds; {} when it cannot be read as one (FileNotFoundError passes: released)."""
    try:
        with open(lock, encoding="utf-8") as f:
            holder = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _take_lock(lock: str) -> dict[str, Any]:
    """Creates the lock file atomically (a complete temporary file hard-linked into place: never seen half
    written) and returns what it holds; takes over a stale one; raises ConfigError when a live run holds it."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:300]}
    folder = os.path.dirname(lock)
    for _ in range(3):  # a stale lock removed, then a race lost to another starting run: read its lock again
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=RUN_LOCK_DRAFT_PREFIX)
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
            holder = _read_holder(lock)
        except FileNotFoundError:
            continue  # released meanwhile
        if not holder:
            raise ConfigError(f"output_dir {folder!r} has an unreadable lock {lock}: if no run writes there, "
                              "delete it")
        running = _holder_is_running(holder)
        if running is None:
            raise ConfigError(f"output_dir {folder!r} is locked by {_describe(holder)}: a run on another host, which "
                              f"cannot be checked from here; if no run writes there, delete {lock}")
        if running:
            raise ConfigError(f"output_dir {folder!r} is in use by another run: {_describe(holder)}; wait for it "
                              "to finish or choose another output_dir")
        warn(f"output_dir {folder!r} was locked by a run that is no longer running ({_describe(holder)}); "
              f"taking over its lock {lock}")
        with contextlib.suppress(FileNotFoundError):  # only the lock judged stale: another run taking it over
            if os.stat(lock).st_ino == identity and _read_holder(lock) == holder:  # may have reused its inode
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
        warn(f"--overwrite_output_dir: removed the previous run's outputs from {output_dir}: {', '.join(removed)}")


def remove_later_checkpoints(output_dir: str, step: int) -> None:
    """--overwrite_output_dir with a resume from an earlier checkpoint: the checkpoints past it go (rank 0, just
    before the first write), so `latest` and rotation follow the resumed run only."""
    if os.environ.get("RANK", "0") != "0":
        return
    removed = later_checkpoints(output_dir, step)
    for path in removed:
        shutil.rmtree(path)
    if removed:
        warn(f"--overwrite_output_dir: removed the checkpoints past step {step}: "
             f"{', '.join(os.path.basename(path) for path in removed)}")
