#!/usr/bin/env bash
# One GPU, bf16: no DeepSpeed (debug_1gpu.yaml), ZeRO-2 and ZeRO-3 (through the launcher), full fine-tuning and
# LoRA, on a random Qwen3-0.6B-shaped model (bench/make_random_qwen3.py) and the given preference data.
#
#   bash bench/gpu_zero.sh DATA_FILE RESULTS_DIR [STEPS]        (from the repo root, with `accelerate` on PATH)
#
# Writes RESULTS_DIR/runs.log (every run's output) and RESULTS_DIR/zero_1gpu.md (the table, bench/summarize_zero.py).
set -uo pipefail
DATA=$1 RESULTS=$2 STEPS=${3:-20}
MODEL=/tmp/qwen3-0.6b-random RUNS=/tmp/rm-bench
mkdir -p "$RESULTS" "$RUNS"
python3 bench/make_random_qwen3.py "$MODEL" 2>&1 | tee -a "$RESULTS/runs.log"

# --logging_steps 1: per-step loss and tokens/s; no eval set; lora_dropout 0 so the stages can be compared step by step
TRAIN_ARGS=(--validation_file_dir none --max_steps "$STEPS" --logging_steps 1 --per_device_train_batch_size 4
            --gradient_accumulation_steps 1 --lora_dropout 0 --report_to none)
run=0
for mode in full lora; do
    peft=$([ "$mode" = lora ] && echo true || echo false)
    for stage in 0 2 3; do
        out=$RUNS/zero$stage-$mode run=$((run + 1))
        echo "=== stage $stage, $mode" | tee -a "$RESULTS/runs.log"
        if [ "$stage" = 0 ]; then
            command=(accelerate launch --config_file accelerate_configs/debug_1gpu.yaml train.py
                     --model_name_or_path "$MODEL" --train_file_dir "$DATA" --output_dir "$out")
        else
            command=(env MODEL_PATH="$MODEL" TRAIN_FILE_DIR="$DATA" OUTPUT_DIR="$out"
                     bash torchrun_multi_node_multi_gpu.sh "$stage" 1 1 127.0.0.1 "$((29650 + run))")
        fi
        echo "${command[*]} ${TRAIN_ARGS[*]} --use_peft $peft" >> "$RESULTS/runs.log"
        timeout 240 "${command[@]}" "${TRAIN_ARGS[@]}" --use_peft "$peft" >> "$RESULTS/runs.log" 2>&1 \
            || echo "FAILED: stage $stage $mode" | tee -a "$RESULTS/runs.log"
    done
done
python3 bench/summarize_zero.py "$RESULTS/runs.log" | tee "$RESULTS/zero_1gpu.md"
