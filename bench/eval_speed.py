"""Evaluation throughput of rm/evaluate.py (packed by token budget), as train.py runs it, bf16 on CUDA.

    python bench/eval_speed.py MODEL_DIR PAIRS.jsonl [MAX_PAIRS] [MAX_TOKENS]

Times collect_rewards over the pairs twice (the first pass warms up) and prints pairs/s and the metrics, which
depend on the token budget alone (there is no eval batch size to change them).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere: the repo's rm/
from rm.attention import enable_varlen_attention, varlen_available
from rm.encoding import PairEncoder, build_dataset
from rm.evaluate import collect_rewards, summarize_rewards
from rm.model import RewardModel, load_backbone, load_tokenizer


def main() -> int:
    model_dir, data = sys.argv[1], sys.argv[2]
    max_pairs = int(sys.argv[3]) if len(sys.argv) > 3 else 800
    max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 16384
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    tokenizer = load_tokenizer(model_dir)
    pairs = build_dataset(data, PairEncoder(tokenizer, 1024, 256), max_pairs, "eval", show_progress=False,
                          log=lambda m: None)
    backbone = load_backbone(model_dir, tokenizer, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    if varlen_available(accelerator.device):
        enable_varlen_attention(backbone)
    model = accelerator.prepare(RewardModel(backbone))
    for attempt in ("warm-up", "timed"):
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        rewards = collect_rewards(accelerator, model, pairs, max_tokens)
        seconds = time.perf_counter() - start
    tokens = sum(len(c) + len(r) for c, r in zip(pairs["chosen_input_ids"], pairs["rejected_input_ids"]))
    print(f"EVAL {len(pairs)} pairs ({tokens / len(pairs):.0f} tokens a pair), budget {max_tokens}: "
          f"{len(pairs) / seconds:.0f} pairs/s; {summarize_rewards(*rewards)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
