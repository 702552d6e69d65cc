#!/usr/bin/env bash
# One GPU call that checks the default path after a change: the GPU tests that matter most (bf16 SIGKILL + resume
# without DeepSpeed and under ZeRO-2, i.e. restricted checkpoint loading on GPU states; packed flash-varlen rewards
# vs padded rows), then the qwen-lora row of ../shared/bench/side_by_side.sh (the original defaults, project default
# path vs TRL 1.16, same weights, tokenizer and data), in that order, so the speed rows run alone on the GPU.
# On the GPU machine, in the project root:  source .whl/env.sh && bash bench/gpu_check.sh
set -u
K=.whl/bench; D=.whl/data; OUT=${OUT:-/tmp}
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/test_gpu_varlen.py \
  "tests/test_gpu.py::test_bf16_sigkill_then_resume_follows_the_uninterrupted_curve" > $OUT/gpu_tests.log 2>&1
echo "gpu tests: rc=$? $(tail -1 $OUT/gpu_tests.log)"
python3 $K/make_q06.py /tmp/q06 qwen3_06b > /dev/null 2>&1 || { echo "model build failed"; exit 1; }
t0=$(date +%s)
timeout ${PROJ_TIMEOUT:-120} python3 train.py --model_name_or_path /tmp/q06 --train_file_dir $D/dpo_zh_500.jsonl \
  --output_dir /tmp/sbs_qwen-lora --bf16 true --report_to none --logging_steps 10 > $OUT/sbs_qwen-lora.log 2>&1
wall=$(( $(date +%s) - t0 ))
proj=$(python3 - /tmp/sbs_qwen-lora/metrics.json <<'PY'
import json, statistics, sys
h = [x for x in json.load(open(sys.argv[1]))["history"] if "train/pairs_per_s" in x]
print(round(statistics.mean(x["train/pairs_per_s"] for x in (h[1:] or h)), 2), h[-1]["step"])
PY
)
MODEL=/tmp/q06 DATA=$D/dpo_zh_500.jsonl LORA=1 BS=1 GA=8 GC=1 MAX_STEPS=10 timeout ${TRL_TIMEOUT:-150} \
  python3 $K/trl_peer.py > $OUT/trl_qwen-lora.log 2>&1
trl=$(grep '^PEER' $OUT/trl_qwen-lora.log | python3 -c "import json,sys; print(json.loads(sys.stdin.read().split(' ',1)[1])['pairs_per_s'])" 2>/dev/null || echo failed)
set -- $proj
echo; echo "| row | project pairs/s | project steps@whole-run wall | TRL pairs/s | x TRL |"; echo "|---|---:|---:|---:|---:|"
echo "| qwen-lora | ${1:-failed} | ${2:--}@${wall}s | $trl | $(python3 -c "print(round(float('${1:-0}')/float('$trl'),1))" 2>/dev/null || echo -) |"
grep -h "gradient checkpointing:\|torch.compile" $OUT/sbs_qwen-lora.log | head -3
