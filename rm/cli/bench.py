"""Throughput benchmark of the real trainer: the packed fast path and the plain path side by side, in one run.

    python -m rm.bench                                   # CPU smoke: tiny model, data/sample, 4 steps
    python -m rm.bench --model qwen3-0.6b --train_file DATA.jsonl --max_steps 30 --logging_steps 10   # GPU

Every configuration runs `train.py` as a subprocess (launch to export, nothing re-implemented here), once with
`--packing true` and once with `--packing false`. Throughput is read from train.py's own logging windows (the
first window, with warm-up, is left out); time to first step is from process launch to the end of the first
optimizer step (synchronised). MFU counts 6 x non-embedding parameters FLOPs per token plus causal attention
(6 x layers x heads x head_dim x L per token of an L-token sequence), without checkpointing recompute, against the
bf16 (CPU: fp32) matmul rate measured at the start of the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rm.cli import OneLineParser
from rm.cli.plan import PRESETS

ROOT = Path(__file__).resolve().parents[2]
# Qwen3-0.6B's public config: the planner's preset plus what building a model needs beyond the memory estimate.
QWEN3_06B_SHAPE = {**{k: v for k, v in PRESETS["qwen3-0.6b"].items() if k != "qk_norm"},  # qk_norm: Qwen3 always
                   "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": True}
FULL, COMPILE = ["--use_peft", "false"], ["--torch_compile", "true"]
CKPT, NO_CKPT = ["--gradient_checkpointing", "true"], ["--gradient_checkpointing", "false"]
EAGER = ["--torch_compile", "false"]
ZERO2 = "accelerate_configs/zero2_1node.yaml"  # on one process: bf16 weights, fp32 master copy in DeepSpeed
ZERO3 = "accelerate_configs/zero3_1node.yaml"
# name: (train.py arguments, data: "train" or "maxlen", accelerate yaml or None for plain `python train.py`).
# Every row but the *-default / *-default-path ones names checkpointing and compile: it means the same whatever the
# defaults. The *-default-path rows run what train.py resolves by itself (checkpointing, compile, LoRA or not).
CONFIGS: dict[str, tuple[list[str], str, str | None]] = {
    "lora-default": (CKPT + EAGER, "train", None),  # the original defaults: LoRA r8 all-linear, 1 pair x GA 8
    "lora-default-compile": (CKPT + COMPILE, "train", None),
    "full-ft": (FULL + CKPT + EAGER, "train", None),
    "full-ft-compile": (FULL + CKPT + COMPILE, "train", None),
    "full-ft-zero2": (FULL + CKPT + EAGER, "train", ZERO2),
    "full-ft-nogc": (FULL + NO_CKPT + EAGER, "train", None),
    "full-ft-nogc-compile": (FULL + NO_CKPT + COMPILE, "train", None),
    "full-ft-maxlen": (FULL + NO_CKPT + EAGER, "maxlen", None),
    "full-ft-maxlen-default": (FULL, "maxlen", None),  # checkpointing and compile as train.py resolves them
    "full-ft-maxlen-compile": (FULL + NO_CKPT + COMPILE, "maxlen", None),
    "full-ft-maxlen-zero2": (FULL + NO_CKPT + EAGER, "maxlen", ZERO2),
    "full-ft-maxlen-zero3": (FULL + NO_CKPT + EAGER, "maxlen", ZERO3),
    "lora-default-path": ([], "train", None),
    "lora-default-path-zero2": ([], "train", ZERO2),
    "lora-default-path-zero3": ([], "train", ZERO3),
    "full-ft-default-path": (FULL, "train", None),
    "full-ft-default-path-zero2": (FULL, "train", ZERO2),
    "full-ft-default-path-zero3": (FULL, "train", ZERO3),
}


def matmul_peak_tflops(device: torch.device) -> float:
    """Median rate of a large matmul: bf16 8192^3 on CUDA, fp32 512^3 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(25):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            a @ b
            elapsed = time.perf_counter() - t0
        if i >= 5:
            times.append(elapsed)
    return 2 * n**3 / statistics.median(times) / 1e12


