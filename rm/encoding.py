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
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any, Callable, Collection, get_args, get_type_hints

import torch
from jinja2 import TemplateError
from tqdm.auto import tqdm

from rm.config import ConfigError, TrainConfig
from rm.data import read_pairs
from rm.layouts import DataError, Pair

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

    def _many_ids(self, texts: list[str], special: bool = False) -> list[list[int]]:
        """_ids of many texts in one tokenizer call (a fast tokenizer encodes the batch in Rust threads)."""
        rows: list[list[int]] = [[] for _ in texts]
        wanted = [i for i, text in enumerate(texts) if text or special]
        if wanted:
            ids = self.tokenizer([texts[i] for i in wanted], add_special_tokens=special, return_attention_mask=False,
                                 return_token_type_ids=False)["input_ids"]
            for i, row in zip(wanted, ids):
                rows[i] = row
        return rows

    def text_ids(self, text: str) -> list[int]:
        """Token ids of text that starts a sequence: special tokens added only when no chat template wrote them."""
        return self._ids(text, special=not self.has_template)

    def _end_ids(self, end_text: str) -> list[int]:
        ids = self._ids(end_text)
        if self.reward_position == "eos":
            eos = self.tokenizer.eos_token_id
            ids = ids[: ids.index(eos) + 1] if eos in ids else ids + [eos]
        return ids[: self.max_target_length]

    def _cut_prompt(self, ids: list[int], stats: Counter) -> list[int]:
        if len(ids) > self.max_source_length:
            stats["prompt_cut"] += 1
            return ids[-self.max_source_length:]
        return ids

    def _cut_response(self, body: list[int], end_ids: list[int], stats: Counter) -> list[int]:
        budget = self.max_target_length - len(end_ids)
        if len(body) > budget:
            body = body[:budget]
            stats["response_cut"] += 1
        return body + end_ids

    def _render_pair(self, pair: Pair) -> tuple[str, str, str, str, str]:
        """(prompt, chosen, chosen's end-of-turn, rejected, rejected's end-of-turn) texts of one pair."""
        try:
            prompt_text, chosen_text, chosen_end = self.render(pair.prompt, pair.chosen, pair.tools)
            _, rejected_text, rejected_end = self.render(pair.prompt, pair.rejected, pair.tools)
        except TemplateError as err:  # e.g. "conversation roles must alternate user/assistant"
            raise DataError(pair.source, f"the tokenizer's chat template refuses this conversation "
                                         f"({type(err).__name__}: {err})") from None
        return prompt_text, chosen_text, chosen_end, rejected_text, rejected_end

    def _assemble(self, prompt_ids: list[int], chosen: list[int], rejected: list[int], margin: float,
                  stats: Counter) -> dict[str, Any] | None:
        sides = [prompt_ids + chosen, prompt_ids + rejected]
        if sides[0] == sides[1]:
            stats["dropped_identical"] += 1
            return None
        return {"chosen_input_ids": sides[0], "rejected_input_ids": sides[1], "margin": margin}

    def encode(self, pair: Pair) -> tuple[dict[str, Any] | None, Counter]:
        """Token ids of one pair, or None when it is dropped; the counter says what was cut or dropped."""
        stats: Counter = Counter()
        prompt_text, chosen_text, chosen_end, rejected_text, rejected_end = self._render_pair(pair)
        prompt_ids = self._cut_prompt(self.text_ids(prompt_text), stats)
        chosen = self._cut_response(self._ids(chosen_text), self._end_ids(chosen_end), stats)
        rejected = self._cut_response(self._ids(rejected_text), self._end_ids(rejected_end), stats)
        return self._assemble(prompt_ids, chosen, rejected, pair.margin, stats), stats

    def render_many(self, pairs: list[Pair]) -> list[tuple[str, str, str, str, str]]:
        """_render_pair of every pair: the Python half of encode_many (rendering holds the GIL)."""
        return [self._render_pair(pair) for pair in pairs]

    def tokenize_many(self, rendered: list[tuple[str, str, str, str, str]]) -> tuple[list, list, list]:
        """(prompt ids, chosen body ids, rejected body ids) of rendered pairs, in three batched tokenizer calls
        (the tokenizer releases the GIL: this half can run in a thread beside render_many)."""
        prompts = self._many_ids([r[0] for r in rendered], special=not self.has_template)
        return prompts, self._many_ids([r[1] for r in rendered]), self._many_ids([r[3] for r in rendered])

    def assemble_many(self, pairs: list[Pair], rendered: list[tuple[str, str, str, str, str]],
                      tokenized: tuple[list, list, list], stats: Counter) -> list[dict[str, Any] | None]:
        """What encode gives each pair (stats summed into `stats`), from render_many and tokenize_many."""
        end_ids: dict[str, list[int]] = {}  # a template has one or two end-of-turn texts: tokenized once each
        for text in {r[2] for r in rendered} | {r[4] for r in rendered}:
            end_ids[text] = self._end_ids(text)
        return [self._assemble(self._cut_prompt(prompt, stats),
                               self._cut_response(chosen, end_ids[r[2]], stats),
                               self._cut_response(rejected, end_ids[r[4]], stats), pair.margin, stats)
                for pair, r, prompt, chosen, rejected in zip(pairs, rendered, *tokenized)]

    def encode_many(self, pairs: list[Pair], stats: Counter) -> list[dict[str, Any] | None]:
        """encode of every pair (identical ids), with batched tokenizer calls."""
        rendered = self.render_many(pairs)
        return self.assemble_many(pairs, rendered, self.tokenize_many(rendered), stats)

    def encode_response(self, prompt: list[dict[str, str]] | str, response: str,
                        tools: list | None = None) -> list[int]:
        """Token ids of one prompt + response, truncated as in training. A string prompt is taken as already
        rendered (the text a policy was given): the response and the end-of-turn follow it."""
        if isinstance(prompt, str):
            prompt_text, response_text, end_text = prompt, response, self.end_of_turn
        else:
            prompt_text, response_text, end_text = self.render(prompt, response, tools)
        stats: Counter = Counter()
        return (self._cut_prompt(self.text_ids(prompt_text), stats)
                + self._cut_response(self._ids(response_text), self._end_ids(end_text), stats))


