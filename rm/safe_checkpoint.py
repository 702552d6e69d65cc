"""Checkpoints that never run code: a manifest (size and sha256 of every file) written with each checkpoint and
checked at resume, and restricted unpickling (torch.load(weights_only=True) plus a small allowlist) of every file
that is unpickled, before accelerate or DeepSpeed read it and while they do."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator

from rm.config import ConfigError
from rm.outputs import COMPLETE_MARKER, MANIFEST, write_json

# Files of a checkpoint that nothing unpickles at resume: JSON, safetensors, DeepSpeed's `latest` tag (text) and
# its zero_to_fp32.py helper scripts (never run). Every other file must pass the restricted load.
NOT_PICKLED_SUFFIXES = (".json", ".safetensors", ".py")
NOT_PICKLED_NAMES = {"latest", COMPLETE_MARKER}


class CheckpointError(ConfigError):
    """A checkpoint cannot be restored exactly; the message names the file. Exit code 2, like every refusal."""


class DamagedCheckpointError(CheckpointError):
    """Its files differ from its manifest (truncated, changed, missing, added) or it has no manifest."""


class UnsafeCheckpointError(CheckpointError):
    """A file would need more than plain tensors and numbers to unpickle: refused, never skipped over."""


def sha256_of(path: str) -> str:
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
    files = {rel: {"size": os.path.getsize(os.path.join(folder, rel)), "sha256": sha256_of(os.path.join(folder, rel))}
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
        if sha256_of(path) != entry.get("sha256"):
            raise DamagedCheckpointError(f"{path} changed since it was saved (its sha256 differs)")
    return present


def verify_checkpoint(checkpoint: str) -> None:
    """Raises DamagedCheckpointError (manifest) or UnsafeCheckpointError (a pickle beyond plain data), each naming
    the file. Nothing is executed: pickles are read with restricted_load, memory-mapped (tensors not read)."""
    if not os.path.isfile(os.path.join(checkpoint, COMPLETE_MARKER)):
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


@contextlib.contextmanager
def restricted_deepspeed_loads(accelerator: Accelerator) -> Iterator[None]:
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
