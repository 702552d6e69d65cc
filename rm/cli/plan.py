"""Which accelerate yaml fits? Per-GPU memory estimates for full fine-tuning and LoRA under every ZeRO setup.

    python -m rm.plan --model qwen3-32b --gpus-per-node 8 --nodes 1 --gpu-memory 80

`--model` takes a model folder or config.json (read offline), or a preset name (`--list-presets`). The estimate
adds, per GPU (bytes; P = all parameters, T = trainable ones, N = GPUs over all nodes):

  model states  DeepSpeed bf16: bf16 weights (2) and gradients (2), and per trainable parameter 16 bytes of fp32
                optimizer partition (master weight, Adam m and v, the gradient in fp32)
    no DeepSpeed  full: 16P (fp32 weights, grads, Adam m, v under bf16 autocast)   LoRA: 2P + 16T
    ZeRO-1        2P + 2T + 16T/N                 ZeRO-2: 2P + (2T + 16T)/N
    ZeRO-3        (2P + 2T + 16T)/N + the gathered layers (two layers, or the embedding if larger)
    offload       the fp32 partition (16T/N) moves to CPU memory; ZeRO-3 parameter offload also moves the bf16
                  weights (only the gathered layers stay on GPU)
  activations   tokens per micro-batch x layers x bytes per token per layer (bf16):
                  stored for backward: 12h + 4 q_dim + 4 kv_dim + 8 I   (inputs of norms, q/k/v, attention output,
                                                                          the gated MLP's gate, up, act, product)
                  with activation checkpointing: 2h per layer kept + one layer's full set during recomputation
                tokens per micro-batch = 2 x pairs per micro-batch x (max_source + max_target), or with packing
                (train.py's default) up to max_tokens_per_micro_batch
  overhead      CUDA context, kernels' workspaces and communication buckets: 1.5 GiB (+ 2 x reduce bucket
                bf16 for ZeRO-1/2)

Estimates are upper bounds at full length (real batches are shorter) and ignore allocator fragmentation; compare
them with measured peaks in docs/planner.md. The recommendation picks the first set-up that fits, in the order of
the original scripts' advice: no DeepSpeed (one GPU), ZeRO-2 + activation checkpointing (up to ~13B), ZeRO-2 +
optimizer offload (~32B), ZeRO-3, ZeRO-3 + parameter and optimizer offload with tuned buckets (65B and up).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.hf_argparser import string_to_bool

from rm.cli import DefaultsHelpFormatter, OneLineParser
from rm.config import TrainConfig

GIB = 1024 ** 3
OVERHEAD_BYTES = 1.5 * GIB
FP32_PARTITION_BYTES = 16  # per trainable parameter: fp32 master weight, Adam m, Adam v, fp32 gradient

# Shapes of common models (public config.json values), so the planner works without a hub.
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, intermediate_size=3072, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, qk_norm=True),
    "qwen3-1.7b": dict(hidden_size=2048, num_hidden_layers=28, intermediate_size=6144, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, qk_norm=True),
    "qwen3-4b": dict(hidden_size=2560, num_hidden_layers=36, intermediate_size=9728, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, qk_norm=True),
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, intermediate_size=12288, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, qk_norm=True),
    "qwen3-14b": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=17408, num_attention_heads=40,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936, qk_norm=True),
    "qwen3-32b": dict(hidden_size=5120, num_hidden_layers=64, intermediate_size=25600, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936, qk_norm=True),
    "llama-2-7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-2-13b": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000),
    "llama-3-70b": dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256),
    "qwen2.5-72b": dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=29568, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=152064, qkv_bias=True),
}

# The hub model each preset describes, so a printed command runs as it is (network or a filled HF cache; the Llama
# repositories are gated: `hf auth login` after accepting their licence).
HUB_NAMES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M", "qwen3-0.6b": "Qwen/Qwen3-0.6B",
             "qwen3-1.7b": "Qwen/Qwen3-1.7B", "qwen3-4b": "Qwen/Qwen3-4B", "qwen3-8b": "Qwen/Qwen3-8B",
             "qwen3-14b": "Qwen/Qwen3-14B", "qwen3-32b": "Qwen/Qwen3-32B", "llama-2-7b": "meta-llama/Llama-2-7b-hf",
             "llama-2-13b": "meta-llama/Llama-2-13b-hf", "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
             "qwen2.5-72b": "Qwen/Qwen2.5-72B"}
SAMPLE_DATA = "data/sample/train.jsonl"  # train.py's default: the printed commands run on it until replaced
# multi-node commands read these from the environment, and stop at once, saying so, while they are unset
NODE_RANK = '"${NODE_RANK:?export NODE_RANK=the rank of this node, 0 on the master}"'
MASTER_ADDR = '"${MASTER_ADDR:?export MASTER_ADDR=the address of node 0}"'


class PlanError(ValueError):
    """The model shape cannot be read."""


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a decoder-only model config (gated MLP, GQA attention)."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    attention_bias: bool = False  # Llama's flag: biases on q, k, v and o
    qkv_bias: bool = False  # Qwen2's fixed biases on q, k, v only
    qk_norm: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "config") -> "Shape":
        for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size"):
            if not isinstance(config.get(key), int):
                raise PlanError(f"{where}: field {key!r} missing or not an integer (a decoder-only LM config needed)")
        heads = config["num_attention_heads"]
        return cls(hidden_size=config["hidden_size"], num_hidden_layers=config["num_hidden_layers"],
                   intermediate_size=config["intermediate_size"], num_attention_heads=heads,
                   num_key_value_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   vocab_size=config["vocab_size"], attention_bias=bool(config.get("attention_bias")),
                   qkv_bias=bool(config.get("qkv_bias") or config.get("model_type") == "qwen2"),
                   qk_norm=bool(config.get("qk_norm") or config.get("model_type") == "qwen3"))

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of one decoder layer: q, k, v, o, gate, up, down."""
        h, i = self.hidden_size, self.intermediate_size
        return [(h, self.q_dim), (h, self.kv_dim), (h, self.kv_dim), (self.q_dim, h), (h, i), (h, i), (i, h)]

    def layer_parameters(self) -> int:
        weights = sum(a * b for a, b in self.linear_shapes())
        bias = (self.q_dim + 2 * self.kv_dim if self.attention_bias or self.qkv_bias else 0) + \
            (self.hidden_size if self.attention_bias else 0)
        norms = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return weights + bias + norms

    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    def parameters(self) -> int:
        """Embedding + layers + final norm + the score head (h x 1); a sequence classifier has no LM head."""
        h = self.hidden_size
        return self.embedding_parameters() + self.num_hidden_layers * self.layer_parameters() + h + h

    def lora_parameters(self, rank: int) -> int:
        """LoRA A and B on every linear layer, plus the fully trained score head."""
        per_layer = sum(rank * (a + b) for a, b in self.linear_shapes())
        return self.num_hidden_layers * per_layer + self.hidden_size

    def activation_bytes_per_token_layer(self) -> int:
        """bf16 activations one decoder layer keeps per token for backward (flash/SDPA: no s x s matrix)."""
        return 12 * self.hidden_size + 4 * self.q_dim + 4 * self.kv_dim + 8 * self.intermediate_size


