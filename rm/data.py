"""Reading preference data: one reader for every source, one bad-record policy, the train/eval split.

Sources: a .jsonl/.json/.parquet file (.ndjson and .jsonlines read as .jsonl; suffix in any case), a directory of
them (hidden folders and files skipped, other files named in the log, symlinked folders followed), or a datasets hub
name ('owner/name'). A JSON array is read whole, whatever the suffix. `.txt` files (one text per line) are read for
rm.score. JSON lines are split on '\\n' only: a JSON string may hold U+2028 or U+0085, which str.splitlines() would
cut. A UTF-8 byte-order mark is accepted. Each record becomes a `Pair` through rm/layouts.py (one layout per file,
fixed by its first record: `FileLayout`); a bad record raises `DataError` naming file:line and field, or, with
`skip_bad=True`, is dropped and counted. Train, validate and score all read through `read_pairs`.
"""

from __future__ import annotations

import codecs
import json
import os
import random
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from rm.config import ConfigError, TrainConfig, hub_cache_dir
from rm.layouts import DataError, FileLayout, Pair, check_pair

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".ndjson", ".jsonlines")
EMBEDDED_TRAIN = "data/sample/train.jsonl"  # TrainConfig's default train_file_dir, found from any directory
EMBEDDED_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
NO_EVALUATION = "none"  # validation_file_dir value that turns evaluation off
SHOWN_BAD_RECORDS = 5
HELD_OUT_FRACTION = 0.05  # of the train data, when no eval data is given; max_eval_samples caps it

