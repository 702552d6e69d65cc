"""Builds rm/assets/tiny_tokenizer: a 4k-token byte-level BPE tokenizer with a ChatML chat template.

It serves the `tiny` model preset (quickstart, tests). Byte-level, so it encodes any text; trained on the
embedded sample data plus, when present, the English sentences of ../shared/data (MIT / Apache-2.0 sources).
Run: python scripts/make_tiny_tokenizer.py
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus() -> list[str]:
    texts = []
    files = sorted((ROOT / "data" / "sample").glob("*.jsonl"))
    files += [p for p in [ROOT.parent / "shared" / "data" / "sentiment_pairs_en.jsonl"] if p.exists()]
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [str(v) for k, v in row.items() if isinstance(v, str)]
            texts += [m["value"] for m in row.get("conversations", [])]
    return texts


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL[1:])
    fast.chat_template = CHATML
    out = ROOT / "rm" / "assets" / "tiny_tokenizer"
    fast.save_pretrained(out)
    print(f"saved {len(fast)} tokens to {out}")


if __name__ == "__main__":
    main()