def load_shape(model: str) -> tuple[str, Shape]:
    """(name, shape) from a preset name, a config.json, or a model folder holding one. Never reaches a hub."""
    key = model.lower().split("/")[-1]
    if key in PRESETS and not Path(model).exists():
        return key, Shape.from_config(PRESETS[key], key)
    path = Path(model)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise PlanError(f"{model}: not a preset ({', '.join(PRESETS)}), a config.json, nor a folder holding one")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise PlanError(f"{config_path}:{err.lineno}: malformed JSON: {err.msg}") from None
    config = config.get("text_config", config)  # multimodal wrappers keep the LM's shape here
    return str(path), Shape.from_config(config, str(config_path))


@dataclass(frozen=True)
class Setup:
    name: str
    yaml: str
    zero_stage: int  # 0: no DeepSpeed
    offload_optimizer: bool = False
    offload_params: bool = False


def setups(num_nodes: int, world_size: int) -> list[Setup]:
    """Candidate set-ups in the order of the original advice (cheapest in speed first)."""
    topology = "1node" if num_nodes == 1 else "2node"
    candidates = [Setup("no DeepSpeed", "debug_1gpu.yaml", 0)] if world_size == 1 else []
    candidates += [
        Setup("ZeRO-1", f"zero1_{topology}.yaml", 1),
        Setup("ZeRO-2", f"zero2_{topology}.yaml", 2),
        Setup("ZeRO-2 + optimizer offload", "zero2_offload.yaml", 2, offload_optimizer=True),
        Setup("ZeRO-3", f"zero3_{topology}.yaml", 3),
        Setup("ZeRO-3 + parameter and optimizer offload", "zero3_offload.yaml", 3, True, True),
    ]
    return candidates


