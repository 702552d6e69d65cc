"""The token cache: a run's train and eval token ids, read and tokenized once per machine and memory-mapped.

Location: `--cache_dir` if given, else $RM_CACHE_DIR, else $XDG_CACHE_HOME/rm (~/.cache/rm); `--cache_dir none`
turns the cache off (each process then tokenizes into a private temporary folder). One cache entry is a folder
`tokens-<key>` holding train.arrow, eval.arrow (when evaluating) and meta.json (the log lines the data gave).

Key: the bytes of every data file read (size and sha256, as the resume check of rm/checkpoint.py sees them; a hub
data set: its name, split and snapshot commit), the settings that choose and cap the pairs, the encoding settings,
the tokenizer's content (rm.encoding.tokenizer_identity) and the source of the modules that read, split and encode
(an edited reader or encoder never reuses old ids). A hit reads no record: the data was validated when the entry was
written, from the same bytes by the same code.

Processes: the local main process of each machine looks the key up and, on a miss, reads, validates, tokenizes and
publishes the entry (written beside its place, renamed into place whole: a reader never sees half of one); the
other processes wait, then memory-map the same files. Machines sharing the cache folder tokenize once in all.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from rm.config import ConfigError, TrainConfig, hub_cache_dir
from rm.data import EMBEDDED_TRAIN, NO_EVALUATION, is_hub_data_set, load_training_data, train_location
from rm.encoding import PairEncoder, encode_pairs, tokenizer_identity
from rm.layouts import DataError

CACHE_ENV = "RM_CACHE_DIR"  # where the token cache goes when --cache_dir is not given
META = "meta.json"
_KEYED_MODULES = ("data.py", "layouts.py", "encoding.py", "token_store.py")  # the code the cached ids depend on
Log = Callable[[str], None]


def token_cache_root(cache_dir: str | None) -> str | None:
    """The folder of the token cache, or None when it is off (--cache_dir none)."""
    if cache_dir is not None:
        return hub_cache_dir(cache_dir)  # the folder given, or None for 'none' (rm.config's one test of it)
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "rm")


def _source_identity(location: str, split: str, cache_dir: str | None) -> Any:
    """What identifies the records at `location`: its files' sizes and sha256, or a hub data set's fingerprint."""
    from rm.checkpoint import train_data_fingerprint

    if not is_hub_data_set(location):
        return train_data_fingerprint(location)  # missing paths raise DataError here, before any reading
    from rm.hub import dataset_snapshot

    try:
        snapshot = dataset_snapshot(location, cache_dir)  # the folder rm.data reads (datasets reads no cache offline)
    except ConfigError as err:  # rm.data reads it next and says what is wrong
        return [location, split, f"unavailable: {err}"]
    return [location, split, snapshot.name]  # a snapshot folder is named by the repository's commit


def cache_key(cfg: TrainConfig, encoder: PairEncoder) -> str:
    """The token cache key of this run's data (see the module docstring)."""
    hub_cache = hub_cache_dir(cfg.cache_dir)
    validation = cfg.validation_file_dir
    sources = [_source_identity(train_location(cfg.train_file_dir), "train", hub_cache)]
    if validation and validation.lower() != NO_EVALUATION:
        sources.append(_source_identity(validation, "validation", hub_cache))
    elif cfg.train_file_dir == EMBEDDED_TRAIN:  # the embedded eval file beside it
        sources.append(_source_identity(str(Path(train_location(EMBEDDED_TRAIN)).parent / "eval.jsonl"),
                                        "validation", hub_cache))
    code = hashlib.sha256()
    for module in _KEYED_MODULES:
        code.update((Path(__file__).parent / module).read_bytes())
    settings = [cfg.train_file_dir, validation, cfg.max_train_samples, cfg.max_eval_samples,
                cfg.skip_bad_records, cfg.seed if not validation else None]  # the seed picks a held-out split
    header = [tokenizer_identity(encoder), code.hexdigest(), sources, settings]
    return hashlib.sha256(json.dumps(header, default=str).encode()).hexdigest()[:16]


def _load(folder: str, log: Log, facts: dict[str, int]) -> tuple[Any, Any] | None:
    """The (train, eval) sets of a cache entry, memory-mapped, or None: no such entry, or a damaged one (removed,
    to be written again). facts gets the data's duplicate counts (rm.data.load_training_data)."""
    import datasets

    if not os.path.isdir(folder):
        return None
    try:
        meta = json.loads(Path(folder, META).read_text())
        sets = [datasets.Dataset.from_file(os.path.join(folder, f"{name}.arrow")) if meta[name] is not None
                else None for name in ("train", "eval")]
        if [None if s is None else len(s) for s in sets] != [meta["train"], meta["eval"]]:
            raise ValueError("row counts differ from meta.json")
    except Exception as err:  # noqa: BLE001  (whatever a damaged entry raises, tokenizing again is the answer)
        log(f"warning: the token cache {folder} does not load ({type(err).__name__}: {err}); tokenizing again")
        shutil.rmtree(folder, ignore_errors=True)
        return None
    facts.update(meta.get("duplicates", {}))
    for line in meta["log"]:
        log(line)
    log(f"data: {meta['train']} train and {meta['eval'] or 0} eval pairs loaded from the token cache {folder} "
        f"(tokenized {meta['written']}; --cache_dir none turns the cache off)")
    return sets[0], sets[1]


