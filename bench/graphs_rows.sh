#!/usr/bin/env bash
# Issue 27, session 8 (docs/speed_results.md): the qwen-lora row of side_by_side.sh (Qwen3-0.6B shape, random
# weights, LoRA, 1 pair x GA 8, dpo_zh_500, 62 steps) on this checkout with CUDA graphs (the default), with
# --cuda_graphs false, and on an older commit (BASE, unpacked from base.tar), in one call on one GPU; then full
# fine-tuning with graphs instead of compile, and its default (compiled). GPU tests of rm/fused.py and rm/graphs.py first.
# Here:  git archive 5093e81 -o base.tar      On the GPU machine:  source .whl/env.sh && bash bench/graphs_rows.sh
set -u
export NCCL_NVLS_ENABLE=0
ROOT=$PWD; K=.whl/bench; D=$ROOT/.whl/data; O=${OUT:-/tmp}
mkdir -p /tmp/base && tar -xf base.tar -C /tmp/base && ln -sfn "$ROOT/.whl" /tmp/base/.whl
python3 $K/make_q06.py /tmp/q06 qwen3_06b > "$O/make.log" 2>&1 || { echo "model build failed"; exit 1; }
timeout 240 python3 -m pytest -q -x tests/test_graphs.py tests/test_fused.py > "$O/pytest.log" 2>&1
echo "pytest rc $?"; grep -E "^E |passed|failed" "$O/pytest.log" | head -20
row() {  # name dir train.py-flags...
  local name=$1 dir=$2; shift 2; local t0=$(date +%s)
  (cd "$dir" && timeout 150 python3 train.py --model_name_or_path /tmp/q06 --train_file_dir "$D/dpo_zh_500.jsonl" \
    --output_dir /tmp/r_$name --bf16 true --report_to none --logging_steps 10 --overwrite_output_dir true "$@" \
    > "$O/$name.log" 2>&1)
  python3 - /tmp/r_$name "$name" $(( $(date +%s) - t0 )) "$O/$name.log" <<'PY'
import json, re, statistics, sys
out, name, wall, log = sys.argv[1:]
first = re.search(r"first optimizer step done ([\d.]+) s", open(log).read())
try:
    m = json.load(open(out + "/metrics.json"))
    w = [x["train/pairs_per_s"] for x in m["history"] if "train/pairs_per_s" in x]
    info = json.load(open(out + "/run_info.json"))
    print(f"| {name} | {statistics.mean(w[1:]):.2f} | {' '.join(f'{x:.1f}' for x in w)} | {first[1] if first else '-'} "
          f"| {wall} | graphs {info.get('cuda_graphs')} {info.get('cuda_graph_buckets')} |")
except Exception as err:  # noqa: BLE001
    print(f"| {name} | failed ({err}) |")
PY
}
T="| row | pairs/s | windows | first step s | wall s | info |\n|---|---:|---|---:|---:|---|"
T="$T\n$(row lora-graphs "$ROOT")"
T="$T\n$(row lora-base /tmp/base)"
T="$T\n$(row lora-nographs "$ROOT" --cuda_graphs false)"
T="$T\n$(row lora-graphs2 "$ROOT")"
T="$T\n$(row full-nocompile-graphs "$ROOT" --use_peft false --torch_compile false)"
T="$T\n$(row full-default "$ROOT" --use_peft false)"
echo; echo -e "$T"
