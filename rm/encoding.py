"""Turning pairs into token ids: chat-template rendering, truncation, dropping, and the padding collator.

Truncation rules (decided once, logged every run): the prompt keeps its last `max_source_length` tokens (the
question nearest the answer matters most); each response keeps its first tokens but always ends with the
template's end-of-turn tokens, within `max_target_length`. A pair whose chosen and rejected ids are identical
after truncation carries no signal and is dropped.

Special tokens: text rendered by a chat template is tokenized without adding any, because the template writes
them (a Llama-3 / Gemma template writes BOS; adding the tokenizer's own would give two). This is how
`apply_chat_template(tokenize=True)`, TRL and OpenRLHF tokenize. Without a chat template the tokenizer adds its
special tokens to the prompt, as before.

Reward position (`reward_position`): "template_end" ends each sequence with the template's whole end-of-turn text
(Qwen: `<|im_end|>` and a newline), where the reward is read, as HF/TRL clients read a rendered conversation;
"eos" ends it at the EOS token (the end-of-turn cut after its EOS, or EOS appended when it holds none), as
OpenRLHF's datasets and rollouts do.

Prompt-less pairs (`prompt == []`) are rendered as a conversation of the reply alone; a template that refuses a
conversation without a user turn (raises) gets the bare reply followed by the template's end-of-turn (and the BOS
the template writes, if any). An empty reply is rendered as an assistant turn with no content.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections import Counter
from typing import Any, Callable, get_args, get_type_hints

import torch
from jinja2 import TemplateError
from tqdm.auto import tqdm

from rm.config import ConfigError, TrainConfig
from rm.data import read_pairs
from rm.layouts import DataError, Pair

ENCODING_VERSION = 2  # bump when the rules above change, so cached token ids are not reused
REWARD_POSITIONS = get_args(get_type_hints(TrainConfig)["reward_position"])  # the setting's one list
_PROBE_PROMPT = [{"role": "user", "content": "Question"}]
_PROBE_RESPONSE = "Answer"


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PairEncoder:
    """Renders and tokenizes pairs with one tokenizer, one pair of length limits and one reward position."""

    def __init__(self, tokenizer: Any, max_source_length: int, max_target_length: int,
                 reward_position: str = "template_end") -> None:
        if reward_position not in REWARD_POSITIONS:
            raise ValueError(f"reward_position must be one of {', '.join(REWARD_POSITIONS)}, got {reward_position!r}")
        if reward_position == "eos" and tokenizer.eos_token_id is None:
            raise ValueError("reward_position eos: the tokenizer has no eos_token")
        self.tokenizer = tokenizer
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.reward_position = reward_position
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self._probe: tuple[str, str, str] | None = None  # a rendered user turn + reply: the end-of-turn text
        try:
            self._probe = self._render_template(_PROBE_PROMPT, _PROBE_RESPONSE, None) if self.has_template else None
        except TemplateError as err:  # a broken template, or one that reaches for Python internals (sandboxed)
            raise ConfigError(f"the tokenizer's chat template cannot render a user turn and a reply "
                              f"({type(err).__name__}: {err})") from None

    @property
    def end_of_turn(self) -> str:
        """The text that closes an assistant turn: the template's, or the EOS token without a template."""
        return self._probe[2] if self._probe else (self.tokenizer.eos_token or "")

    def render(self, prompt: list[dict[str, str]], response: str, tools: list | None = None) -> tuple[str, str, str]:
        """(prompt text, response text, end-of-turn text) whose concatenation is the full conversation."""
        if not self.has_template:
            prompt_text = "\n\n".join(m["content"] for m in prompt) + "\n\n" if prompt else ""
            return prompt_text, response, self.tokenizer.eos_token or ""
        try:
            return self._render_template(prompt, response, tools)
        except TemplateError:  # e.g. "conversation roles must alternate user/assistant"
            if prompt:
                raise
            bos = self.tokenizer.bos_token
            return (bos if bos and self._probe[0].startswith(bos) else ""), response, self.end_of_turn

    def _render_template(self, prompt: list[dict[str, str]], response: str,
                         tools: list | None) -> tuple[str, str, str]:
        def render(messages: list[dict[str, str]], **kwargs: Any) -> str:
            return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)

        full = render(prompt + [{"role": "assistant", "content": response}])
        if prompt:
            prompt_text = render(prompt, add_generation_prompt=True)
        else:  # transformers renders no empty conversation: take what precedes a probe reply
            probe = render([{"role": "assistant", "content": _PROBE_RESPONSE}])
            prompt_text = probe[: probe.rfind(_PROBE_RESPONSE)]
        split = len(prompt_text) if full.startswith(prompt_text) else _common_prefix_length(prompt_text, full)
        reply = full[split:]
        end_of_turn = self._probe[2] if self._probe else ""
        if end_of_turn and reply.endswith(end_of_turn):  # the usual case, empty replies included
            return full[:split], reply[: len(reply) - len(end_of_turn)], end_of_turn
        end = reply.rfind(response)
        if end < 0:  # the template rewrote the response (e.g. stripped it): keep its rendering whole
            return full[:split], reply, ""
        end += len(response)
        return full[:split], reply[:end], reply[end:]

    def _ids(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"] if text or special else []

    def text_ids(self, text: str) -> list[int]:
        """Token ids of text that starts a sequence: special tokens added only when no chat template wrote them."""
        return self._ids(text, special=not self.has_template)

    def _end_ids(self, end_text: str) -> list[int]:
        ids = self._ids(end_text)
        if self.reward_position == "eos":
            eos = self.tokenizer.eos_token_id
            ids = ids[: ids.index(eos) + 1] if eos in ids else ids + [eos]
        return ids[: self.max_target_length]

    def _prompt_ids(self, prompt_text: str, stats: Counter) -> list[int]:
        ids = self.text_ids(prompt_text)
        if len(ids) > self.max_source_length:
            stats["prompt_cut"] += 1
            return ids[-self.max_source_length:]
        return ids

    def _response_ids(self, text: str, end_text: str, stats: Counter) -> list[int]:
        body, end_ids = self._ids(text), self._end_ids(end_text)
        budget = self.max_target_length - len(end_ids)
        if len(body) > budget:
            body = body[:budget]
            stats["response_cut"] += 1
        return body + end_ids

    def encode(self, pair: Pair) -> tuple[dict[str, Any] | None, Counter]:
        """Token ids of one pair, or None when it is dropped; the counter says what was cut or dropped."""
        stats: Counter = Counter()
        try:
            prompt_text, chosen_text, end_text = self.render(pair.prompt, pair.chosen, pair.tools)
            _, rejected_text, rejected_end = self.render(pair.prompt, pair.rejected, pair.tools)
        except TemplateError as err:  # e.g. "conversation roles must alternate user/assistant"
            raise DataError(pair.source, f"the tokenizer's chat template refuses this conversation "
                                         f"({type(err).__name__}: {err})") from None
        prompt_ids = self._prompt_ids(prompt_text, stats)
        sides = [prompt_ids + self._response_ids(text, end, stats)
                 for text, end in ((chosen_text, end_text), (rejected_text, rejected_end))]
        if sides[0] == sides[1]:
            stats["dropped_identical"] += 1
            return None, stats
        return {"chosen_input_ids": sides[0], "rejected_input_ids": sides[1], "margin": pair.margin}, stats

    def encode_response(self, prompt: list[dict[str, str]] | str, response: str,
                        tools: list | None = None) -> list[int]:
        """Token ids of one prompt + response, truncated as in training. A string prompt is taken as already
        rendered (the text a policy was given): the response and the end-of-turn follow it."""
        if isinstance(prompt, str):
            prompt_text, response_text, end_text = prompt, response, self.end_of_turn
        else:
            prompt_text, response_text, end_text = self.render(prompt, response, tools)
        stats: Counter = Counter()
        return self._prompt_ids(prompt_text, stats) + self._response_ids(response_text, end_text, stats)


def _fingerprint(pairs: list[Pair], encoder: PairEncoder) -> str:
    """The token cache key: the pairs, the encoding settings and the tokenizer's content (a tokenizer edited in
    place keeps its name and length: its whole tokenizer.json, or its vocabulary, is hashed)."""
    tok = encoder.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)  # vocab, merges, normalizer, added tokens, post-processor
    content = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    digest = hashlib.sha256()
    header = [ENCODING_VERSION, tok.name_or_path, len(tok), tok.chat_template or "",
              encoder.max_source_length, encoder.max_target_length, encoder.reward_position,
              hashlib.sha256(content.encode()).hexdigest(), tok.special_tokens_map]
    digest.update(json.dumps(header, default=str).encode())
    for p in pairs:
        digest.update(json.dumps([p.prompt, p.chosen, p.rejected, p.margin, p.tools], ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def encode_pairs(pairs: list[Pair], encoder: PairEncoder, cache_dir: str | None = None, name: str = "data",
                 show_progress: bool = True, log: Callable[[str], None] = print) -> "datasets.Dataset":
    """Tokenizes every pair once (cached in cache_dir when given) and logs how many were cut or dropped."""
    import datasets

    cache_path = None
    if cache_dir:
        cache_path = os.path.join(cache_dir, f"tokenized-{name}-{_fingerprint(pairs, encoder)}")
        cached = _load_cached(cache_path, log)
        if cached is not None:
            log(f"{name}: {len(cached)} pairs loaded from the token cache {cache_path}")
            return cached
    rows: dict[str, list] = {"chosen_input_ids": [], "rejected_input_ids": [], "margin": []}
    totals: Counter = Counter()
    # disable=None: tqdm draws no bar when stderr is not a terminal (captured logs get the summary line only)
    for pair in tqdm(pairs, desc=f"Tokenizing {name}", disable=None if show_progress else True):
        encoded_pair, stats = encoder.encode(pair)
        totals.update(stats)
        if encoded_pair is not None:
            for key in rows:
                rows[key].append(encoded_pair[key])
    log(f"{name}: read {len(pairs)} pairs, prompt truncated in {totals['prompt_cut']}, "
        f"responses truncated {totals['response_cut']} times, dropped {totals['dropped_identical']} "
        f"(identical after truncation), kept {len(rows['margin'])}")
    encoded = datasets.Dataset.from_dict(rows)
    if cache_path:
        _publish(encoded, cache_path)
    return encoded


def _load_cached(cache_path: str, log: Callable[[str], None]) -> "datasets.Dataset | None":
    """The cached token ids, or None: not cached, or a cache that does not load (written by an older version that
    saved in place and was killed mid-save): removed, to be rebuilt."""
    import datasets

    if not os.path.isdir(cache_path):
        return None
    try:
        return datasets.load_from_disk(cache_path)
    except Exception as err:  # noqa: BLE001  (whatever a damaged cache raises, tokenizing again is the answer)
        log(f"warning: the token cache {cache_path} does not load ({type(err).__name__}: {err}); tokenizing again")
        shutil.rmtree(cache_path, ignore_errors=True)
        return None


def _publish(encoded: "datasets.Dataset", cache_path: str) -> None:
    """Saves next to cache_path, then renames into place: a reader never sees a half-written cache, whether the
    writer is killed or another job (a sweep sharing cache_dir, another node's ranks on their own disk) writes the
    same cache at the same moment. The first rename wins; a later writer discards its own copy."""
    draft = f"{cache_path}.tmp-{socket.gethostname()}-{os.getpid()}"
    encoded.save_to_disk(draft)
    try:
        os.rename(draft, cache_path)
    except OSError:
        if not os.path.isdir(cache_path):
            raise
        shutil.rmtree(draft, ignore_errors=True)


def pad_rows(rows: list[list[int]], pad_token_id: int,
             pad_to_multiple_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask of token-id rows."""
    length = max(len(r) for r in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


class PairCollator:
    """Stacks a batch of B pairs into 2B right-padded rows: the B chosen rows first, then the B rejected rows."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        input_ids, attention_mask = pad_rows(rows, self.pad_token_id, self.pad_to_multiple_of)
        margin = torch.tensor([float(f.get("margin", 0.0)) for f in features], dtype=torch.float32)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "margin": margin,
                "num_tokens": attention_mask.sum()}


def build_dataset(location: str, encoder: PairEncoder, max_samples: int | None, name: str,
                  cache_dir: str | None = None, show_progress: bool = True,
                  log: Callable[[str], None] = print) -> "datasets.Dataset":
    """Read, validate, cap at max_samples (None or -1: all), tokenize."""
    pairs = read_pairs(location, "train" if name == "train" else "validation", cache_dir, log=log)
    if max_samples is not None and max_samples >= 0:
        pairs = pairs[:max_samples]
    return encode_pairs(pairs, encoder, cache_dir=cache_dir, name=name, show_progress=show_progress, log=log)