Record = tuple[str, Any]  # (location "file:line", the parsed record or the DataError that stopped it)
Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------- sources
def data_files(location: str, log: Log | None = None) -> list[Path]:
    """The data files at `location`: the file itself, or every data file under the directory, sorted. The other
    files there (not hidden) are named to `log`."""
    path = Path(location)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(str(path), "no such file or directory")
    files, seen, skipped = [], set(), []
    for root, dirs, names in os.walk(path, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .ipynb_checkpoints, .git: not data
        for name in sorted(n for n in names if not n.startswith(".")):
            (files if Path(name).suffix.lower() in DATA_SUFFIXES else skipped).append(Path(root) / name)
    if not files:
        raise DataError(str(path), f"no {'/'.join(DATA_SUFFIXES)} files in this directory")
    if skipped and log:
        log(f"{path}: skipped {len(skipped)} files that are not {'/'.join(DATA_SUFFIXES)}: "
            + ", ".join(str(p.relative_to(path)) for p in skipped[:SHOWN_BAD_RECORDS])
            + (", ..." if len(skipped) > SHOWN_BAD_RECORDS else ""))
    return files


def is_hub_name(location: str) -> bool:
    """'owner/name' that cannot be a local path: no such path, no data suffix, and no local folder 'owner'.
    A missing local-looking path (data/reward while ./data exists) fails at once instead of asking the hub."""
    path = Path(location)
    parts = location.split("/")
    return (len(parts) == 2 and all(parts) and not path.exists() and not path.suffix
            and not location.startswith((".", "~")) and not Path(parts[0]).exists())


def _decode(raw: bytes, where: str) -> str | DataError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return DataError(where, f"invalid UTF-8 at byte {err.start}")


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return DataError(where, f"malformed JSON: {err.msg} (column {err.colno})")
    except RecursionError:
        return DataError(where, "JSON nested too deeply")


def _file_records(path: Path, cache_dir: str | None) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import datasets

        try:
            table = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001  (pyarrow's and datasets' errors alike: the file is unreadable)
            cause = err.__cause__ or err
            yield str(path), DataError(str(path), f"not a readable Parquet file ({type(cause).__name__}: "
                                                  f"{str(cause).splitlines()[0] if str(cause) else ''})")
            return
        for i, row in enumerate(table):
            yield f"{path}:row {i + 1}", row
        return
    with path.open("rb") as file:  # JSON lines are read one at a time: a large file is never held whole
        start = len(codecs.BOM_UTF8) if file.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8 else 0
        file.seek(start)
        array = suffix != ".txt" and _first_byte(file) == b"["
        file.seek(start)
        if not array:
            yield from _line_records(path, suffix, file)
            return
        raw = file.read()
    text = _decode(raw, str(path))  # one JSON array (.json or .jsonl): parsed whole
    if isinstance(text, DataError):
        yield str(path), text
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        yield f"{path}:{err.lineno}", DataError(f"{path}:{err.lineno}", f"malformed JSON: {err.msg}")
        return
    except RecursionError:
        yield str(path), DataError(str(path), "JSON nested too deeply")
        return
    for i, row in enumerate(rows, start=1):
        yield f"{path}:record {i}", row


def _first_byte(file: BinaryIO) -> bytes:
    """The first byte that is not ASCII whitespace (b"" for a blank file)."""
    while block := file.read(1 << 16):
        if block := block.lstrip():
            return block[:1]
    return b""


def _line_records(path: Path, suffix: str, file: BinaryIO) -> Iterator[Record]:
    first = True
    for number, line in enumerate(file, start=1):  # JSON lines (or .txt lines): split on b"\n" only
        where = f"{path}:{number}"
        text = _decode(line.removesuffix(b"\n"), where)
        if isinstance(text, DataError):
            yield where, text
        elif text.strip():
            record = {"text": text.rstrip("\r")} if suffix == ".txt" else _parse_json(text, where)
            if first and isinstance(record, DataError):
                record = _one_document(path.read_bytes().removeprefix(codecs.BOM_UTF8), where) or record
            first = False
            yield where, record


def _one_document(raw: bytes, where: str) -> DataError | None:
    """The clearer error for a file whose first line is not JSON because the whole file is one JSON object (a
    pretty-printed record, or {"data": [...]}); None when it is not."""
    try:
        document = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    lists = [key for key, value in document.items() if isinstance(value, list)]
    hint = f" (its field {lists[0]!r} holds a list: make that list the file's whole content)" if lists else ""
    return DataError(where, "the file is one JSON object over several lines; expected JSON lines (one record per "
                            f"line) or a JSON array of records{hint}")


def _hub_records(name: str, split: str, cache_dir: str | None) -> Iterator[Record]:
    import datasets

    try:
        table = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as err:  # offline, unknown name, missing split: all mean the same to the user
        raise DataError(name, f"no such file or directory, and not a loadable hub data set ({err})") from None
    for i, row in enumerate(table):
        yield f"{name}[{split}]:row {i + 1}", row


def read_records(location: str, split: str = "train", cache_dir: str | None = None,
                 log: Log | None = None) -> Iterator[tuple[str, Iterator[Record]]]:
    """(source name, its records) for every file at `location`, or for the hub data set it names."""
    if is_hub_name(location):
        yield f"{location}[{split}]", _hub_records(location, split, cache_dir)
        return
    for path in data_files(location, log):
        yield str(path), _file_records(path, cache_dir)


# --------------------------------------------------------------------------------------------- pairs
def read_pairs(location: str, split: str = "train", cache_dir: str | None = None, skip_bad: bool = False,
               for_training: bool = True, log: Log = print) -> list[Pair]:
    """Every pair at `location`. A bad record raises DataError (file:line: field), or with skip_bad is dropped and
    counted, the first few named. for_training also refuses what training cannot use (rm.layouts.check_pair)."""
    pairs: list[Pair] = []
    bad: list[DataError] = []
    for source, records in read_records(location, split, cache_dir, log):
        layout, found = FileLayout(), 0
        for where, record in records:
            try:
                if isinstance(record, DataError):
                    raise record
                pair = layout.pair(record, where)
                pair.source = where
                if for_training:
                    check_pair(pair)
            except DataError as err:
                if not skip_bad:
                    raise
                bad.append(err)
                continue
            pairs.append(pair)
            found += 1
        if layout.parse is None and not skip_bad:
            raise DataError(source, "holds no records")
        unread = ", ".join(f"{key} ({count} records)" for key, count in sorted(layout.unread.items()))
        log(f"{source}: {found} pairs" + (f", layout {layout.name}" if layout.name else "") +
            (f"; fields not read: {unread}" if unread else ""))
    if bad:
        shown = "; ".join(str(err) for err in bad[:SHOWN_BAD_RECORDS])
        log(f"skip_bad_records: dropped {len(bad)} bad records from {location} (first "
            f"{min(len(bad), SHOWN_BAD_RECORDS)}: {shown})")
    if not pairs:
        raise DataError(location, f"no valid records ({len(bad)} bad records dropped)")
    return pairs


def train_location(train_file_dir: str) -> str:
    """Where the train data is read from: the default (the embedded sample) is found from any directory."""
    if train_file_dir == EMBEDDED_TRAIN and not Path(EMBEDDED_TRAIN).exists():
        return str(EMBEDDED_SAMPLE / "train.jsonl")
    return train_file_dir


def _capped(pairs: list[Pair], cap: int, what: str, setting: str, log: Log) -> list[Pair]:
    if 0 <= cap < len(pairs):
        log(f"{what}: using {cap} of {len(pairs)} pairs ({setting}={cap}; -1 uses all)")
        return pairs[:cap]
    return pairs


def _held_out_split(pairs: list[Pair], cfg: TrainConfig, log: Log) -> tuple[list[Pair], list[Pair] | None]:
    """A deterministic held-out split of the train data (seeded): HELD_OUT_FRACTION of it, at most
    max_eval_samples; none when that is zero pairs."""
    size = int(len(pairs) * HELD_OUT_FRACTION)
    if cfg.max_eval_samples >= 0:
        size = min(size, cfg.max_eval_samples)
    if size == 0:
        log(f"evaluation: off ({len(pairs)} train pairs are too few to hold {HELD_OUT_FRACTION:.0%} out, or "
            "max_eval_samples is 0); pass --validation_file_dir to evaluate")
        return pairs, None
    held = set(random.Random(cfg.seed).sample(range(len(pairs)), size))
    log(f"evaluation: {size} pairs held out of the {len(pairs)} pairs of {cfg.train_file_dir} (seed {cfg.seed}; "
        "--validation_file_dir FILE evaluates on other data, 'none' turns evaluation off)")
    return ([p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held])


def load_training_data(cfg: TrainConfig, log: Log) -> tuple[list[Pair], list[Pair] | None]:
    """All train and eval pairs, read and checked before the model is built, capped at max_*_samples.
    Eval data: validation_file_dir; unset, the embedded eval file next to the embedded train file, else a held-out
    split of the train data; None when evaluation is off."""
    def read(location: str, split: str) -> list[Pair]:
        return read_pairs(location, split, hub_cache_dir(cfg.cache_dir), cfg.skip_bad_records, log=log)

    train = read(train_location(cfg.train_file_dir), "train")
    evaluation = None
    if cfg.max_eval_samples == 0 or (cfg.validation_file_dir or "").lower() == NO_EVALUATION:
        log("evaluation: off (" + ("max_eval_samples=0)" if cfg.max_eval_samples == 0 else
                                   f"validation_file_dir={NO_EVALUATION})"))
    elif cfg.validation_file_dir:
        evaluation = read(cfg.validation_file_dir, "validation")
        if cfg.max_eval_samples > len(evaluation):
            raise ConfigError(f"max_eval_samples is {cfg.max_eval_samples} but {cfg.validation_file_dir} holds only "
                              f"{len(evaluation)} valid pairs; lower it or pass -1 for all")
    elif cfg.train_file_dir == EMBEDDED_TRAIN:
        evaluation = read(str(EMBEDDED_SAMPLE / "eval.jsonl"), "validation")
    else:
        train, evaluation = _held_out_split(train, cfg, log)
    if evaluation is not None:
        evaluation = _capped(evaluation, cfg.max_eval_samples, "eval", "max_eval_samples", log)
    return _capped(train, cfg.max_train_samples, "train", "max_train_samples", log), evaluation


def check_enough_pairs(usable_pairs: int, cfg: TrainConfig, num_processes: int) -> None:
    """At least one optimizer step's worth of pairs (after tokenization drops identical-after-truncation pairs)."""
    needed = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * num_processes
    if usable_pairs < needed:
        raise DataError(cfg.train_file_dir, f"{usable_pairs} usable training pairs, fewer than one optimizer step "
                        f"takes ({cfg.per_device_train_batch_size} per device x {cfg.gradient_accumulation_steps} "
                        f"accumulation steps x {num_processes} processes = {needed})")
