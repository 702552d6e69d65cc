"""Turning pairs into token ids: chat-template rendering, truncation, dropping, and the padding collator.

Truncation rules (decided once, logged every run): the prompt keeps its last `max_source_length` tokens (the
question nearest the answer matters most); each response keeps its first tokens but always ends with the
template's end-of-turn tokens, within `max_target_length`. A pair whose chosen and rejected ids are identical
after truncation carries no signal and is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from rm.data import Pair, load_pairs

ENCODING_VERSION = 1  # bump when the rules above change, so cached token ids are not reused


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PairEncoder:
    """Renders and tokenizes pairs with one tokenizer and one pair of length limits."""

    def __init__(self, tokenizer: Any, max_source_length: int, max_target_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def render(self, prompt: list[dict[str, str]], response: str, tools: list | None = None) -> tuple[str, str, str]:
        """(prompt text, response text, end-of-turn text) whose concatenation is the full conversation."""
        if not self.has_template:
            prompt_text = "\n\n".join(m["content"] for m in prompt) + "\n\n"
            return prompt_text, response, self.tokenizer.eos_token or ""
        def render(messages: list[dict[str, str]], **kwargs: Any) -> str:
            return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)

        prompt_text = render(prompt, add_generation_prompt=True)
        full = render(prompt + [{"role": "assistant", "content": response}])
        split = len(prompt_text) if full.startswith(prompt_text) else _common_prefix_length(prompt_text, full)
        reply = full[split:]
        end = reply.rfind(response)
        if end < 0:  # the template rewrote the response (e.g. stripped it): keep its rendering whole
            return full[:split], reply, ""
        end += len(response)
        return full[:split], reply[:end], reply[end:]

    def _ids(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"] if text else []

    def encode(self, pair: Pair) -> tuple[dict[str, Any] | None, Counter]:
        """Token ids of one pair, or None when it is dropped; the counter says what was cut or dropped."""
        stats: Counter = Counter()
        prompt_text, chosen_text, end_text = self.render(pair.prompt, pair.chosen, pair.tools)
        _, rejected_text, rejected_end = self.render(pair.prompt, pair.rejected, pair.tools)
        prompt_ids = self._ids(prompt_text, special=True)
        if len(prompt_ids) > self.max_source_length:
            prompt_ids = prompt_ids[-self.max_source_length:]
            stats["prompt_cut"] += 1
        sides = []
        for text, end in ((chosen_text, end_text), (rejected_text, rejected_end)):
            body, end_ids = self._ids(text), self._ids(end)[: self.max_target_length]
            budget = self.max_target_length - len(end_ids)
            if len(body) > budget:
                body = body[:budget]
                stats["response_cut"] += 1
            sides.append(prompt_ids + body + end_ids)
        if sides[0] == sides[1]:
            stats["dropped_identical"] += 1
            return None, stats
        return {"chosen_input_ids": sides[0], "rejected_input_ids": sides[1], "margin": pair.margin}, stats


def _fingerprint(pairs: list[Pair], encoder: PairEncoder) -> str:
    tok = encoder.tokenizer
    digest = hashlib.sha256()
    header = [ENCODING_VERSION, tok.name_or_path, len(tok), tok.chat_template or "",
              encoder.max_source_length, encoder.max_target_length]
    digest.update(json.dumps(header).encode())
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
        if os.path.isdir(cache_path):
            encoded = datasets.load_from_disk(cache_path)
            log(f"{name}: {len(encoded)} pairs loaded from the token cache {cache_path}")
            return encoded
    rows: dict[str, list] = {"chosen_input_ids": [], "rejected_input_ids": [], "margin": []}
    totals: Counter = Counter()
    for pair in tqdm(pairs, desc=f"Tokenizing {name}", disable=not show_progress):
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
        encoded.save_to_disk(cache_path)
    return encoded


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
    pairs = load_pairs(location, cache_dir=cache_dir, split="train" if name == "train" else "validation", log=log)
    if max_samples is not None and max_samples >= 0:
        pairs = pairs[:max_samples]
    return encode_pairs(pairs, encoder, cache_dir=cache_dir, name=name, show_progress=show_progress, log=log)
