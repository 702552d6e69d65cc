"""Reading preference data: files or hub data sets in four real layouts, into one normalised record.

Every record becomes a `Pair`: the prompt as chat messages, the chosen and rejected responses as text, and an
optional margin. The layout is detected once per file from its first record; every record is then checked
against it, and anything else raises `DataError` naming the file, line (or row) and field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "observation": "tool", "tool": "tool", "function_call": "assistant"}


class DataError(ValueError):
    """A record or file cannot be read as preference data."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where


@dataclass
class Pair:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    margin: float = 0.0
    tools: list | None = None  # tool definitions, handed to the chat template
    source: str = field(default="", compare=False)  # "file:line", for messages


# --------------------------------------------------------------------------------------------- field checks
def _text(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(where, f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(where, f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(where, f"field {key!r} is empty")
    return value


def _sharegpt_turns(turns: Any, key: str, where: str) -> list[dict[str, str]]:
    """[{from, value}, ...] (ShareGPT) or [{role, content}, ...] (OpenAI) -> [{role, content}, ...]."""
    if isinstance(turns, dict):
        turns = [turns]
    if not isinstance(turns, list) or not turns:
        raise DataError(where, f"field {key!r} must be a non-empty list of messages")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(where, f"field {key}[{i}] must be a message object, got {type(turn).__name__}")
        role_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
        role = turn.get(role_key)
        if role not in ROLES:
            raise DataError(where, f"field {key}[{i}].{role_key} must be one of {sorted(ROLES)}, got {role!r}")
        messages.append({"role": ROLES[role], "content": _text(turn, text_key, where + f" ({key}[{i}])")})
    return messages


def _margin(record: dict, where: str) -> float:
    value = record.get("margin", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(where, f"field 'margin' must be a number, got {value!r}")
    return float(value)


def _tools(record: dict, where: str) -> list | None:
    """Optional `tools`: a list of tool definitions, or that list as a JSON string (MedicalGPT writes both)."""
    value = record.get("tools")
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(where, "field 'tools' is a string but not valid JSON") from None
    if not isinstance(value, list):
        raise DataError(where, f"field 'tools' must be a list of tool definitions, got {type(value).__name__}")
    return value


def _reply(messages: list[dict[str, str]], key: str, where: str) -> str:
    if messages[-1]["role"] != "assistant":
        raise DataError(where, f"field {key!r} must end with an assistant message")
    return messages[-1]["content"]


# --------------------------------------------------------------------------------------------- layouts
def _medicalgpt(record: dict, where: str) -> Pair:
    """conversations [{from, value}] + chosen str + rejected str, optional system / tools."""
    prompt = _sharegpt_turns(record.get("conversations"), "conversations", where)
    if "system" in record and record["system"]:
        prompt.insert(0, {"role": "system", "content": _text(record, "system", where)})
    return Pair(prompt, _text(record, "chosen", where), _text(record, "rejected", where), _margin(record, where),
                _tools(record, where))


def _llamafactory(record: dict, where: str) -> Pair:
    """conversations [{from, value}] + chosen / rejected as one {from, value} message."""
    prompt = _sharegpt_turns(record.get("conversations"), "conversations", where)
    if "system" in record and record["system"]:
        prompt.insert(0, {"role": "system", "content": _text(record, "system", where)})
    chosen = _reply(_sharegpt_turns(record.get("chosen"), "chosen", where), "chosen", where)
    rejected = _reply(_sharegpt_turns(record.get("rejected"), "rejected", where), "rejected", where)
    return Pair(prompt, chosen, rejected, _margin(record, where))


def _medicalgpt_legacy(record: dict, where: str) -> Pair:
    """question + response_chosen + response_rejected, optional system and history [[q, a], ...]."""
    prompt = []
    if record.get("system"):
        prompt.append({"role": "system", "content": _text(record, "system", where)})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(where, "field 'history' must be a list of [question, answer] pairs")
    for i, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataError(where, f"field history[{i}] must be a [question, answer] pair of strings")
        prompt += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    prompt.append({"role": "user", "content": _text(record, "question", where)})
    return Pair(prompt, _text(record, "response_chosen", where), _text(record, "response_rejected", where),
                _margin(record, where))


def _trl(record: dict, where: str) -> Pair:
    """prompt + chosen + rejected (strings or message lists), or chosen / rejected as whole conversations."""
    def side(key: str) -> tuple[list[dict[str, str]], str]:
        value = record.get(key)
        if isinstance(value, str):
            return [], _text(record, key, where)
        messages = _sharegpt_turns(value, key, where)
        return messages[:-1], _reply(messages, key, where)

    (chosen_context, chosen), (rejected_context, rejected) = side("chosen"), side("rejected")
    if "prompt" in record:
        prompt_value = record["prompt"]
        prompt = ([{"role": "user", "content": _text(record, "prompt", where)}] if isinstance(prompt_value, str)
                  else _sharegpt_turns(prompt_value, "prompt", where))
        prompt += chosen_context  # explicit prompt + multi-turn chosen: rare, keep the turns
    else:
        if chosen_context != rejected_context:
            raise DataError(where, "fields 'chosen' and 'rejected' must share every message but the last")
        if not chosen_context:
            raise DataError(where, "missing field 'prompt' (or conversations in 'chosen' / 'rejected')")
        prompt = chosen_context
    return Pair(prompt, chosen, rejected, _margin(record, where))


def detect_layout(record: Any, where: str) -> tuple[str, Callable[[dict, str], Pair]]:
    if not isinstance(record, dict):
        raise DataError(where, f"expected a JSON object per record, got {type(record).__name__}")
    keys = set(record)
    if {"question", "response_chosen", "response_rejected"} <= keys:
        return "medicalgpt_legacy", _medicalgpt_legacy
    if "conversations" in keys and {"chosen", "rejected"} <= keys:
        if isinstance(record["chosen"], str):
            return "medicalgpt", _medicalgpt
        return "llamafactory", _llamafactory
    if {"chosen", "rejected"} <= keys:
        return "trl", _trl
    raise DataError(where, f"unknown layout: fields {sorted(keys)}; expected one of: conversations+chosen+rejected "
                           "(MedicalGPT / LLaMA-Factory), question+response_chosen+response_rejected, "
                           "prompt+chosen+rejected or chosen+rejected conversations (TRL)")


# --------------------------------------------------------------------------------------------- files
def _records(path: Path, cache_dir: str | None) -> Iterator[tuple[str, Any]]:
    """Yields (location, raw record) for one file; location is 'file:line' (jsonl) or 'file:record N'."""
    if path.suffix == ".parquet":
        import datasets

        table = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache_dir)
        for i, row in enumerate(table):
            yield f"{path}:row {i + 1}", row
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}", f"invalid UTF-8 at byte {err.start}") from None
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}", f"malformed JSON: {err.msg}") from None
        for i, row in enumerate(rows):
            yield f"{path}:record {i + 1}", row
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}", f"malformed JSON: {err.msg} (column {err.colno})") from None


