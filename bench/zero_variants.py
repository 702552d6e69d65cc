"""Candidate DeepSpeed settings for ZeRO on one GPU, run through the launcher as users run it, without editing the
committed yamls: each variant is a throwaway copy of the launcher, train.py, rm/ and accelerate_configs/ whose
zero<stage>_1node.yaml points at a DeepSpeed json holding the variant (an accelerate yaml cannot express these
settings; as accelerate_configs/zero3_offload.yaml does, bf16 then moves into the json).

    python bench/zero_variants.py NAME DEST      # writes DEST/, prints the launcher to run and the train.py flags
    python bench/zero_variants.py --list         # the variants, one a line

bench/gpu_speed.sh runs them (issue 27). Why each candidate (DeepSpeed 0.19 names and defaults):
- z3-persist: parameters up to 1e7 elements stay whole on every rank (default 1e5): no gather or release per
  module in forward and backward; costs memory on several GPUs (SmolLM2-135M's matrices are <= 0.9M elements, so
  all but the embedding persist).
- z3-auto: accelerate's hidden-size values ("auto": reduce bucket hidden^2, prefetch 0.9 hidden^2, persistence
  10 hidden), what a HF-Trainer-style json gets.
- z3-buckets: prefetch 5e8 and max live 1e9 parameters, reduce bucket 5e8, overlap_comm and contiguous gradients.
- z3-tuned: z3-persist + z3-buckets.
- z3-per-module: `leaf_module` named, empty: DeepSpeed's per-submodule hooks, as before train.py made each decoder
  layer a leaf (rm.model.set_zero3_leaf_layers), for the before/after in one call.
- z3-plain-linear: memory_efficient_linear false: torch's own F.linear in place of DeepSpeed's autograd Function
  (one Python Function per linear and pass); torch then saves each gathered weight for backward, which keeps it
  alive after ZeRO-3 releases it (a measurement only, not a candidate for the yamls).
- z3-deepcompile: DeepSpeed's compiler passes for ZeRO-3 (compile.deepcompile, accelerate's dynamo backend
  inductor so that accelerate calls engine.compile()).
- z2-overlap, z1-buckets: overlap_comm / contiguous gradients / 5e8 buckets for the lower stages.
Not a variant any more: stage3_module_granularity_threshold at or above the model's mean parameters per
module (200000 was) made the root RewardModel the one leaf (DeepSpeed prefers parents). Its inputs (token ids)
carry no gradient, so its leaf backward hook fired as the first output gradient arrived and released every
parameter before any gradient was accumulated: `output with shape [1] doesn't match the broadcast shape [1, 64]`
at the score head, the first gradient (root-caused 2026-12-05).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
BUCKETS = {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 500_000_000}
Z3_BUCKETS = {**BUCKETS, "stage3_prefetch_bucket_size": 500_000_000, "stage3_max_live_parameters": 1_000_000_000,
              "stage3_max_reuse_distance": 1_000_000_000}
VARIANTS: dict[str, dict[str, Any]] = {  # stage, zero_optimization keys, other json keys, accelerate yaml keys
    "z3-persist": {"stage": 3, "zero": {"stage3_param_persistence_threshold": 10_000_000}},
    "z3-auto": {"stage": 3, "zero": {"reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                     "stage3_param_persistence_threshold": "auto"}},
    "z3-buckets": {"stage": 3, "zero": Z3_BUCKETS},
    "z3-tuned": {"stage": 3, "zero": {**Z3_BUCKETS, "stage3_param_persistence_threshold": 10_000_000}},
    "z3-per-module": {"stage": 3, "zero": {"leaf_module": {"classes": []}}},
    "z3-plain-linear": {"stage": 3, "zero": {"memory_efficient_linear": False}},
    "z3-deepcompile": {"stage": 3, "zero": {}, "json": {"compile": {"deepcompile": True}},
                       "yaml": {"dynamo_config": {"dynamo_backend": "INDUCTOR"}}},
    "z2-overlap": {"stage": 2, "zero": {**BUCKETS, "allgather_bucket_size": 500_000_000}},
    "z1-buckets": {"stage": 1, "zero": {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000}},
}


def deepspeed_json(stage: int, zero: dict[str, Any], extra: dict[str, Any], bf16: bool) -> dict[str, Any]:
    """The committed yaml's settings as a DeepSpeed json ("auto" values filled by accelerate / rm.runtime), plus
    the variant's."""
    committed = {"stage": stage, **({"stage3_gather_16bit_weights_on_model_save": True} if stage == 3 else {})}
    return {"bf16": {"enabled": bf16}, "zero_optimization": {**committed, **zero}, "gradient_clipping": "auto",
            "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "steps_per_print": 1_000_000, **extra}


def write_variant(name: str, dest: Path, bf16: bool = True) -> Path:
    """DEST holds a runnable copy of the launcher whose zero<stage>_1node.yaml is the variant; returns the launcher."""
    variant = VARIANTS[name]
    stage = variant["stage"]
    if dest.exists():
        shutil.rmtree(dest)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("rm", "accelerate_configs"):
        shutil.copytree(REPO / part, dest / part, ignore=ignore)
    for part in ("train.py", "torchrun_multi_node_multi_gpu.sh"):
        shutil.copy2(REPO / part, dest / part)
    ds_file = dest / "accelerate_configs" / f"zero{stage}_variant.json"
    ds_file.write_text(json.dumps(deepspeed_json(stage, variant["zero"], variant.get("json", {}), bf16), indent=1))
    yaml_file = dest / "accelerate_configs" / f"zero{stage}_1node.yaml"
    config = yaml.safe_load(yaml_file.read_text())
    config.pop("mixed_precision", None)  # in the json now (accelerate refuses both)
    config["deepspeed_config"] = {"deepspeed_config_file": str(ds_file),
                                  **({"zero3_init_flag": True} if stage == 3 else {})}
    config.update(variant.get("yaml", {}))
    yaml_file.write_text(f"# variant {name} of bench/zero_variants.py (throwaway copy)\n" + yaml.safe_dump(config))
    return dest / "torchrun_multi_node_multi_gpu.sh"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", nargs="?", choices=sorted(VARIANTS))
    parser.add_argument("dest", nargs="?")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--fp32", action="store_true", help="bf16 off in the json (CPU smoke runs)")
    args = parser.parse_args()
    if args.list or not args.name or not args.dest:
        print("\n".join(f"{name} ZeRO-{v['stage']}" for name, v in VARIANTS.items()))
        return 0 if args.list else 2
    launcher = write_variant(args.name, Path(args.dest).resolve(), bf16=not args.fp32)
    print(f"{launcher} {VARIANTS[args.name]['stage']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
