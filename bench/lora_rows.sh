#!/usr/bin/env bash
# The qwen-lora rows of docs/speed_results.md (session 4, call 5) in one GPU call: side_by_side.sh's qwen-lora
# command (the original defaults, Qwen3-0.6B shape, random weights, dpo_zh_500) on the default path (62 steps: eager
# by the 200-step rule), with --torch_compile true, and for 4 epochs (248 steps: compiled by the rule), then TRL 1.16
# as side_by_side.sh runs it, one after the other on one GPU. ROWS="default" runs only the first project row
# (bench/gpu_check.sh does).
# On the GPU machine, in the project root:  source .whl/env.sh && bash bench/lora_rows.sh
set -u
K=.whl/bench; D=.whl/data; OUT=${OUT:-/tmp}
python3 $K/make_q06.py /tmp/q06 qwen3_06b > /dev/null 2>&1 || { echo "model build failed"; exit 1; }
row() {  # name, then train.py flags
  local name=$1; shift; local t0=$(date +%s)
  timeout ${PROJ_TIMEOUT:-150} python3 train.py --model_name_or_path /tmp/q06 --train_file_dir $D/dpo_zh_500.jsonl \
    --output_dir /tmp/lora_rows_$name --bf16 true --report_to none --logging_steps 10 --overwrite_output_dir true \
    "$@" > $OUT/$name.log 2>&1
  python3 - /tmp/lora_rows_$name $name $(( $(date +%s) - t0 )) $OUT/$name.log <<'PY'
import json, re, statistics, sys
out, name, wall, log = sys.argv[1:]
text = open(log).read()
first = re.search(r"first optimizer step done ([\d.]+) s", text)
graphs = re.search(r"torch.compile: (\d+) graphs built, (\d+) after", text)
try:
    metrics = json.load(open(out + "/metrics.json"))
    windows = [x["train/pairs_per_s"] for x in metrics["history"] if "train/pairs_per_s" in x]
    pairs, steps = f"{statistics.mean(windows[1:] or windows):.1f}", metrics["final"]["step"]
except (OSError, ValueError, KeyError) as err:
    pairs, steps = f"failed ({err})", "-"
compiled = f"on, {graphs[2]} recompiles" if graphs else "off"
print(f"| {name} | {steps} | {compiled} | {first[1] if first else '-'} s | {wall} s | {pairs} |")
PY
}
echo "| run | steps | torch.compile | first step after launch | whole run | pairs/s (windows after the first) |"
echo "|---|---:|---|---:|---:|---:|"
declare -A FLAGS=([default]="" [compiled]="--torch_compile true" [default-4-epochs]="--num_train_epochs 4")
for name in ${ROWS:-default compiled default-4-epochs}; do
  row $name ${FLAGS[$name]}
done
MODEL=/tmp/q06 DATA=$D/dpo_zh_500.jsonl LORA=1 BS=1 GA=8 GC=1 MAX_STEPS=10 timeout ${TRL_TIMEOUT:-140} \
  python3 $K/trl_peer.py > $OUT/trl_qwen-lora.log 2>&1
echo "TRL 1.16 qwen-lora pairs/s: $(grep '^PEER' $OUT/trl_qwen-lora.log | \
  python3 -c "import json,sys; print(json.loads(sys.stdin.read().split(' ',1)[1])['pairs_per_s'])" 2>/dev/null || echo failed)"
