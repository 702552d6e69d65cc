"""Preference-data layouts: one raw record (a JSON object) into one normalised `Pair`.

A `Pair` holds the prompt as chat messages (empty for prompt-less pairs), the chosen and rejected responses as text,
and an optional margin. Layouts: MedicalGPT (conversations + chosen/rejected strings, or the legacy
question/response_chosen/response_rejected), LLaMA-Factory (conversations + chosen/rejected messages), TRL (prompt +
chosen + rejected, strings or messages; or whole conversations sharing every turn but the last), Anthropic HH-RLHF
(chosen/rejected whole transcripts, the prompt implicit) and prompt-less pairs. Anything else raises `DataError`
naming the record's location and field. rm/data.py finds the records; `check_pair` says what training refuses.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "observation": "tool", "tool": "tool", "function_call": "assistant"}


class DataError(ValueError):
    """A record or file cannot be read as preference data."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where


@dataclass(slots=True)  # no per-pair __dict__: a million pairs are held while the data is read
class Pair:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    margin: float = 0.0
    tools: list | None = None  # tool definitions, handed to the chat template
    source: str = field(default="", compare=False)  # "file:line", for messages
    reply_in: str = field(default="", compare=False)  # where the replies sit in their fields, for messages


# --------------------------------------------------------------------------------------------- field checks
def _text(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    """A string field; responses may be empty here (scoring ranks them; `check_pair` refuses them for training)."""
    if key not in record:
        raise DataError(where, f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(where, f"field {key!r} must be a string, got {_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # a JSON "\ud800" escape: a text cut inside a character
        raise DataError(where, f"field {key!r} holds an unpaired UTF-16 surrogate ({value[err.start]!r}) at "
                               f"character {err.start}: not valid Unicode text") from None
    if not allow_empty and not value.strip():
        raise DataError(where, f"field {key!r} is empty")
    return value


def _response(record: dict, key: str, where: str) -> str:
    return _text(record, key, where, allow_empty=True)


def _kind(value: Any) -> str:
    """How a wrong value is named in a message: null, an empty list, or its JSON type."""
    if value is None:
        return "null"
    if value == []:
        return "an empty list"
    return {str: "a string", bool: "true/false", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _sharegpt_turns(turns: Any, key: str, where: str, or_text: bool = False) -> list[dict[str, str]]:
    """[{from, value}, ...] (ShareGPT) or [{role, content}, ...] (OpenAI) -> [{role, content}, ...]. or_text: the
    field may also be a string (said in the message)."""
    if isinstance(turns, dict):
        turns = [turns]
    if not isinstance(turns, list) or not turns:
        raise DataError(where, f"field {key!r} must be {'a string or ' if or_text else ''}a non-empty list of "
                               f"messages, got {_kind(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(where, f"field {key}[{i}] must be a message object, got {type(turn).__name__}")
        role_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
        role = turn.get(role_key)
        if role not in ROLES:
            raise DataError(where, f"field {key}[{i}].{role_key} must be one of {sorted(ROLES)}, got {role!r}")
        last_reply = key in ("chosen", "rejected") and i == len(turns) - 1
        content = _text(turn, text_key, where + f" ({key}[{i}])", allow_empty=last_reply)
        messages.append({"role": ROLES[role], "content": content})
    return messages


FLOAT32_MAX = 3.4028234663852886e38


class OutOfRange(float):
    """A JSON number too long for Python's int() (rm/data.py reads it so): infinite, keeping a short spelling."""

    def __new__(cls, text: str) -> "OutOfRange":
        number = super().__new__(cls, "-inf" if text.startswith("-") else "inf")
        number.spelled = f"{text[:12]}... ({len(text.lstrip('-'))} digits)"
        return number


def _margin(record: dict, where: str) -> float:
    """A number the float32 loss can hold: huge integers and values past float32's range are refused here, not
    turned into inf after a step."""
    value = record.get("margin", 0.0)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(where, f"field 'margin' must be a number, got {str(value)[:40]!r}")
    try:
        margin = float(value)
    except OverflowError:
        margin = math.inf
    if not math.isfinite(margin) or abs(margin) > FLOAT32_MAX:
        spelled = getattr(value, "spelled", None) or str(value)[:40]
        raise DataError(where, f"field 'margin' must be a finite float32 number (|margin| <= {FLOAT32_MAX:.4g}), "
                               f"got {spelled}")
    return margin


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
    return Pair(prompt, _response(record, "chosen", where), _response(record, "rejected", where),
                _margin(record, where), _tools(record, where))


def _llamafactory(record: dict, where: str) -> Pair:
    """conversations [{from, value}] + chosen / rejected as one {from, value} message."""
    prompt = _sharegpt_turns(record.get("conversations"), "conversations", where)
    if "system" in record and record["system"]:
        prompt.insert(0, {"role": "system", "content": _text(record, "system", where)})
    chosen, rejected = (_one_reply(record.get(key), key, where) for key in ("chosen", "rejected"))
    return Pair(prompt, chosen, rejected, _margin(record, where))


def _one_reply(value: Any, key: str, where: str) -> str:
    messages = _sharegpt_turns(value, key, where)
    if len(messages) != 1:
        raise DataError(where, f"field {key!r} must be one assistant message, got {len(messages)} messages (the "
                               "turns before the reply go in 'conversations')")
    return _reply(messages, key, where)


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
    return Pair(prompt, _response(record, "response_chosen", where), _response(record, "response_rejected", where),
                _margin(record, where))


HH_USER, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def is_hh_transcript(text: Any) -> bool:
    return isinstance(text, str) and HH_USER in text and HH_ASSISTANT in text


def _hh_implicit_prompt(chosen: str, rejected: str, where: str) -> tuple[list[dict[str, str]], str, str]:
    """Anthropic HH-RLHF: chosen and rejected are whole transcripts sharing every turn but the last reply. The prompt
    is their common start up to the last `\n\nAssistant:` inside it; the replies are what follows it."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(where, "fields 'chosen' and 'rejected' are HH-RLHF transcripts that share no turn up to an "
                               "'Assistant:' reply")
    parts = HH_TURN.split(chosen[:cut])  # ['', 'Human', text, 'Assistant', text, ...]
    if parts[0].strip() or len(parts) < 3 or parts[-2] != "Human":
        raise DataError(where, "field 'chosen': an HH-RLHF transcript must start with 'Human:' and end its shared "
                               "part with a 'Human:' turn")
    prompt = [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
              for role, text in zip(parts[1::2], parts[2::2])]
    start = cut + len(HH_ASSISTANT)
    return prompt, chosen[start:].strip(), rejected[start:].strip()


def _trl(record: dict, where: str) -> Pair:
    """prompt + chosen + rejected (strings or message lists); without a prompt: conversations sharing every message
    but the last, HH-RLHF transcripts (implicit prompt), or two bare texts (a prompt-less pair)."""
    def side(key: str) -> tuple[list[dict[str, str]], str]:
        value = record.get(key)
        if isinstance(value, str):
            return [], _response(record, key, where)
        messages = _sharegpt_turns(value, key, where, or_text=True)
        return messages[:-1], _reply(messages, key, where)

    (chosen_context, chosen), (rejected_context, rejected) = side("chosen"), side("rejected")
    reply_in = "" if isinstance(record.get("chosen"), str) else "the last message of "
    if chosen_context != rejected_context:
        raise DataError(where, "fields 'chosen' and 'rejected' must share every message but the last")
    prompt_value = record.get("prompt")
    if prompt_value not in (None, "", []):
        prompt = ([{"role": "user", "content": _text(record, "prompt", where)}] if isinstance(prompt_value, str)
                  else _sharegpt_turns(prompt_value, "prompt", where))
        prompt += chosen_context  # explicit prompt + multi-turn chosen: rare, keep the turns
    elif is_hh_transcript(chosen) and is_hh_transcript(rejected):
        prompt, chosen, rejected = _hh_implicit_prompt(chosen, rejected, where)
        reply_in = "the last Assistant reply of "
    else:
        prompt = chosen_context  # may be empty: a prompt-less pair
    return Pair(prompt, chosen, rejected, _margin(record, where), reply_in=reply_in)


SKIP_HINT = " (pass --skip_bad_records true to drop such pairs)"


def check_pair(pair: Pair, hint: str = SKIP_HINT) -> None:
    """What a layout may hold but training cannot use (scoring still reads such records). `hint` ends the message
    of an empty reply; rm.data passes "" when such records are being skipped already."""
    for side in ("chosen", "rejected"):
        if not getattr(pair, side).strip():
            raise DataError(pair.source, f"{pair.reply_in}field {side!r} is empty: nothing to rank for training"
                                         + hint)
    if pair.chosen.strip() == pair.rejected.strip():
        raise DataError(pair.source, "fields 'chosen' and 'rejected' are identical: the pair states no preference")


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
        implicit = not record.get("prompt") and is_hh_transcript(record["chosen"])
        return ("hh-rlhf (implicit prompt)" if implicit else "trl"), _trl
    raise DataError(where, f"unknown layout: fields {sorted(keys)}; expected one of: conversations+chosen+rejected "
                           "(MedicalGPT / LLaMA-Factory), question+response_chosen+response_rejected, "
                           "prompt+chosen+rejected, chosen+rejected conversations or texts (TRL, HH-RLHF)")


# --------------------------------------------------------------------------------------------- one file
READS = {_medicalgpt_legacy: {"question", "response_chosen", "response_rejected", "system", "history", "margin"},
         _medicalgpt: {"conversations", "chosen", "rejected", "system", "tools", "margin"},
         _llamafactory: {"conversations", "chosen", "rejected", "system", "margin"},
         _trl: {"prompt", "chosen", "rejected", "margin"}}
# Fields that hold a prompt in some layout or common convention (Alpaca's instruction/input, ...): a record whose
# layout does not read one of them would lose its prompt, so it is refused rather than trained prompt-less.
PROMPT_FIELDS = ("prompt", "instruction", "input", "question", "query", "context", "system", "history",
                 "conversations")
PROMPT_ENDS = ("user", "tool")  # the reply answers a user turn or a tool result


class FileLayout:
    """Reads one file's records. Its first record fixes the layout, and whether pairs have a prompt: a later
    record of another layout, or without the prompt the others have (a misspelled field), is refused, as is a
    record with a prompt field its layout does not read, or a prompt that does not end with a user turn. Other
    fields no layout reads are counted, for one log line (`unread`)."""

    def __init__(self) -> None:
        self.name, self.parse, self.first = "", None, ""
        self.has_prompt: bool | None = None
        self.unread: Counter = Counter()

    def pair(self, record: Any, where: str) -> Pair:
        if self.parse is None:
            self.name, self.parse = detect_layout(record, where)
            self.first = where
        elif not isinstance(record, dict):
            raise DataError(where, f"expected a JSON object, got {type(record).__name__}")
        else:
            self._same_layout(record, where)
        self._nothing_lost(record, where)
        pair = self.parse(record, where)
        self._check_prompt(pair, record, where)
        self.unread.update(key for key in record if key not in READS[self.parse])
        return pair

    def _same_layout(self, record: dict, where: str) -> None:
        try:
            name, parse = detect_layout(record, where)
        except DataError:
            return  # it lacks a field: the parser names it
        if parse is not self.parse:
            raise DataError(where, f"fields {sorted(record)} are layout {name}, but this file's first record "
                                   f"({self.first}) is layout {self.name}: one layout per file")

    def _nothing_lost(self, record: dict, where: str) -> None:
        for key in PROMPT_FIELDS:
            if key not in READS[self.parse] and record.get(key) not in (None, "", [], {}):
                raise DataError(where, f"field {key!r} is not read by layout {self.name} (it reads "
                                       f"{sorted(READS[self.parse])}): its text would be lost; move it into the "
                                       "layout's prompt field (README: Data layouts)")

    def _check_prompt(self, pair: Pair, record: dict, where: str) -> None:
        field_name = "prompt" if self.parse is _trl and record.get("prompt") else \
            "chosen" if self.parse is _trl else "conversations"
        if pair.prompt and pair.prompt[-1]["role"] not in PROMPT_ENDS:
            raise DataError(where, f"field {field_name!r}: the prompt's last message has role "
                                   f"{pair.prompt[-1]['role']!r}; it must be a user message (or a tool result) for "
                                   "the reply to answer")
        if self.has_prompt is None:
            self.has_prompt = bool(pair.prompt)
        elif bool(pair.prompt) != self.has_prompt:
            raise DataError(where, f"no prompt, while this file's first record ({self.first}) has one: a missing "
                                   f"or misspelled prompt field? (fields {sorted(record)})" if self.has_prompt else
                            f"a prompt, while this file's first record ({self.first}) has none: one file holds "
                            "either prompt-less pairs or pairs with a prompt")