def data_files(location: str) -> list[Path]:
    path = Path(location)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
        if not files:
            raise DataError(str(path), f"no {'/'.join(DATA_SUFFIXES)} files in this directory")
        return files
    raise DataError(str(path), "no such file or directory")


def read_file(path: Path, cache_dir: str | None = None) -> tuple[str, list[Pair]]:
    """All pairs of one file, with the layout detected from its first record."""
    pairs: list[Pair] = []
    parse = None
    layout = ""
    for where, record in _records(path, cache_dir):
        if parse is None:
            layout, parse = detect_layout(record, where)
        if not isinstance(record, dict):
            raise DataError(where, f"expected a JSON object, got {type(record).__name__}")
        pair = parse(record, where)
        pair.source = where
        pairs.append(pair)
    if not pairs:
        raise DataError(str(path), "file holds no records")
    return layout, pairs


def _read_hub(name: str, split: str, cache_dir: str | None) -> list[Pair]:
    import datasets

    try:
        table = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as err:  # offline, unknown name, missing split: all mean the same to the user
        raise DataError(name, f"no such file or directory, and not a loadable hub data set ({err})") from None
    pairs, parse = [], None
    for i, record in enumerate(table):
        where = f"{name}[{split}]:row {i + 1}"
        if parse is None:
            _, parse = detect_layout(record, where)
        pair = parse(record, where)
        pair.source = where
        pairs.append(pair)
    return pairs


def is_hub_name(location: str) -> bool:
    """'owner/name' that is not a local path: read with datasets from the hub."""
    return not Path(location).exists() and location.count("/") == 1 and not Path(location).suffix


def load_pairs(location: str, cache_dir: str | None = None, split: str = "train",
               log: Callable[[str], None] = print) -> list[Pair]:
    """Pairs from a file, a directory of files, or (when it is neither) a datasets hub name."""
    if is_hub_name(location):
        return _read_hub(location, split, cache_dir)
    pairs = []
    for path in data_files(location):
        layout, file_pairs = read_file(path, cache_dir)
        log(f"{path}: {len(file_pairs)} pairs, layout {layout}")
        pairs += file_pairs
    return pairs
