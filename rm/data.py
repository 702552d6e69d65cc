"""Reading preference data: one reader for every source, one bad-record policy, the train/eval split.

Sources: a .jsonl/.json/.parquet/.csv/.tsv file (.ndjson and .jsonlines read as .jsonl; suffix in any case), a
directory of them (hidden folders and files skipped, other files named in the log, symlinked folders followed), or
a datasets hub name ('owner/name'). A JSON array is read whole, whatever the suffix. CSV/TSV: a header row of field
names, then one record per row. `.txt` files (one text per line) are read for rm.score. JSON lines are split on
'\\n' only: a JSON string may hold U+2028 or U+0085, which str.splitlines() would cut. A UTF-8 byte-order mark is
accepted. Each record becomes a `Pair` through rm/layouts.py (one layout per file, fixed by its first record:
`FileLayout`); a bad record raises `DataError` naming file:line and field, or, with `skip_bad=True`, is dropped and
counted. Train, validate and score all read through `iter_pairs`; training holds a 16-byte hash per train pair and
reads the data a second time to tokenize it (`PairStream`).
"""

from __future__ import annotations

import array
import codecs
import csv
import hashlib
import io
import json
import os
import random
import re
import unicodedata
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

from rm.config import ConfigError, TrainConfig, hub_cache_dir
from rm.hub import dataset_snapshot, is_hub_name
from rm.layouts import SKIP_HINT, DataError, FileLayout, OutOfRange, Pair, check_pair

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".ndjson", ".jsonlines", ".csv", ".tsv")
DELIMITERS = {".csv": ",", ".tsv": "\t"}  # tables: a header row of field names, then one record per row
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


def is_hub_data_set(location: str) -> bool:
    """'owner/name' (rm.hub.is_hub_name) that does not end like a data file: owner/set.v2 is a data set, a missing
    a/b.jsonl a mistyped file."""
    return "/" in location and is_hub_name(location) and Path(location).suffix.lower() not in DATA_SUFFIXES


def _decode(raw: bytes, where: str) -> str | DataError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return DataError(where, f"invalid UTF-8 at byte {err.start}")


class DuplicateKeyError(Exception):
    """A JSON object names one key twice (json keeps the last value silently)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(items: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(items)
    if len(record) < len(items):  # the common case costs one len(); the key is looked for only when one repeats
        seen: set[str] = set()
        raise DuplicateKeyError(next(key for key, _ in items if key in seen or seen.add(key)))
    return record


LONGEST_INTEGER = 400  # digits read as int; float32's range ends at 39, Python's int() at 4300


def _integer(text: str) -> Any:
    """int(), except for integers longer than Python converts (its int-to-str limit): those are past float32's
    range anyway, so they are read as OutOfRange (the layouts refuse it, naming the field) instead of failing
    the whole parse with a ValueError."""
    return OutOfRange(text) if len(text) > LONGEST_INTEGER else int(text)


# Records are read with every object's keys checked unique and huge integers kept parseable. parse_int costs a
# Python call per JSON integer (rare in preference data); floats and NaN/Infinity keep json's own fast parsing
# (they become inf/nan, which the layouts refuse).
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_int=_integer)
_BETWEEN_RECORDS = re.compile(r"[\s,]*")


def _duplicate_key(where: str, key: str) -> DataError:
    return DataError(where, f"key {key!r} appears twice in one JSON object: the record says two things (json would "
                            "keep the last silently); keep one")


def _parse_json(text: str, where: str) -> Any:
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as err:
        return DataError(where, f"malformed JSON: {err.msg} (column {err.colno})")
    except DuplicateKeyError as err:
        return _duplicate_key(where, err.key)
    except RecursionError:
        return DataError(where, "JSON nested too deeply")


def _array_records(text: str, path: Path) -> Iterator[Record]:
    """A JSON array read record by record (the slow path, taken when an object in it repeats a key): each record,
    or for that object an error naming the line where its record starts."""
    position, number = text.index("[") + 1, 0
    while (position := _BETWEEN_RECORDS.match(text, position).end()) < len(text) and text[position] != "]":
        number += 1
        try:
            record, position = _DECODER.raw_decode(text, position)
        except DuplicateKeyError as err:
            where = f"{path}:{text.count(chr(10), 0, position) + 1} (record {number})"
            yield where, _duplicate_key(where, err.key)
            position = json.JSONDecoder().raw_decode(text, position)[1]
            continue
        yield f"{path}:record {number}", record


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
    if suffix in DELIMITERS:
        yield from _table_records(path, DELIMITERS[suffix])
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
        rows = _DECODER.decode(text)
    except json.JSONDecodeError as err:
        yield f"{path}:{err.lineno}", DataError(f"{path}:{err.lineno}", f"malformed JSON: {err.msg}")
        return
    except DuplicateKeyError:
        yield from _array_records(text, path)
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


def _table_records(path: Path, delimiter: str) -> Iterator[Record]:
    """A CSV/TSV file (csv module quoting; a field may span lines): its header row names the fields, each later
    row is one record. A `margin` cell is read as a number; the other cells stay text."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        yield str(path), DataError(str(path), f"invalid UTF-8 at byte {err.start}")
        return
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)  # rows end at \n or \r only
    header: list[str] | None = None
    line = 1  # where the next row starts
    try:
        for row in reader:
            where, line = f"{path}:{line}", reader.line_num + 1
            if not row:
                continue  # a blank line
            if header is None:
                header = row
                if len(set(header)) != len(header) or not all(name.strip() for name in header):
                    yield where, DataError(where, f"the header row must name every column once, got {header}")
                    return
            elif len(row) != len(header):
                yield where, DataError(where, f"{len(row)} columns, but the header row has {len(header)} "
                                              f"({delimiter!r}-separated; quote a cell that holds one)")
            else:
                record = dict(zip(header, row))
                if "margin" in record:
                    record["margin"] = _number(record["margin"])
                yield where, record
    except csv.Error as err:
        yield f"{path}:{line}", DataError(f"{path}:{line}", f"malformed {path.suffix.lower()[1:].upper()}: {err}")