def tokenizer_identity(encoder: PairEncoder) -> list[Any]:
    """What the token ids depend on besides the pairs: the encoding settings and the tokenizer's content (a
    tokenizer edited in place keeps its name and length: its whole tokenizer.json, or its vocabulary, is hashed)."""
    tok = encoder.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)  # vocab, merges, normalizer, added tokens, post-processor
    content = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return [tok.name_or_path, len(tok), tok.chat_template or "", encoder.max_source_length,
            encoder.max_target_length, encoder.reward_position, hashlib.sha256(content.encode()).hexdigest(),
            tok.special_tokens_map]


CHUNK_PAIRS = 2048  # pairs per tokenizer call and per Arrow record batch


def _record_batch(rows: list[dict[str, Any]]) -> "pyarrow.RecordBatch":
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    return pa.record_batch([pa.array([r["chosen_input_ids"] for r in rows], type=ids),
                            pa.array([r["rejected_input_ids"] for r in rows], type=ids),
                            pa.array([r["margin"] for r in rows], type=pa.float64())],
                           names=["chosen_input_ids", "rejected_input_ids", "margin"])


def encode_pairs(pairs: Collection[Pair], encoder: PairEncoder, name: str = "data", show_progress: bool = True,
                 log: Callable[[str], None] = print, path: str | None = None) -> "datasets.Dataset":
    """Tokenizes every pair (as PairEncoder.encode does, in batches: the next chunk renders while the tokenizer
    encodes this one) and logs how many were cut or dropped. With `path` the ids are written there as an Arrow file
    and memory-mapped (the process's memory does not grow with the data); without, they are kept in memory."""
    import datasets
    import pyarrow as pa

    schema = _record_batch([]).schema
    batches: list[pa.RecordBatch] = []
    sink = pa.OSFile(path, "wb") if path else None
    writer = pa.ipc.new_stream(sink, schema) if sink else None
    totals: Counter = Counter()
    kept = 0

    def finish(chunk: list[Pair], rendered: list, tokenizing: Future) -> None:
        nonlocal kept
        rows = [row for row in encoder.assemble_many(chunk, rendered, tokenizing.result(), totals) if row is not None]
        batch = _record_batch(rows)
        writer.write_batch(batch) if writer else batches.append(batch)
        kept += len(rows)
        progress.update(len(chunk))

    # disable=None: tqdm draws no bar when stderr is not a terminal (captured logs get the summary line only)
    with ThreadPoolExecutor(1) as tokenizer_thread, tqdm(total=len(pairs), desc=f"Tokenizing {name}",
                                                         disable=None if show_progress else True) as progress:
        pending = None
        remaining = iter(pairs)  # a list, or an rm.data.PairStream reading the pairs as they are tokenized
        while chunk := list(islice(remaining, CHUNK_PAIRS)):
            rendered = encoder.render_many(chunk)
            tokenizing = tokenizer_thread.submit(encoder.tokenize_many, rendered)
            if pending:
                finish(*pending)
            pending = chunk, rendered, tokenizing
        if pending:
            finish(*pending)
    log(f"{name}: read {len(pairs)} pairs, prompt truncated in {totals['prompt_cut']}, "
        f"responses truncated {totals['response_cut']} times, dropped {totals['dropped_identical']} "
        f"(identical after truncation), kept {kept}")
    if writer:
        writer.close()
        sink.close()
        return datasets.Dataset.from_file(path)
    return datasets.Dataset(datasets.table.InMemoryTable(pa.Table.from_batches(batches, schema)))


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
    """Read, validate, cap at max_samples (None or -1: all), tokenize (in memory). cache_dir: for hub downloads."""
    pairs = read_pairs(location, "train" if name == "train" else "validation", cache_dir, log=log)
    if max_samples is not None and max_samples >= 0:
        pairs = pairs[:max_samples]
    return encode_pairs(pairs, encoder, name=name, show_progress=show_progress, log=log)