RECOMMENDATION_ORDER = ("no DeepSpeed", "ZeRO-2", "ZeRO-2 + optimizer offload", "ZeRO-3",
                        "ZeRO-3 + parameter and optimizer offload")


@dataclass(frozen=True)
class Workload:
    """What one GPU processes: tokens per micro-batch, and whether activations are checkpointed."""

    tokens_per_micro_batch: int
    gradient_checkpointing: bool


def tokens_per_micro_batch(cfg: TrainConfig) -> int:
    """Worst case: every sequence at full length; packing fills micro-batches up to its token budget."""
    plain = 2 * cfg.per_device_train_batch_size * (cfg.max_source_length + cfg.max_target_length)
    if not cfg.packing:
        return plain
    return max(plain, min(cfg.max_tokens_per_micro_batch, plain * cfg.gradient_accumulation_steps))


def model_state_bytes(shape: Shape, setup: Setup, world_size: int, lora_rank: int | None) -> tuple[float, float]:
    """(GPU bytes, CPU bytes) per process for weights, gradients and optimizer states."""
    total = shape.parameters()
    trainable = shape.lora_parameters(lora_rank) if lora_rank else total
    frozen = total - trainable if lora_rank else 0
    n = world_size
    if setup.zero_stage == 0:
        if lora_rank:  # bf16 frozen base, fp32 trainable weights, grads and Adam states
            return 2 * frozen + 16 * trainable, 0.0
        return 16 * total, 0.0
    weights = 2 * total  # bf16 (frozen and trainable)
    grads = 2 * trainable
    optimizer = FP32_PARTITION_BYTES * trainable
    gpu = cpu = 0.0
    if setup.zero_stage == 3:
        gathered = 2 * max(2 * shape.layer_parameters(), shape.embedding_parameters())
        if setup.offload_params:
            gpu, cpu = gathered, weights / n
        else:
            gpu = weights / n + gathered
        gpu += grads / n
    else:
        gpu = weights + (grads / n if setup.zero_stage == 2 else grads)
    if setup.offload_optimizer:
        cpu += optimizer / n
    else:
        gpu += optimizer / n
    return gpu, cpu


def activation_bytes(shape: Shape, workload: Workload) -> float:
    per_layer = shape.activation_bytes_per_token_layer() * workload.tokens_per_micro_batch
    if workload.gradient_checkpointing:
        return shape.num_hidden_layers * 2 * shape.hidden_size * workload.tokens_per_micro_batch + per_layer
    return shape.num_hidden_layers * per_layer


def estimate(shape: Shape, setup: Setup, world_size: int, workload: Workload,
             lora_rank: int | None) -> dict[str, float]:
    """Per-GPU memory in GiB: model states, activations, overhead and their total; CPU memory per process."""
    gpu_states, cpu_states = model_state_bytes(shape, setup, world_size, lora_rank)
    activations = activation_bytes(shape, workload)
    overhead = OVERHEAD_BYTES + (2 * 2 * shape.hidden_size ** 2 if setup.zero_stage in (1, 2) else 0)
    return {"model_states": gpu_states / GIB, "activations": activations / GIB, "overhead": overhead / GIB,
            "total": (gpu_states + activations + overhead) / GIB, "cpu_per_process": cpu_states / GIB}


