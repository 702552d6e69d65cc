import torch

from rm.data import Pair
from rm.encoding import PairCollator, PairEncoder, encode_pairs

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


def test_encode_pairs_logs_counts_and_caches(tokenizer, tmp_path):
    pairs = [Pair(PROMPT, "good", "bad"), Pair(PROMPT, "x " * 50 + "a", "x " * 50 + "b")]
    messages = []
    enc = PairEncoder(tokenizer, 1024, 8)
    ds = encode_pairs(pairs, enc, cache_dir=str(tmp_path), show_progress=False, log=messages.append)
    assert len(ds) == 1 and "read 2 pairs" in messages[0] and "dropped 1" in messages[0]
    again = encode_pairs(pairs, enc, cache_dir=str(tmp_path), show_progress=False, log=messages.append)
    assert "token cache" in messages[-1] and again["chosen_input_ids"] == ds["chosen_input_ids"]


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