def build_random_model(shape: str, tokenizer: Any, num_hidden_layers: int | None = None) -> torch.nn.Module:
    """A random Qwen3 sequence-classification model (bf16, seed 0) of this shape, for the given tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rm.model import tiny_config

    if shape == "tiny":
        config = tiny_config(tokenizer)
    else:
        layers = {"num_hidden_layers": num_hidden_layers} if num_hidden_layers else {}
        config = AutoConfig.for_model("qwen3", num_labels=1, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, **{**QWEN3_06B_SHAPE, **layers})
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16)


def make_random_model(path: Path, shape: str) -> Path:
    """A random Qwen3 sequence-classification checkpoint (the tiny tokenizer beside it), built once."""
    from rm.model import TINY, load_tokenizer

    if (path / "config.json").exists():
        return path
    tokenizer = load_tokenizer(TINY)
    build_random_model(shape, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_maxlen_pairs(source: str, path: Path, pairs: int = 64) -> Path:
    """Pairs that truncation cuts to exactly max_source_length + max_target_length tokens per sequence: each
    prompt and response concatenates many texts of the source file."""
    from rm.data import read_pairs

    texts = read_pairs(source, log=lambda m: None)
    with path.open("w", encoding="utf-8") as f:
        for i in range(pairs):
            chunk = [texts[(i + j) % len(texts)] for j in range(12)]
            prompt = "\n".join(m["content"] for p in chunk for m in p.prompt) * 4
            row = {"prompt": prompt, "chosen": "\n".join(p.chosen for p in chunk) * 2,
                   "rejected": "\n".join(p.rejected for p in chunk) * 2}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def flops_per_token(model_dir: Path, data: str, max_pairs: int) -> tuple[float, float]:
    """6 x non-embedding parameters + causal attention at this data's sequence lengths (sum L^2 / sum L)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rm.encoding import PairEncoder, build_dataset
    from rm.model import load_tokenizer

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    pairs = build_dataset(data, PairEncoder(load_tokenizer(str(model_dir)), 1024, 256), max_pairs, "bench",
                          show_progress=False, log=lambda m: None)
    lengths = [len(r) for column in ("chosen_input_ids", "rejected_input_ids") for r in pairs[column]]
    context = sum(n * n for n in lengths) / sum(lengths)
    attention = 6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * context
    return 6 * params + attention, sum(lengths) / len(lengths)


def packed_matches_padded(model_dir: Path, data: str, pairs: int = 8) -> tuple[float, float]:
    """Relative difference between the rewards of packed rows (varlen attention on CUDA) and of padded rows, and
    as the bf16 noise floor, between padded rows batched together and one pair at a time."""
    from rm.attention import enable_varlen_attention, varlen_available
    from rm.batching import KeyedPairs, PackedPairCollator, model_inputs
    from rm.encoding import PairCollator, PairEncoder, build_dataset
    from rm.model import RewardModel, load_backbone, load_tokenizer

    device = torch.device("cuda")
    tokenizer = load_tokenizer(str(model_dir))
    encoded = build_dataset(data, PairEncoder(tokenizer, 1024, 256), pairs, "check", show_progress=False,
                            log=lambda m: None)
    backbone = load_backbone(str(model_dir), tokenizer, torch.bfloat16)
    if varlen_available(device):
        enable_varlen_attention(backbone)
    model = RewardModel(backbone).to(device).eval()
    padded = PairCollator(tokenizer.pad_token_id)(list(encoded))
    packed = PackedPairCollator()([KeyedPairs(encoded)[(i, 1)] for i in range(len(encoded))])
    singles = [PairCollator(tokenizer.pad_token_id)([encoded[i]]) for i in range(len(encoded))]
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        run = lambda b: model(**{k: v.to(device) if torch.is_tensor(v) else v  # noqa: E731
                                 for k, v in model_inputs(b).items()})
        batched, packed_rewards = run(padded), run(packed)
        one_by_one = torch.stack([run(b) for b in singles])  # (pairs, 2): chosen, rejected
        one_by_one = torch.cat([one_by_one[:, 0], one_by_one[:, 1]])
    relative = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return relative(packed_rewards, batched), relative(one_by_one, batched)