def _build(cfg: TrainConfig, encoder: PairEncoder, folder: str, log: Log, show_progress: bool) -> None:
    """Reads and checks the data (rm.data), tokenizes it into folder/{train,eval}.arrow and writes meta.json."""
    lines: list[str] = []

    def record(message: str) -> None:
        lines.append(message)
        log(message)

    started = time.perf_counter()
    duplicates: dict[str, int] = {}
    train_pairs, eval_pairs = load_training_data(cfg, record, duplicates)
    os.makedirs(folder, exist_ok=True)
    counts: dict[str, int | None] = {"train": None, "eval": None}
    for name, pairs in (("train", train_pairs), ("eval", eval_pairs)):
        if pairs:
            counts[name] = len(encode_pairs(pairs, encoder, name, show_progress=show_progress, log=record,
                                            path=os.path.join(folder, f"{name}.arrow")))
    seconds = time.perf_counter() - started
    read = len(train_pairs) + len(eval_pairs or [])
    log(f"data: {read} pairs read and tokenized in {seconds:.1f} s ({read / seconds:.0f} pairs/s)")
    meta = {**counts, "log": lines, "duplicates": duplicates,
            "written": datetime.datetime.now().isoformat(timespec="seconds")}
    Path(folder, META).write_text(json.dumps(meta, ensure_ascii=False))


def _publish(folder: str, build: Callable[[str], None]) -> None:
    """Builds next to folder, then renames into place: a reader never sees a half-written entry, whether the writer
    is killed or another job (a sweep sharing the cache, another machine's processes) writes the same entry at the
    same moment. The first rename wins; a later writer discards its own copy."""
    draft = f"{folder}.tmp-{socket.gethostname()}-{os.getpid()}"
    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    try:
        build(draft)
        os.rename(draft, folder)
    except OSError:
        if not os.path.isdir(folder):
            raise
    finally:
        shutil.rmtree(draft, ignore_errors=True)


def _private_folder() -> str:
    """A temporary folder for this process's token ids when the cache is off, removed when the process ends."""
    folder = tempfile.mkdtemp(prefix="rm-tokens-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def token_sets(cfg: TrainConfig, encoder: PairEncoder, accelerator: Any, log: Log, announce: Log,
               facts: dict[str, int]) -> tuple[Any, Any]:
    """This run's (train, eval) token sets, memory-mapped (eval None when evaluation is off). log: the main
    process's log; announce: a line any process prints (it says which process tokenizes); facts gets the data's
    duplicate counts (for run_info.json). Every process calls it."""
    main = accelerator.is_local_main_process
    quiet: Log = lambda message: None  # noqa: E731
    root = token_cache_root(cfg.cache_dir)
    if root is not None:
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as err:
            log(f"warning: token cache off: cannot create {root} ({err}); --cache_dir DIR puts it elsewhere")
            root = None
    if root is None:  # every process reads and tokenizes for itself
        folder = os.path.join(_private_folder(), "tokens")
        announce(f"data: reading and tokenizing {cfg.train_file_dir} (no token cache)")
        _build(cfg, encoder, folder, log, show_progress=main)
        return _load(folder, quiet, facts)
    folder = os.path.join(root, f"tokens-{cache_key(cfg, encoder)}")
    error: Exception | None = None
    sets = None
    if main:
        try:
            sets = _load(folder, log, facts)
            if sets is None:
                announce(f"data: reading and tokenizing {cfg.train_file_dir} into the token cache {folder}")
                _publish(folder, lambda draft: _build(cfg, encoder, draft, log, show_progress=True))
                sets = _load(folder, quiet, facts)
        except (DataError, ConfigError) as err:
            error = err
    if _failed_anywhere(accelerator, error is not None):  # the other processes wait here for the local main
        raise error or DataError(cfg.train_file_dir, "the data could not be prepared (the first process says why)")
    if sets is None:  # not the local main: its entry is in place (unless it went meanwhile: then build it here)
        sets = _load(folder, quiet, facts)
        if sets is None:
            announce(f"data: reading and tokenizing {cfg.train_file_dir} into the token cache {folder}")
            _publish(folder, lambda draft: _build(cfg, encoder, draft, quiet, show_progress=False))
            sets = _load(folder, quiet, facts)
    return sets


def _failed_anywhere(accelerator: Any, failed: bool) -> bool:
    """Whether any process failed: a collective, so it is also where the other processes wait for the local main."""
    if accelerator.num_processes == 1:
        return failed
    import torch

    flag = torch.tensor([int(failed)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item())
