"""Planner estimates next to the peak GPU memory measured in docs/zero_results.md and docs/speed_results.md.

    .venv/bin/python scripts/planner_vs_measured.py      # prints the table in docs/planner.md
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rm.cli.plan import Workload, estimate, load_shape, setups  # noqa: E402

S = {x.name: x for x in setups(1, 1)}
rows = [  # (label, model, setup, tokens per micro-batch, checkpointing, lora, measured GB, source)
 ("no DeepSpeed, full, ckpt, 4 pairs plain", "qwen3-0.6b", "no DeepSpeed", 4*2*1280, True, None, 9.4, "zero_results"),
 ("ZeRO-2, full, ckpt, 4 pairs plain", "qwen3-0.6b", "ZeRO-2", 4*2*1280, True, None, 12.3, "zero_results"),
 ("ZeRO-3, full, ckpt, 4 pairs plain", "qwen3-0.6b", "ZeRO-3", 4*2*1280, True, None, 13.2, "zero_results"),
 ("no DeepSpeed, LoRA, ckpt, 4 pairs plain", "qwen3-0.6b", "no DeepSpeed", 4*2*1280, True, 8, 2.8, "zero_results"),
 ("ZeRO-2, LoRA, ckpt, 4 pairs plain", "qwen3-0.6b", "ZeRO-2", 4*2*1280, True, 8, 3.5, "zero_results"),
 ("no DeepSpeed, full, ckpt, 1 pair plain", "qwen3-0.6b", "no DeepSpeed", 2*1280, True, None, 10.2, "speed_results full-ft"),
 ("no DeepSpeed, full, ckpt, packed", "qwen3-0.6b", "no DeepSpeed", 16384, True, None, 9.7, "speed_results full-ft"),
 ("no DeepSpeed, full, no ckpt, 1280-token pair plain", "qwen3-0.6b", "no DeepSpeed", 2*1280, False, None, 15.4, "speed_results full-ft-maxlen"),
 ("no DeepSpeed, full, no ckpt, 1280-token pairs packed (5 pairs = 12800 tokens)", "qwen3-0.6b", "no DeepSpeed", 12800, False, None, 42.5, "speed_results full-ft-maxlen"),
 ("no DeepSpeed, LoRA, ckpt, 1 pair plain", "qwen3-0.6b", "no DeepSpeed", 2*1280, True, 8, 1.7, "speed_results lora-default"),
 ("no DeepSpeed, LoRA, ckpt, packed", "qwen3-0.6b", "no DeepSpeed", 16384, True, 8, 3.5, "speed_results lora-default"),
 # second GPU session (speed_results run 3, pretrained_results GPU table)
 ("ZeRO-2 (1 process), full, ckpt, packed", "qwen3-0.6b", "ZeRO-2", 16384, True, None, 12.3, "speed_results full-ft-zero2"),
 ("no DeepSpeed, full, ckpt, packed, compiled", "qwen3-0.6b", "no DeepSpeed", 16384, True, None, 9.3, "speed_results full-ft-compile"),
 ("no DeepSpeed, full, no ckpt, 1280-token pairs packed (8 pairs = 20480 tokens)", "qwen3-0.6b", "no DeepSpeed", 20480, False, None, 54.1, "speed_results full-ft-maxlen"),
 ("same, compiled", "qwen3-0.6b", "no DeepSpeed", 20480, False, None, 35.5, "speed_results full-ft-maxlen-compile"),
 ("SmolLM2-135M, no DeepSpeed, full, no ckpt, 16 sentiment pairs (16 + 48 tokens)", "smollm2-135m", "no DeepSpeed", 16*2*64, False, None, 3.17, "pretrained_results sentiment"),
 ("SmolLM2-135M, no DeepSpeed, full, no ckpt, 16 dpo_en_demo pairs (512 + 512 tokens)", "smollm2-135m", "no DeepSpeed", 16*2*1024, False, None, 22.8, "pretrained_results dpo_en_demo"),
]
print("| run (1 H200, bf16; Qwen3-0.6B shape unless named) | tokens / micro-batch (planner, full length) | estimate: states + activations (GiB) | measured peak (max_memory_allocated) | source |")
print("|---|---:|---:|---:|---|")
for label, model, setup, tokens, ckpt, lora, measured, src in rows:
    e = estimate(load_shape(model)[1], S[setup], 1, Workload(tokens, ckpt), lora)
    print(f"| {label} | {tokens} | {e['model_states']:.1f} + {e['activations']:.1f} = {e['model_states'] + e['activations']:.1f} | {measured} | {src} |")
