#!/usr/bin/env bash
# Issue 27 in one GPU call (one H200, under 9 minutes):
#  (a) profile: one optimizer step of the default row (Qwen3-0.6B shape, random weights, LoRA, 1 pair x GA 8, packing,
#      dpo_zh_500): host time, kernel time, gaps, syncs and launches per step (bench/profile_step.py), operators per
#      step and where each host sync comes from (bench/count_ops.py --sync_debug), and the packed-vs-padded GPU
#      parity test of the varlen path (tests/test_gpu_varlen.py);
#  (b) zero: ZeRO-1/2/3 through the committed yamls and the launcher as users run them, then each candidate setting
#      of bench/zero_variants.py (throwaway copies; the committed yamls are not edited), SmolLM2-135M shape, LoRA,
#      defaults, dpo_zh_500 pairs, pairs/s against no DeepSpeed (accelerate_configs/debug_1gpu.yaml) in the same call.
# On the GPU machine, in the project root, after `bash ../shared/gpu/prepare.sh` here:
#   source .whl/env.sh && bash bench/gpu_speed.sh
# Env: PARTS ("profile zero"), ZERO_ROWS (all rows below, in order), STEPS (optimizer steps per ZeRO row, 30 = 240
# pairs), BUDGET_S (ZeRO rows not started by then, seconds after the start, are reported as skipped; 500).
# Logs: ${OUT:-/tmp}/gpu_speed/. The tables come last. Exit 1 when anything failed.
set -u
START=$(date +%s)
LOGS=${OUT:-/tmp}/gpu_speed; mkdir -p "$LOGS"
K=.whl/bench; D=.whl/data
PARTS=${PARTS:-profile zero}
ZERO_ROWS=${ZERO_ROWS:-nods z1 z2 z3 z3-persist z3-tuned z3-auto z3-buckets z2-overlap z1-buckets z3-compile-layers z3-deepcompile z3-per-module}
STEPS=${STEPS:-30} BUDGET_S=${BUDGET_S:-500}
FAILED=0
elapsed() { echo $(( $(date +%s) - START )); }
fail() { echo "FAILED: $*" | tee -a "$LOGS/failures.txt"; FAILED=1; }

PROFILE_TABLE=""
if [[ " $PARTS " == *" profile "* ]]; then
  python3 $K/make_q06.py /tmp/q06 qwen3_06b > "$LOGS/make_q06.log" 2>&1 || fail "make_q06 qwen3_06b"
  ROW=(train.py --model_name_or_path /tmp/q06 --train_file_dir $D/dpo_zh_500.jsonl --bf16 true --report_to none
       --validation_file_dir none --logging_steps 100 --overwrite_output_dir true)  # the qwen-lora row, no log step
  timeout 200 python3 bench/profile_step.py --skip 6 --steps 3 --json "$LOGS/profile_qwen_lora.json" -- "${ROW[@]}" \
    --output_dir /tmp/gs_profile --max_steps 10 > "$LOGS/profile_qwen_lora.log" 2>&1 || fail "profile (profile_qwen_lora.log)"
  timeout 150 python3 bench/count_ops.py --skip 3 --steps 2 --sync_debug --json "$LOGS/count_qwen_lora.json" -- \
    "${ROW[@]}" --output_dir /tmp/gs_count --max_steps 6 > "$LOGS/count_qwen_lora.log" 2>&1 || fail "count (count_qwen_lora.log)"
  timeout 150 python3 -m pytest -q -s tests/test_gpu_varlen.py > "$LOGS/test_gpu_varlen.log" 2>&1 || fail "tests/test_gpu_varlen.py"
  tail -3 "$LOGS/test_gpu_varlen.log"
  PROFILE_TABLE=$(python3 - "$LOGS" <<'PY'
import json, sys
logs = sys.argv[1]
try:
    p = json.load(open(f"{logs}/profile_qwen_lora.json"))
    wall, busy = p["wall_ms_per_step"], p["gpu_busy_fraction"]
    print("| per optimizer step (qwen-lora, default path, profiled) | value |\n|---|---:|")
    print(f"| host wall ms (profiled; unprofiled steps before: {p['unprofiled_wall_ms_per_step_before']}) | {wall:.1f} |")
    print(f"| GPU kernel ms | {p['gpu_kernel_ms_per_step']:.1f} |")
    print(f"| GPU idle (gaps) ms | {wall * (1 - busy):.1f} ({100 * (1 - busy):.0f}%) |")
    print(f"| launches (kernels + copies + memsets) | {p['launches_per_step']:.0f} |")
    print(f"| host syncs {p['sync_names']} | {p['host_syncs_per_step']:.2f} |")
    print(f"| DataLoader ms | {p['dataloader_ms_per_step']:.1f} |")
except (OSError, ValueError, KeyError) as err:
    print(f"profile: no summary ({err})")
try:
    c = json.load(open(f"{logs}/count_qwen_lora.json"))
    print(f"| operators dispatched (count_ops) | {c['operators']:.0f} ({c['operators_without_views']:.0f} without views) |")
    print(f"| host reads (_local_scalar_dense) / syncs seen by sync debug mode | {c['host_reads']:.1f} / {c['syncs_per_step']:.1f} |")
except (OSError, ValueError, KeyError) as err:
    print(f"count: no summary ({err})")
PY
)
fi

