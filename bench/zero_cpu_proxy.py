"""ZeRO's per-step host cost on one process, measured on CPU: the GPU rows of issue 27 without a GPU.

    python bench/zero_cpu_proxy.py                                   # LoRA, no checkpointing: nods z1 z2 z3
    python bench/zero_cpu_proxy.py --rows nods z3 z3-persist --use_peft false --gradient_checkpointing true

On one GPU the SmolLM2-135M-shape LoRA step is host-bound (~290 ms of Python and launches for ~2.5 ms of
arithmetic), and ZeRO-3 adds DeepSpeed's per-module Python hooks to it. This runs the same train.py on a model of
the same depth and layout (random Llama, 30 layers, like SmolLM2-135M, but hidden 64: the arithmetic stays small
on CPU too), fp32, one process, through `accelerate launch` as users run it: no DeepSpeed
(accelerate_configs/cpu.yaml) against the committed ZeRO-1/2/3 yamls with `--num_processes 1`, and against the
candidates of bench/zero_variants.py (throwaway copies; fp32). Prints pairs/s (mean of the logged windows after
the first, as bench/gpu_speed.sh) and the ratio to no DeepSpeed. Rows run one after another (2-core machines:
one process at a time); OMP_NUM_THREADS=1 unless set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from zero_variants import VARIANTS, write_variant  # noqa: E402

COMMITTED = {"nods": "cpu.yaml", "z1": "zero1_1node.yaml", "z2": "zero2_1node.yaml", "z3": "zero3_1node.yaml"}


def make_deep_tiny(path: Path, layers: int) -> Path:
    """A random Llama reward model of SmolLM2-135M's depth and layout (tied embeddings, grouped key-value heads),
    hidden 64, with the repo's tiny tokenizer; built once."""
    if (path / "config.json").exists():
        return path
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rm.model import TINY, load_tokenizer

    tokenizer = load_tokenizer(TINY)
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        tie_word_embeddings=True, num_labels=1, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def launch(row: str, work: Path) -> tuple[list[str], Path]:
    """accelerate launch (yaml, train.py) for a row: a committed yaml, or a zero_variants copy."""
    if row in COMMITTED:
        yaml, script = REPO / "accelerate_configs" / COMMITTED[row], REPO / "train.py"
    else:
        dest = work / f"variant_{row}"
        write_variant(row, dest, bf16=False)
        yaml = dest / "accelerate_configs" / f"zero{VARIANTS[row]['stage']}_1node.yaml"
        script = dest / "train.py"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(yaml), "--num_processes", "1",
            "--mixed_precision", "no", str(script)], script.parent


def rate(output_dir: Path) -> float:
    history = json.loads((output_dir / "metrics.json").read_text())["history"]
    windows = [h["train/pairs_per_s"] for h in history if "train/pairs_per_s" in h]
    return statistics.mean(windows[1:] or windows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=["nods", "z1", "z2", "z3"],
                        choices=[*COMMITTED, *VARIANTS])
    parser.add_argument("--use_peft", default="true")
    parser.add_argument("--gradient_checkpointing", default="false")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of 8 pairs; windows of 5")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--train_file", default=str(REPO / "data" / "sample" / "train.jsonl"))
    parser.add_argument("--work", default="/tmp/zero_cpu_proxy")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags (last)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = make_deep_tiny(work / f"llama{args.layers}_h64", args.layers)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/torch_ext")}
    results: dict[str, tuple[float, float]] = {}
    for port, row in enumerate(args.rows, start=29790):
        cmd, cwd = launch(row, work)
        out = work / f"out_{row}"
        cmd[3:3] = ["--main_process_port", str(port)]
        cmd += ["--model_name_or_path", str(model), "--train_file_dir", args.train_file, "--validation_file_dir",
                "none", "--report_to", "none", "--logging_steps", "5", "--max_steps", str(args.steps),
                "--overwrite_output_dir", "true", "--output_dir", str(out), "--use_peft", args.use_peft,
                "--gradient_checkpointing", args.gradient_checkpointing, *args.extra]
        start = time.time()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        wall = time.time() - start
        (work / f"log_{row}.txt").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print(f"{row}: failed (rc {proc.returncode}), log {work / f'log_{row}.txt'}:\n{proc.stderr[-2000:]}")
            results[row] = (float("nan"), wall)
            continue
        results[row] = (rate(out), wall)
        print(f"{row}: {results[row][0]:.2f} pairs/s, {wall:.0f} s", flush=True)
    base = results.get("nods", (float("nan"), 0))[0]
    print(f"\n| row (CPU, Llama 30x64 fp32, LoRA {args.use_peft}, checkpointing {args.gradient_checkpointing}, "
          f"{args.steps} steps of 8 pairs) | pairs/s | x no DeepSpeed | whole run s |\n|---|---:|---:|---:|")
    for row, (pairs, wall) in results.items():
        print(f"| {row} | {pairs:.2f} | {pairs / base:.2f} | {wall:.0f} |")
    return 0 if all(r == r for r, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