def _number(cell: str) -> float | str | None:
    """A table cell as a number (empty: None); text that is not one stays text, for the layout to refuse."""
    if not cell.strip():
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


def _one_document(raw: bytes, where: str) -> DataError | None:
    """The clearer error for a file whose first line is not JSON because the whole file is one JSON object (a
    pretty-printed record, or {"data": [...]}); None when it is not (a one-line file: its line was the JSON)."""
    if b"\n" not in raw.strip():
        return None
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
    """The rows of a hub data set's split, read by datasets from its snapshot (downloaded, or the cached one:
    datasets itself reads no hub cache offline)."""
    import datasets

    try:
        folder = dataset_snapshot(name, cache_dir)
    except ConfigError as err:
        raise DataError(name, f"no such file or directory, and as a hub data set {err}") from None
    try:
        table = datasets.load_dataset(str(folder), split=split, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001  (no such split, unreadable files: one line)
        text = str(err).strip()
        raise DataError(name, f"hub data set (snapshot {folder}) not loadable: "
                              f"{text.splitlines()[0] if text else type(err).__name__}") from None
    for i, row in enumerate(table):
        yield f"{name}[{split}]:row {i + 1}", row


def read_records(location: str, split: str = "train", cache_dir: str | None = None,
                 log: Log | None = None) -> Iterator[tuple[str, Iterator[Record]]]:
    """(source name, its records) for every file at `location`, or for the hub data set it names."""
    if is_hub_data_set(location):
        yield f"{location}[{split}]", _hub_records(location, split, cache_dir)
        return
    for path in data_files(location, log):
        yield str(path), _file_records(path, cache_dir)


# --------------------------------------------------------------------------------------------- pairs
def iter_pairs(location: str, split: str = "train", cache_dir: str | None = None, skip_bad: bool = False,
               for_training: bool = True, log: Log = print) -> Iterator[Pair]:
    """Every pair at `location`, one at a time. A bad record raises DataError (file:line: field), or with skip_bad
    is dropped and counted, the first few named. for_training also refuses what training cannot use
    (rm.layouts.check_pair)."""
    bad: list[DataError] = []
    total = 0
    for source, records in read_records(location, split, cache_dir, log):
        layout, found = FileLayout(), 0
        for where, record in records:
            try:
                if isinstance(record, DataError):
                    raise record
                pair = layout.pair(record, where)
                pair.source = where
                if for_training:
                    check_pair(pair, hint="" if skip_bad else SKIP_HINT)
            except DataError as err:
                if not skip_bad:
                    raise
                bad.append(err)
                continue
            yield pair
            found += 1
        if layout.parse is None and not skip_bad:
            raise DataError(source, "holds no records")
        unread = ", ".join(f"{key} ({count} records)" for key, count in sorted(layout.unread.items()))
        log(f"{source}: {found} pairs" + (f", layout {layout.name}" if layout.name else "") +
            (f"; fields not read: {unread}" if unread else ""))
        total += found
    if bad:
        shown = "; ".join(str(err) for err in bad[:SHOWN_BAD_RECORDS])
        log(f"skip_bad_records: dropped {len(bad)} bad records from {location} (first "
            f"{min(len(bad), SHOWN_BAD_RECORDS)}: {shown})")
    if not total:
        raise DataError(location, f"no valid records ({len(bad)} bad records dropped)")


def read_pairs(location: str, split: str = "train", cache_dir: str | None = None, skip_bad: bool = False,
               for_training: bool = True, log: Log = print) -> list[Pair]:
    """Every pair at `location`, in a list (iter_pairs)."""
    return list(iter_pairs(location, split, cache_dir, skip_bad, for_training, log))


class PairStream:
    """Some of the pairs at a location, chosen by index in read order, read again from the source each time they
    are iterated: only the indices are held, so a million pairs never sit in memory at once (rm.encoding tokenizes
    them chunk by chunk). Slicing keeps the first pairs, as slicing a list would."""

    def __init__(self, read: Callable[[], Iterator[Pair]], indices: Sequence[int], location: str) -> None:
        self._read, self._indices, self._location = read, indices, location

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, part: slice) -> PairStream:
        return PairStream(self._read, self._indices[part], self._location)

    def __iter__(self) -> Iterator[Pair]:
        wanted = iter(self._indices)
        target = next(wanted, None)
        if target is None:
            return
        for index, pair in enumerate(self._read()):
            if index == target:
                yield pair
                target = next(wanted, None)
                if target is None:
                    return
        raise DataError(self._location, f"changed while it was read: pair {target + 1} of the first reading is "
                                        "gone; rerun once the data stays put")