ZERO_TABLE=""
if [[ " $PARTS " == *" zero "* ]]; then
  python3 $K/make_q06.py /tmp/smol smollm2_135m > "$LOGS/make_smol.log" 2>&1 || fail "make_q06 smollm2_135m"
  head -400 $D/dpo_zh_500.jsonl > /tmp/zero400.jsonl
  ARGS=(--model_name_or_path /tmp/smol --train_file_dir /tmp/zero400.jsonl --validation_file_dir none --report_to none
        --logging_steps 10 --max_steps "$STEPS" --overwrite_output_dir true)
  port=29700
  rate() {  # output_dir -> "pairs/s tokens/s" (mean of the logged windows after the first) or "failed"
    python3 - "$1" <<'PY'
import json, statistics, sys
try:
    h = [x for x in json.load(open(sys.argv[1] + "/metrics.json"))["history"] if "train/pairs_per_s" in x]
    w = h[1:] or h
    print(f"{statistics.mean(x['train/pairs_per_s'] for x in w):.2f} {statistics.mean(x['train/tokens_per_s'] for x in w):.0f}")
except Exception:
    print("failed -")
PY
  }
  declare -A RATE WALL
  for row in $ZERO_ROWS; do
    if (( $(elapsed) > BUDGET_S )); then RATE[$row]="skipped -"; WALL[$row]="-"; continue; fi
    out=/tmp/gz_$row port=$((port + 1)) t0=$(date +%s) stage=""
    case $row in
      nods) cmd=(accelerate launch --config_file accelerate_configs/debug_1gpu.yaml train.py "${ARGS[@]}") ;;
      z1|z2|z3) cmd=(bash torchrun_multi_node_multi_gpu.sh "${row#z}" 1 1 localhost $port "${ARGS[@]}") ;;
      z3-compile-layers) cmd=(bash torchrun_multi_node_multi_gpu.sh 3 1 1 localhost $port "${ARGS[@]}" --torch_compile true) ;;
      *) read -r launcher stage < <(python3 bench/zero_variants.py "$row" /tmp/zv_$row) || { fail "variant $row"; continue; }
         cmd=(bash "$launcher" "$stage" 1 1 localhost $port "${ARGS[@]}") ;;
    esac
    echo "=== $row: ${cmd[*]} --output_dir $out" >> "$LOGS/zero_rows.log"
    timeout 200 "${cmd[@]}" --output_dir "$out" > "$LOGS/zero_$row.log" 2>&1 || fail "zero row $row (zero_$row.log)"
    RATE[$row]=$(rate "$out"); WALL[$row]=$(( $(date +%s) - t0 ))
  done
  base=${RATE[nods]:-failed}; base=${base%% *}
  ZERO_TABLE=$(
    echo "| row (SmolLM2-135M shape, LoRA, $STEPS steps of 8 pairs) | pairs/s | tokens/s | x no DeepSpeed | whole run s |"
    echo "|---|---:|---:|---:|---:|"
    for row in $ZERO_ROWS; do
      set -- ${RATE[$row]}
      x=$(python3 -c "print(f'{float(\"$1\") / float(\"$base\"):.2f}')" 2>/dev/null || echo -)
      echo "| $row | $1 | $2 | $x | ${WALL[$row]} |"
    done)
fi

echo; echo "gpu_speed.sh: $(elapsed) s, logs in $LOGS"
[ -n "$PROFILE_TABLE" ] && { echo; echo "$PROFILE_TABLE"; }
[ -n "$ZERO_TABLE" ] && { echo; echo "$ZERO_TABLE"; }
[ -f "$LOGS/failures.txt" ] && { echo; cat "$LOGS/failures.txt"; }
exit $FAILED