def recommend(shape: Shape, num_nodes: int, gpus_per_node: int, gpu_memory_gib: float, workload: Workload,
              lora_rank: int | None, headroom: float = 0.9) -> tuple[Setup | None, dict[str, float] | None]:
    """The first set-up, in the original advice's order, whose estimate fits in headroom x GPU memory."""
    world_size = num_nodes * gpus_per_node
    by_name = {s.name: s for s in setups(num_nodes, world_size)}
    for name in RECOMMENDATION_ORDER:
        setup = by_name.get(name)
        if setup is None:
            continue
        result = estimate(shape, setup, world_size, workload, lora_rank)
        if result["total"] <= headroom * gpu_memory_gib:
            return setup, result
    return None, None


def size_advice(parameters: int) -> str:
    if parameters <= 13.5e9:
        return "<= 13B: ZeRO-2 + activation checkpointing"
    if parameters < 60e9:
        return "~32B: ZeRO-2 + optimizer offload"
    return ">= 65B: ZeRO-3 + parameter and optimizer offload, tuned buckets"


def launch_command(setup: Setup, num_nodes: int, gpus_per_node: int, model: str, lora: bool) -> str:
    """A command that runs as printed from the repository root: the model folder, or the preset's hub name; the
    embedded sample as the data (the user replaces it); on several nodes NODE_RANK and MASTER_ADDR from the
    environment."""
    model = HUB_NAMES.get(model, model)
    flags = (f"--model_name_or_path {model} --train_file_dir {SAMPLE_DATA} --use_peft {str(lora).lower()} "
             "--gradient_checkpointing true")
    if setup.zero_stage in (1, 2, 3) and not setup.offload_optimizer and not setup.offload_params:
        if num_nodes == 1:
            return f"bash torchrun_multi_node_multi_gpu.sh {setup.zero_stage} 1 {gpus_per_node} localhost 29500 {flags}"
        return (f"NODE_RANK={NODE_RANK} bash torchrun_multi_node_multi_gpu.sh {setup.zero_stage} {num_nodes} "
                f"{gpus_per_node} {MASTER_ADDR} 29500 {flags}")
    world = num_nodes * gpus_per_node
    nodes = (f" --num_machines {num_nodes} --machine_rank {NODE_RANK} --main_process_ip {MASTER_ADDR}"
             if num_nodes > 1 else "")
    return (f"accelerate launch --config_file accelerate_configs/{setup.yaml} --num_processes {world}{nodes} "
            f"train.py {flags}")


