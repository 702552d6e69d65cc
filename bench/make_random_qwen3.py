"""Write a randomly initialised Qwen3-0.6B-shaped reward model (+ the repo's tiny tokenizer) to a folder.

    python bench/make_random_qwen3.py /tmp/qwen3-0.6b-random

The shape is Qwen3-0.6B's (28 layers, hidden 1024, intermediate 3072, 16 query / 8 key-value heads of dim 128,
vocab 151936); the weights are random because none can be downloaded on the benchmark machines, and the tokenizer
is rm/assets/tiny_tokenizer because Qwen's is not available offline (it splits Chinese text into more tokens than
Qwen's would, which changes sequence lengths, not the cost per token). The score head is saved too, so every run
starts from the same weights whatever the ZeRO stage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rm.cli.bench import build_random_model  # noqa: E402
from rm.model import TINY, load_tokenizer  # noqa: E402


def main(out_dir: str, num_hidden_layers: int) -> None:
    tokenizer = load_tokenizer(TINY)
    model = build_random_model("qwen3-0.6b", tokenizer, num_hidden_layers)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print(f"{out_dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num_hidden_layers", type=int, default=28, help="fewer for a quick local check")
    args = parser.parse_args()
    main(args.out_dir, args.num_hidden_layers)
