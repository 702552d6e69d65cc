import os
import shutil

import pytest
import torch

from conftest import ROOT
from rm.data import read_pairs
from rm.encoding import CHUNK_PAIRS, PairCollator, PairEncoder, encode_pairs
from rm.layouts import Pair

PROMPT = [{"role": "user", "content": "How was the hotel?"}]


def test_render_splits_prompt_response_and_end_of_turn(tokenizer):
    enc = PairEncoder(tokenizer, 1024, 256)
    prompt, response, end = enc.render(PROMPT, "Great stay.")
    assert prompt == "<|im_start|>user\nHow was the hotel?<|im_end|>\n<|im_start|>assistant\n"
    assert response == "Great stay." and end == "<|im_end|>\n"


def test_plain_concatenation_without_chat_template(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    prompt, response, end = PairEncoder(plain, 1024, 256).render(PROMPT, "Great.")
    assert prompt == "How was the hotel?\n\n" and response == "Great." and end == plain.eos_token


def test_truncation_keeps_prompt_end_and_end_of_turn(tokenizer):
    enc = PairEncoder(tokenizer, max_source_length=5, max_target_length=6)
    long_prompt = [{"role": "user", "content": "word " * 50 + "FINAL"}]
    encoded, stats = enc.encode(Pair(long_prompt, "good " * 40, "bad " * 40))
    full_prompt = tokenizer(enc.render(long_prompt, "x")[0])["input_ids"]
    end_ids = tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    for side in ("chosen_input_ids", "rejected_input_ids"):
        ids = encoded[side]
        assert len(ids) == 5 + 6
        assert ids[:5] == full_prompt[-5:]  # the prompt keeps its end
        assert ids[-len(end_ids):] == end_ids  # end-of-turn kept
    assert stats == {"prompt_cut": 1, "response_cut": 2}


def test_pairs_identical_after_truncation_are_dropped(tokenizer):
    enc = PairEncoder(tokenizer, 1024, max_target_length=4)
    encoded, stats = enc.encode(Pair(PROMPT, "same start then good", "same start then bad"))
    assert encoded is None and stats["dropped_identical"] == 1


def test_encode_pairs_logs_counts_and_keeps_the_ids_in_memory_or_memory_mapped(tokenizer, tmp_path):
    pairs = [Pair(PROMPT, "good", "bad"), Pair(PROMPT, "x " * 50 + "a", "x " * 50 + "b")]
    messages = []
    enc = PairEncoder(tokenizer, 1024, 8)
    ds = encode_pairs(pairs, enc, show_progress=False, log=messages.append)
    assert len(ds) == 1 and "read 2 pairs" in messages[0] and "dropped 1" in messages[0]
    mapped = encode_pairs(pairs, enc, show_progress=False, log=messages.append, path=str(tmp_path / "ids.arrow"))
    assert mapped.cache_files == [{"filename": str(tmp_path / "ids.arrow")}]
    assert mapped.to_list() == ds.to_list() == [enc.encode(pairs[0])[0]]


def test_collator_orders_chosen_then_rejected_and_pads_right():
    batch = PairCollator(pad_token_id=0)([
        {"chosen_input_ids": [5, 6, 7], "rejected_input_ids": [5, 8], "margin": 1.0},
        {"chosen_input_ids": [9], "rejected_input_ids": [9, 9, 9, 4], "margin": 0.0},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0], [5, 8, 0, 0], [9, 9, 9, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["margin"].tolist() == [1.0, 0.0]


def test_collator_pads_to_multiple():
    batch = PairCollator(pad_token_id=3, pad_to_multiple_of=8)(
        [{"chosen_input_ids": [1, 2], "rejected_input_ids": [1], "margin": 0.0}])
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"].dtype == torch.long


# --------------------------------------------------------------------------------------------- special tokens
def write_bos_tokenizer(folder, template_prefix: str = "{{ bos_token }}"):
    """The shipped tiny tokenizer, made Llama-3 / Gemma-like: it adds a BOS token itself (a TemplateProcessing
    post-processor) and its chat template writes one too."""
    import json
    import shutil

    from rm.model import TINY_TOKENIZER

    shutil.copytree(TINY_TOKENIZER, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    bos_id = 1 + max(*spec["model"]["vocab"].values(), *(t["id"] for t in spec["added_tokens"]))
    spec["added_tokens"].append({"id": bos_id, "content": "<bos>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    bos, seq = {"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [bos, seq],
                              "pair": [bos, seq, {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<bos>": {"id": "<bos>", "ids": [bos_id], "tokens": ["<bos>"]}}}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<bos>", "add_bos_token": True}))
    template = folder / "chat_template.jinja"
    template.write_text(template_prefix + template.read_text())
    return folder


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    from rm.model import load_tokenizer

    tok = load_tokenizer(str(write_bos_tokenizer(tmp_path_factory.mktemp("tok") / "bos")))
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds BOS on its own
    return tok


def hf_ids(tok, messages):
    """Token ids from the tokenizer's own apply_chat_template (it adds no special tokens of its own)."""
    ids = tok.apply_chat_template(messages, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("name", ["tiny", "bos"])
def test_ids_equal_the_tokenizers_own_chat_template_with_one_bos(name, tokenizer, bos_tokenizer):
    tok = {"tiny": tokenizer, "bos": bos_tokenizer}[name]
    pairs = read_pairs(str(ROOT / "data/sample/eval.jsonl"), log=lambda m: None)
    enc = PairEncoder(tok, 1024, 256)
    for pair in pairs[:20]:
        encoded, _ = enc.encode(pair)
        for side in ("chosen", "rejected"):
            ids = encoded[f"{side}_input_ids"]
            assert ids == hf_ids(tok, pair.prompt + [{"role": "assistant", "content": getattr(pair, side)}])
            if name == "bos":
                assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_without_chat_template_the_tokenizer_adds_its_bos_once(bos_tokenizer):
    import copy

    plain = copy.deepcopy(bos_tokenizer)
    plain.chat_template = None
    encoded, _ = PairEncoder(plain, 1024, 256).encode(Pair(PROMPT, "Great.", "Bad."))
    ids = encoded["chosen_input_ids"]
    assert ids[0] == plain.bos_token_id and ids.count(plain.bos_token_id) == 1 and ids[-1] == plain.eos_token_id


# --------------------------------------------------------------------------------------------- reward position
def test_eos_position_ends_at_eos_and_template_end_keeps_the_whole_end_of_turn(tokenizer):
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    pair = Pair(PROMPT, "Great stay.", "Awful.")
    at_end, _ = PairEncoder(tokenizer, 1024, 256).encode(pair)
    at_eos, _ = PairEncoder(tokenizer, 1024, 256, reward_position="eos").encode(pair)
    for side in ("chosen_input_ids", "rejected_input_ids"):
        assert at_end[side][-2:] == [tokenizer.eos_token_id, *newline]  # Qwen-style: <|im_end|> then "\n"
        assert at_eos[side] == at_end[side][:-1] and at_eos[side][-1] == tokenizer.eos_token_id
    truncated, _ = PairEncoder(tokenizer, 1024, 3, reward_position="eos").encode(Pair(PROMPT, "x " * 20, "y " * 20))
    assert truncated["chosen_input_ids"][-1] == tokenizer.eos_token_id


def test_eos_is_appended_when_the_end_of_turn_holds_none(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tok.chat_template.replace("<|im_end|>", "<|endoftext|>")  # a turn closed by another token
    ids = PairEncoder(tok, 1024, 256, reward_position="eos").encode_response(PROMPT, "Fine.")
    end = tok("<|endoftext|>\n", add_special_tokens=False)["input_ids"]
    assert ids[-len(end) - 1:] == end + [tok.eos_token_id]
    with pytest.raises(ValueError, match="reward_position must be one of template_end, eos"):
        PairEncoder(tok, 1024, 256, reward_position="last")


# --------------------------------------------------------------------------------------------- prompt-less, empty
def test_prompt_less_pair_renders_the_reply_alone(tokenizer):
    enc = PairEncoder(tokenizer, 1024, 256)
    assert enc.render([], "A red car.") == ("<|im_start|>assistant\n", "A red car.", "<|im_end|>\n")
    encoded, _ = enc.encode(Pair([], "A red car.", "A car."))
    assert encoded["chosen_input_ids"] == hf_ids(tokenizer, [{"role": "assistant", "content": "A red car."}])


def test_template_that_refuses_a_conversation_without_user_falls_back_to_the_bare_reply(tmp_path):
    from rm.model import load_tokenizer

    refusing = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}"
    tok = load_tokenizer(str(write_bos_tokenizer(tmp_path / "strict", refusing + "{{ bos_token }}")))
    enc = PairEncoder(tok, 1024, 256)
    assert enc.render([], "A red car.") == ("<bos>", "A red car.", "<|im_end|>\n")
    encoded, _ = enc.encode(Pair([], "A red car.", "A car."))
    assert encoded["chosen_input_ids"] == tok("<bos>A red car.<|im_end|>\n", add_special_tokens=False)["input_ids"]


def test_empty_reply_is_the_end_of_turn_alone(tokenizer):
    enc = PairEncoder(tokenizer, 1024, 256)
    prompt_text, _, _ = enc.render(PROMPT, "x")
    assert enc.render(PROMPT, "") == (prompt_text, "", "<|im_end|>\n")
    encoded, _ = enc.encode(Pair(PROMPT, "Great stay.", ""))
    assert encoded["rejected_input_ids"] == hf_ids(tokenizer, PROMPT + [{"role": "assistant", "content": ""}])


def test_string_prompt_is_taken_as_rendered_and_gets_the_end_of_turn(tokenizer, bos_tokenizer):
    for tok in (tokenizer, bos_tokenizer):
        enc = PairEncoder(tok, 1024, 256)
        rendered = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
        assert enc.encode_response(rendered, "Great stay.") == enc.encode_response(PROMPT, "Great stay.")


def test_rendered_text_gets_no_second_bos(bos_tokenizer):
    """rm.score's text mode: a text rendered with the template already starts with BOS."""
    rendered = bos_tokenizer.apply_chat_template(PROMPT + [{"role": "assistant", "content": "Fine."}], tokenize=False)
    ids = PairEncoder(bos_tokenizer, 1024, 256).text_ids(rendered)
    assert ids == hf_ids(bos_tokenizer, PROMPT + [{"role": "assistant", "content": "Fine."}])
    assert ids.count(bos_tokenizer.bos_token_id) == 1


# --------------------------------------------------------------------------------------------- batched = per pair
def varied_pairs() -> list[Pair]:
    """Pairs that take every branch of the encoding: long prompts cut, long replies cut, multi-turn prompts with a
    system turn, prompt-less pairs, empty replies, pairs identical after truncation, margins; more than one chunk."""
    words = "the hotel was clean and quiet but the breakfast came late every single day".split()
    pairs = []
    for i in range(CHUNK_PAIRS + 300):
        text = lambda n, shift=0: " ".join(words[(i + shift + k) % len(words)] for k in range(n))  # noqa: E731
        kind = i % 6
        if kind == 0:
            prompt = [{"role": "user", "content": text(400)}]  # cut to its end
        elif kind == 1:
            prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text(5)},
                      {"role": "assistant", "content": text(7, 3)}, {"role": "user", "content": text(4, 5)}]
        elif kind == 2:
            prompt = []
        else:
            prompt = [{"role": "user", "content": text(i % 40 + 1)}]
        chosen = text(i % 300 + 1, 1) if kind != 4 else ""
        rejected = chosen[: len(chosen) // 2] + " no" if kind != 5 else chosen  # kind 5: dropped unless margins
        pairs.append(Pair(prompt, chosen, rejected if kind != 5 else chosen + " " * (i % 2), margin=float(i % 3)))
    return pairs


@pytest.mark.parametrize("reward_position", ["template_end", "eos"])
@pytest.mark.parametrize("name", ["tiny", "bos", "plain"])
def test_batched_encoding_gives_the_ids_of_encoding_pair_by_pair(name, reward_position, tokenizer, bos_tokenizer):
    """encode_pairs (batched tokenizer calls, a tokenizer thread, Arrow int32 columns) against PairEncoder.encode,
    pair by pair: the chat-template tokenizer, one that adds BOS itself, and one without a chat template."""
    import copy

    tok = {"tiny": tokenizer, "bos": bos_tokenizer, "plain": copy.deepcopy(tokenizer)}[name]
    if name == "plain":
        tok.chat_template = None
    enc = PairEncoder(tok, max_source_length=64, max_target_length=48, reward_position=reward_position)
    pairs = varied_pairs()
    expected = [encoded for encoded, _ in map(enc.encode, pairs) if encoded is not None]
    logged = []
    batched = encode_pairs(pairs, enc, show_progress=False, log=logged.append)
    assert batched.to_list() == expected
    cut = [stats for _, stats in map(enc.encode, pairs)]
    assert sum(s["prompt_cut"] for s in cut) > 0 and sum(s["response_cut"] for s in cut) > 0
    assert f"dropped {sum(s['dropped_identical'] for s in cut)} " in logged[0] and len(expected) < len(pairs)