def train_location(train_file_dir: str) -> str:
    """Where the train data is read from: the default (the embedded sample) is found from any directory."""
    if train_file_dir == EMBEDDED_TRAIN and not Path(EMBEDDED_TRAIN).exists():
        return str(EMBEDDED_SAMPLE / "train.jsonl")
    return train_file_dir


def _capped(pairs: PairStream | list[Pair], cap: int, what: str, setting: str,
            log: Log) -> PairStream | list[Pair]:
    if 0 <= cap < len(pairs):
        log(f"{what}: using {cap} of {len(pairs)} pairs ({setting}={cap}; -1 uses all)")
        return pairs[:cap]
    return pairs


def _normalised(text: str) -> str:
    """Unicode NFC with every whitespace run one space and none at the ends: how two copies of one pair differ."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return " ".join(text.split())


def content_key(pair: Pair) -> bytes:
    """A 16-byte hash of the pair's prompt (roles and texts), chosen and rejected after `_normalised`: equal for
    copies of one pair. Hashes, not the texts, are kept: a million pairs cost 16 MB."""
    digest = hashlib.blake2b(digest_size=16)
    for part in [str(len(pair.prompt))] + [t for m in pair.prompt for t in (m["role"], m["content"])] + [
            pair.chosen, pair.rejected]:
        data = _normalised(part).encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()


def _held_out_split(keys: list[bytes], cfg: TrainConfig, log: Log,
                    facts: dict[str, int]) -> tuple[Sequence[int], list[int] | None]:
    """A deterministic held-out split of the train data (seeded), disjoint by content, as (train, held-out) pair
    indices: HELD_OUT_FRACTION of the distinct pairs, at most max_eval_samples, is held out once each; the other
    copies of a held-out pair are dropped from training (else eval accuracy is partly train accuracy). Duplicates
    among the trained pairs stay. No held-out indices when that is zero pairs. `facts` gets the counts."""
    first: dict[bytes, int] = {}
    for index, key in enumerate(keys):
        first.setdefault(key, index)
    distinct = list(first.values())
    del first
    size = int(len(distinct) * HELD_OUT_FRACTION)
    if cfg.max_eval_samples >= 0:
        size = min(size, cfg.max_eval_samples)
    facts["duplicate_pairs"] = len(keys) - len(distinct)
    if size == 0:
        log(f"evaluation: off ({len(distinct)} distinct train pairs are too few to hold {HELD_OUT_FRACTION:.0%} out, "
            "or max_eval_samples is 0); pass --validation_file_dir to evaluate")
        return range(len(keys)), None
    held = sorted(random.Random(cfg.seed).sample(distinct, size))
    held_keys = {keys[index] for index in held}
    train = array.array("q", (index for index, key in enumerate(keys) if key not in held_keys))
    facts["held_out_copies_dropped"] = len(keys) - len(train) - size
    facts["eval_pairs_also_in_train"] = 0
    log(f"evaluation: {size} pairs held out of the {len(distinct)} distinct pairs of {cfg.train_file_dir} (seed "
        f"{cfg.seed}; --validation_file_dir FILE evaluates on other data, 'none' turns evaluation off)")
    if facts["duplicate_pairs"]:
        log(f"duplicates: the train data holds {facts['duplicate_pairs']} copies of pairs it already has (same "
            f"prompt, chosen and rejected up to whitespace and Unicode form); {facts['held_out_copies_dropped']} "
            "copies of held-out pairs dropped from training so that no held-out pair is trained on; the other "
            "copies train")
    return train, held


def _overlap(train_keys: list[bytes], evaluation: list[Pair], location: str, log: Log, facts: dict[str, int]) -> None:
    """Counts (into facts) and warns about eval pairs that are also train pairs: given eval data is used as given,
    but its accuracy is then partly train accuracy."""
    known = set(train_keys)
    facts["duplicate_pairs"] = len(train_keys) - len(known)
    facts["eval_pairs_also_in_train"] = sum(content_key(pair) in known for pair in evaluation)
    if facts["eval_pairs_also_in_train"]:
        log(f"warning: {facts['eval_pairs_also_in_train']} of the {len(evaluation)} eval pairs of {location} are also in the "
             "train data (same prompt, chosen and rejected up to whitespace and Unicode form): their eval accuracy "
             "is train accuracy")


def load_training_data(cfg: TrainConfig, log: Log,
                       facts: dict[str, int] | None = None) -> tuple[PairStream, list[Pair] | None]:
    """The train pairs (a PairStream: every record is read and checked here, before the model is built, and read
    again when tokenized) and the eval pairs, capped at max_*_samples.
    Eval data: validation_file_dir; unset, the embedded eval file next to the embedded train file, else a held-out
    split of the train data (disjoint by content); None when evaluation is off. `facts` (for run_info.json) gets
    the duplicate counts: duplicate_pairs (in the train data), held_out_copies_dropped, eval_pairs_also_in_train."""
    def read(location: str, split: str, log: Log) -> Iterator[Pair]:
        return iter_pairs(location, split, hub_cache_dir(cfg.cache_dir), cfg.skip_bad_records, log=log)

    def quiet(message: str) -> None:  # the second reading of the train data says nothing new
        pass

    facts = {} if facts is None else facts
    location = train_location(cfg.train_file_dir)
    keys = [content_key(pair) for pair in read(location, "train", log)]  # a 16-byte hash a pair is all that is kept
    again = lambda: read(location, "train", quiet)  # noqa: E731
    train = PairStream(again, range(len(keys)), location)
    evaluation = None
    if cfg.max_eval_samples == 0 or (cfg.validation_file_dir or "").lower() == NO_EVALUATION:
        log("evaluation: off (" + ("max_eval_samples=0)" if cfg.max_eval_samples == 0 else
                                   f"validation_file_dir={NO_EVALUATION})"))
    elif cfg.validation_file_dir:
        evaluation = list(read(cfg.validation_file_dir, "validation", log))
        if cfg.max_eval_samples > len(evaluation):
            raise ConfigError(f"max_eval_samples is {cfg.max_eval_samples} but {cfg.validation_file_dir} holds only "
                              f"{len(evaluation)} valid pairs; lower it or pass -1 for all")
    elif cfg.train_file_dir == EMBEDDED_TRAIN:
        evaluation = list(read(str(EMBEDDED_SAMPLE / "eval.jsonl"), "validation", log))
    else:
        train_indices, held = _held_out_split(keys, cfg, log, facts)
        train = PairStream(again, train_indices, location)
        evaluation = None if held is None else list(PairStream(again, held, location))
    if evaluation is not None:
        evaluation = _capped(evaluation, cfg.max_eval_samples, "eval", "max_eval_samples", log)
        if "eval_pairs_also_in_train" not in facts:
            _overlap(keys, evaluation, cfg.validation_file_dir or str(EMBEDDED_SAMPLE / "eval.jsonl"), log, facts)
    return _capped(train, cfg.max_train_samples, "train", "max_train_samples", log), evaluation


def check_enough_pairs(usable_pairs: int, cfg: TrainConfig, num_processes: int) -> None:
    """At least one optimizer step's worth of pairs (after tokenization drops identical-after-truncation pairs)."""
    needed = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * num_processes
    if usable_pairs < needed:
        raise DataError(cfg.train_file_dir, f"{usable_pairs} usable training pairs, fewer than one optimizer step "
                        f"takes ({cfg.per_device_train_batch_size} per device x {cfg.gradient_accumulation_steps} "
                        f"accumulation steps x {num_processes} processes = {needed})")