def run_config(name: str, packing: bool, model_dir: Path, data: str, args: argparse.Namespace,
               extra: list[str], yaml: str | None, out: Path) -> dict[str, Any]:
    output_dir = out / f"{name}-{'packed' if packing else 'plain'}"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / yaml),
                "--num_processes", "1", "--main_process_port", "29650"] if yaml else [sys.executable]
    cmd = [*launcher, str(ROOT / "train.py"), "--model_name_or_path", str(model_dir), "--train_file_dir", data,
           "--validation_file_dir", "none", "--max_train_samples", str(args.max_train_samples), "--max_steps", str(args.max_steps),
           "--logging_steps", str(args.logging_steps), "--report_to", "none", "--output_dir", str(output_dir),
           "--overwrite_output_dir", "true", "--packing", str(packing).lower(),
           "--max_tokens_per_micro_batch", str(args.max_tokens_per_micro_batch), *extra]
    if torch.cuda.is_available():
        cmd += ["--bf16", "true"]
    launched = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / f"{output_dir.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-3000:]}
    metrics = json.loads((output_dir / "metrics.json").read_text())
    info = json.loads((output_dir / "run_info.json").read_text())
    windows = [h for h in metrics["history"] if "train/tokens_per_s" in h][1:] or metrics["history"][-1:]
    return {"tokens_per_s": statistics.mean(w["train/tokens_per_s"] for w in windows),
            "pairs_per_s": statistics.mean(w["train/pairs_per_s"] for w in windows),
            "peak_memory_gb": windows[-1]["train/peak_memory_gb"],
            "first_step_s": info["first_step_unix_time"] - launched,
            "graphs_after_first_step": info["compiled_graphs"] - info["compiled_graphs_first_step"]
            if info.get("torch_compile") else None,
            "losses": [h["train/loss"] for h in metrics["history"] if "train/loss" in h]}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "qwen3-0.6b"],
                        help="random weights of this shape (the tiny tokenizer either way)")
    parser.add_argument("--train_file", default=str(ROOT / "data" / "sample" / "train.jsonl"))
    parser.add_argument("--configs", default="lora-default", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--max_train_samples", type=int, default=-1, help="-1 = all pairs of the file")
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--logging_steps", type=int, default=2)
    parser.add_argument("--max_tokens_per_micro_batch", type=int, default=16384)
    parser.add_argument("--paths", default="plain,packed", help="plain, packed or both (plain first)")
    parser.add_argument("--work_dir", default="outputs/bench", help="models, runs and logs go here")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")

    out = Path(args.work_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = matmul_peak_tflops(device)
    model_dir = make_random_model(out / f"model-{args.model}", args.model)
    data = {"train": args.train_file}
    if any(CONFIGS[n][1] == "maxlen" for n in names):
        data["maxlen"] = str(write_maxlen_pairs(args.train_file, out / "maxlen_pairs.jsonl"))
    flops = {kind: flops_per_token(model_dir, path, args.max_train_samples) for kind, path in data.items() if kind in
             {CONFIGS[n][1] for n in names}}
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
          f"measured matmul peak {peak:.1f} TFLOP/s; model {args.model} (random), tiny tokenizer", flush=True)
    if device.type == "cuda":
        packed_vs_padded, noise = packed_matches_padded(model_dir, args.train_file)
        print(f"rewards, relative difference (bf16): packed vs padded {packed_vs_padded:.2e}; padded batch vs one "
              f"pair at a time {noise:.2e}", flush=True)
    results: list[dict[str, Any]] = []
    print(HEADER, "-" * len(HEADER), sep="\n", flush=True)
    for name in names:
        extra, kind, yaml = CONFIGS[name]
        for packing in [path == "packed" for path in ("plain", "packed") if path in args.paths.split(",")]:
            result = run_config(name, packing, model_dir, data[kind], args, extra, yaml, out)
            result.update(config=name, path="packed" if packing else "plain", data=kind,
                          mean_sequence_tokens=flops[kind][1])
            if "tokens_per_s" in result:
                result["mfu"] = result["tokens_per_s"] * flops[kind][0] / (peak * 1e12)
            results.append(result)
            print(table_row(result, results), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"peak_tflops": peak, "results": results}, indent=1))
    return 0 if all("error" not in r for r in results) else 1


HEADER = f"{'configuration':<30}{'path':<8}{'tokens/s':>11}{'pairs/s':>9}{'MFU':>7}{'peak GB':>9}" \
         f"{'1st step s':>11}{'x plain':>9}{'recompiles':>11}"


def table_row(r: dict[str, Any], results: list[dict[str, Any]]) -> str:
    if "error" in r:
        lines = r["error"].strip().splitlines() or [""]
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1])
        return f"{r['config']:<30}{r['path']:<8} failed: {reason[:120]} (log in --work_dir)"
    plain = next((p.get("tokens_per_s") for p in results if p["config"] == r["config"] and p["path"] == "plain"),
                 None)
    ratio = r["tokens_per_s"] / plain if plain else float("nan")
    return (f"{r['config']:<30}{r['path']:<8}{r['tokens_per_s']:>11,.0f}{r['pairs_per_s']:>9.1f}"
            f"{r['mfu']:>7.1%}{r['peak_memory_gb']:>9.1f}{r['first_step_s']:>11.1f}{ratio:>9.2f}"
            f"{'-' if r['graphs_after_first_step'] is None else r['graphs_after_first_step']:>11}")


if __name__ == "__main__":
    sys.exit(main())
