"""Planner estimates next to the peak GPU memory measured in docs/zero_results.md and docs/speed_results.md.

    .venv/bin/python scripts/planner_vs_measured.py      # prints the table in docs/planner.md
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rm.plan import Workload, estimate, load_shape, setups  # noqa: E402

_, s = load_shape("qwen3-0.6b")
S = {x.name: x for x in setups(1, 1)}
rows = [  # (label, setup, tokens per micro-batch, checkpointing, lora, measured GB, source)
 ("no DeepSpeed, full, ckpt, 4 pairs plain", "no DeepSpeed", 4*2*1280, True, None, 9.4, "zero_results"),
 ("ZeRO-2, full, ckpt, 4 pairs plain", "ZeRO-2", 4*2*1280, True, None, 12.3, "zero_results"),
 ("ZeRO-3, full, ckpt, 4 pairs plain", "ZeRO-3", 4*2*1280, True, None, 13.2, "zero_results"),
 ("no DeepSpeed, LoRA, ckpt, 4 pairs plain", "no DeepSpeed", 4*2*1280, True, 8, 2.8, "zero_results"),
 ("ZeRO-2, LoRA, ckpt, 4 pairs plain", "ZeRO-2", 4*2*1280, True, 8, 3.5, "zero_results"),
 ("no DeepSpeed, full, ckpt, 1 pair plain", "no DeepSpeed", 2*1280, True, None, 10.2, "speed_results full-ft"),
 ("no DeepSpeed, full, ckpt, packed", "no DeepSpeed", 16384, True, None, 9.7, "speed_results full-ft"),
 ("no DeepSpeed, full, no ckpt, 1280-token pair plain", "no DeepSpeed", 2*1280, False, None, 15.4, "speed_results full-ft-maxlen"),
 ("no DeepSpeed, full, no ckpt, 1280-token pairs packed (5 pairs = 12800 tokens)", "no DeepSpeed", 12800, False, None, 42.5, "speed_results full-ft-maxlen"),
 ("no DeepSpeed, LoRA, ckpt, 1 pair plain", "no DeepSpeed", 2*1280, True, 8, 1.7, "speed_results lora-default"),
 ("no DeepSpeed, LoRA, ckpt, packed", "no DeepSpeed", 16384, True, 8, 3.5, "speed_results lora-default"),
]
print("| run (Qwen3-0.6B shape, 1 H200, bf16) | tokens / micro-batch (planner, full length) | estimate: states + activations (GiB) | measured peak (max_memory_allocated) | source |")
print("|---|---:|---:|---:|---|")
for label, setup, tokens, ckpt, lora, measured, src in rows:
    e = estimate(s, S[setup], 1, Workload(tokens, ckpt), lora)
    print(f"| {label} | {tokens} | {e['model_states']:.1f} + {e['activations']:.1f} = {e['model_states'] + e['activations']:.1f} | {measured} | {src} |")