def report(model: str, shape: Shape, args: argparse.Namespace, cfg: TrainConfig) -> str:
    world_size = args.nodes * args.gpus_per_node
    tokens = tokens_per_micro_batch(cfg)
    lines = [f"model {model}: {shape.parameters() / 1e9:.3f}B parameters, LoRA r{args.lora_rank}: "
             f"{shape.lora_parameters(args.lora_rank) / 1e6:.1f}M trainable",
             f"{args.nodes} node(s) x {args.gpus_per_node} GPU(s) of {args.gpu_memory:g} GiB; {tokens} tokens per "
             f"micro-batch ({cfg.per_device_train_batch_size} pair(s) x 2 x {cfg.max_source_length}+"
             f"{cfg.max_target_length}{', packed' if cfg.packing else ''})",
             f"original advice by size: {size_advice(shape.parameters())}", "",
             "per-GPU GiB (model states + activations + overhead); CPU GiB per node for offload",
             f"{'set-up':44s} {'yaml':22s} {'full, ckpt':>11s} {'full, no ckpt':>14s} {'LoRA, ckpt':>11s} "
             f"{'CPU/node':>9s}"]
    for setup in setups(args.nodes, world_size):
        cells = []
        for lora, checkpointing in ((None, True), (None, False), (args.lora_rank, True)):
            result = estimate(shape, setup, world_size, Workload(tokens, checkpointing), lora)
            mark = "" if result["total"] <= 0.9 * args.gpu_memory else "!"
            cells.append(f"{result['total']:.1f}{mark}")
        cpu = estimate(shape, setup, world_size, Workload(tokens, True), None)["cpu_per_process"] * args.gpus_per_node
        lines.append(f"{setup.name:44s} {setup.yaml:22s} {cells[0]:>11s} {cells[1]:>14s} {cells[2]:>11s} "
                     f"{cpu:>9.1f}")
    lines.append("('!': above 90% of the GPU memory)")
    lines.append("")
    for label, lora in (("full fine-tuning", None), (f"LoRA r{args.lora_rank}", args.lora_rank)):
        setup, result = recommend(shape, args.nodes, args.gpus_per_node, args.gpu_memory, Workload(tokens, True), lora)
        if setup is None:
            lines.append(f"{label}: nothing fits in {args.gpu_memory:g} GiB per GPU: add GPUs or nodes, shorten "
                         "max lengths, lower max_tokens_per_micro_batch" + (", or use LoRA" if not lora else ""))
            continue
        host = result["cpu_per_process"] * args.gpus_per_node
        lines.append(f"{label}: {setup.name} with activation checkpointing, accelerate_configs/{setup.yaml} "
                     f"(~{result['total']:.1f} GiB per GPU" + (f"; needs ~{host:.0f} GiB of host memory on every "
                                                            "node for the offloaded states" if host else "") + ")")
        lines.append(f"    {launch_command(setup, args.nodes, args.gpus_per_node, model, lora is not None)}")
    lines += ["", f"The commands run as printed from the repository root, on the embedded sample: replace "
              f"--train_file_dir {SAMPLE_DATA} with your data (README: Your data)."
              + (" A hub name needs network or a filled HF cache." if model in HUB_NAMES else "")
              + (" Export NODE_RANK and MASTER_ADDR on every node first." if args.nodes > 1 else "")]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TrainConfig()
    parser = OneLineParser(prog="python -m rm.plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", help="preset name, config.json or model folder (offline)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (processes) on each node")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank, help="LoRA rank of the LoRA column")
    parser.add_argument("--per-device-train-batch-size", type=int, default=defaults.per_device_train_batch_size,
                        help="pairs per micro-batch per GPU")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=defaults.gradient_accumulation_steps,
                        help="micro-batches per optimizer step (what packing can join)")
    parser.add_argument("--max-source-length", type=int, default=defaults.max_source_length, help="prompt tokens")
    parser.add_argument("--max-target-length", type=int, default=defaults.max_target_length, help="response tokens")
    parser.add_argument("--packing", type=string_to_bool, nargs="?", const=True, default=defaults.packing,
                        help="pack each step's pairs into micro-batches of max-tokens-per-micro-batch")
    parser.add_argument("--max-tokens-per-micro-batch", type=int, default=defaults.max_tokens_per_micro_batch,
                        help="token budget of one packed micro-batch")
    parser.add_argument("--list-presets", action="store_true", help="print the presets and their sizes")
    args = parser.parse_args(argv)
    if not args.list_presets and not args.model:
        parser.error("--model is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_presets:
        print("\n".join(f"{name}: {Shape.from_config(shape).parameters() / 1e9:.2f}B"
                        for name, shape in PRESETS.items()))
        return 0
    try:
        name, shape = load_shape(args.model)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = TrainConfig(per_device_train_batch_size=args.per_device_train_batch_size,
                      gradient_accumulation_steps=args.gradient_accumulation_steps,
                      max_source_length=args.max_source_length, max_target_length=args.max_target_length,
                      packing=args.packing, max_tokens_per_micro_batch=args.max_tokens_per_micro_batch)
    print(report(name, shape, args, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
