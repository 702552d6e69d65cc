#!/usr/bin/env bash
# The stack matrix on one GPU: gradient checkpointing on/off x full fine-tuning/LoRA x no DeepSpeed/ZeRO-2/ZeRO-3,
# 12 real train.py runs (bf16, 1 process each through `accelerate launch --config_file accelerate_configs/...
# --num_processes 1`), then rm.score on a LoRA adapter. Meant for the oldest supported stack (the GPU machine's stock
# torch 2.11, transformers 5.17, accelerate 1.15, peft 0.21.0 + deepspeed 0.19.8, datasets 5.2: docs/stack.md).
#
#   source .whl/env.sh && bash bench/gpu_matrix.sh            (from the repo root; logs under ${OUT:-/tmp}/gpu_matrix)
#
# The model is Qwen3-0.6B's shape cut to 2 layers (bench/make_random_qwen3.py: head dim 128, its vocabulary), loaded
# from a folder as a user's model is. Each run: 4 optimizer steps of 4 pairs, a checkpoint at step 2, the final
# evaluation on 8 pairs, the export; torch.compile off (this matrix is about the libraries' APIs). Runs go
# MATRIX_JOBS at a time (default all 12: the model is small). Each run's run_info.json must show the ZeRO stage,
# checkpointing and bf16 asked for. Exits non-zero on any failure; the table comes last.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${OUT:-/tmp}/gpu_matrix JOBS=${MATRIX_JOBS:-12}
MODEL=$ROOT/qwen3-2layer-random
rm -rf "$ROOT/runs" && mkdir -p "$ROOT/runs" "$ROOT/logs"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/torch_extensions} TOKENIZERS_PARALLELISM=false
start=$SECONDS
python3 -c "import torch, transformers, accelerate, peft, deepspeed, datasets as d
print('stack: torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate',
      accelerate.__version__, '| peft', peft.__version__, '| deepspeed', deepspeed.__version__, '| datasets',
      d.__version__, '|', torch.cuda.get_device_name(0))" 2>&1 | grep -v Warning | tee "$ROOT/stack.txt"
[ -f "$MODEL/config.json" ] || python3 bench/make_random_qwen3.py "$MODEL" --num_hidden_layers 2 > "$ROOT/logs/model.log" 2>&1 \
    || { echo "error: building the model failed ($ROOT/logs/model.log)" >&2; exit 1; }

run_one() {  # name yaml peft checkpointing port
    local name=$1 yaml=$2 peft=$3 ckpt=$4 port=$5 began=$SECONDS
    timeout 600 accelerate launch --config_file "accelerate_configs/$yaml" --num_processes 1 --main_process_port "$port" \
        train.py --model_name_or_path "$MODEL" --output_dir "$ROOT/runs/$name" --use_peft "$peft" \
        --gradient_checkpointing "$ckpt" --torch_compile false --max_steps 4 --per_device_train_batch_size 4 \
        --gradient_accumulation_steps 1 --save_steps 2 --logging_steps 1 --max_eval_samples 8 --report_to none \
        > "$ROOT/logs/$name.log" 2>&1
    echo "$? $((SECONDS - began))" > "$ROOT/runs/$name.rc"
}

port=29700
for ckpt in true false; do
    for peft in false true; do
        for yaml in debug_1gpu.yaml zero2_1node.yaml zero3_1node.yaml; do
            stage=$(grep -o 'zero_stage: [0-9]' "accelerate_configs/$yaml" | grep -o '[0-9]' || echo 0)
            name=zero$stage-$([ "$peft" = true ] && echo lora || echo full)-ckpt_$ckpt
            while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
            run_one "$name" "$yaml" "$peft" "$ckpt" $((port += 1)) &
        done
    done
done
wait
matrix_s=$((SECONDS - start))

# rm.score: the LoRA adapter of the ZeRO-3 checkpointed run, on its hub-free base folder
score_began=$SECONDS
python3 -m rm.score --model "$ROOT/runs/zero3-lora-ckpt_true" --adapter --data data/sample/eval.jsonl \
    --output "$ROOT/runs/score.jsonl" > "$ROOT/logs/score.log" 2>&1
echo "$? $((SECONDS - score_began))" > "$ROOT/runs/score.rc"

python3 - "$ROOT" "$matrix_s" <<'EOF'
import json, sys
from pathlib import Path

root, failed, rows = Path(sys.argv[1]), [], []
for rc_file in sorted((root / "runs").glob("zero*.rc")):
    name = rc_file.stem
    rc, seconds = rc_file.read_text().split()
    stage, mode, ckpt = int(name[4]), name.split("-")[1], name.endswith("true")
    info_file, metrics_file = root / "runs" / name / "run_info.json", root / "runs" / name / "metrics.json"
    problems = [] if rc == "0" else [f"exit {rc} (logs/{name}.log)"]
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    final = json.loads(metrics_file.read_text())["final"] if metrics_file.is_file() else {}
    if info:
        ran = (info["zero_stage"], info["gradient_checkpointing"], info["mixed_precision"])
        if ran != (stage, ckpt, "bf16"):
            problems.append(f"ran stage/checkpointing/precision {ran}")
    if rc == "0" and not (root / "runs" / name / "model" / "config.json").is_file():
        problems.append("no exported model")
    failed += [f"{name}: {p}" for p in problems]
    rows.append(f"| {name} | {stage} | {mode} | {'on' if ckpt else 'off'} | {rc} | {seconds} | "
                f"{final.get('train/loss', float('nan')):.4f} | {final.get('eval/accuracy', float('nan')):.3f} | "
                f"{'ok' if not problems else 'FAILED'} |")
score_rc, score_s = (root / "runs" / "score.rc").read_text().split()
if score_rc != "0":
    failed.append(f"rm.score on the ZeRO-3 LoRA adapter: exit {score_rc} (logs/score.log)")
if len(rows) != 12:
    failed.append(f"{len(rows)} of 12 runs reported")
print((root / "stack.txt").read_text().strip())
print("| run | ZeRO | mode | checkpointing | exit | s | final train loss | final eval acc | verdict |")
print("|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
print(f"rm.score on zero3-lora-ckpt_true/adapter: exit {score_rc}, {score_s} s. Matrix wall time {sys.argv[2]} s.")
print("\n".join(["FAILURES:", *failed]) if failed else "all 12 runs and the score: ok")
sys.exit(1 if failed else 0)
EOF
