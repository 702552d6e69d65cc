#!/usr/bin/env bash
# Issue 25 item 5, one command on the GPU machine (one GPU; about 4 minutes for the runs, the CUDA tests as long as
# they take): every CUDA-only test (the test files that skip without CUDA), then resume parity under DeepSpeed for
# ZeRO-2 and ZeRO-3, bf16, full fine-tuning and LoRA (bench/resume_parity.py: stop with SIGTERM at a step, resume
# through the restricted loader with the printed command, compare the loss curve with an uninterrupted run).
# Exits non-zero on any failure; prints a table last; logs under ${OUT:-/tmp}/gpu_reliability.
#
#   source .whl/env.sh && bash bench/gpu_reliability.sh        (GPU machine, project root)
#   RM_CPU=1 bash bench/gpu_reliability.sh                     (CPU check of the script: fp32, gloo, no CUDA tests)
#   PARTS=tests / PARTS=runs                                   (one part only; both by default)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOGS=${OUT:-/tmp}/gpu_reliability PARTS=${PARTS:-tests runs} PY=${PYTHON:-python3}
rm -rf "$LOGS" && mkdir -p "$LOGS"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$LOGS/torch_extensions}
status=0 rows=()

if [[ " $PARTS " == *" tests "* && -z "${RM_CPU:-}" ]]; then
    cuda_tests=$(grep -l "skipif(not torch.cuda.is_available()" tests/test_*.py | tr '\n' ' ')
    start=$SECONDS
    timeout ${TEST_TIMEOUT:-420} $PY -m pytest -q -rs -p no:cacheprovider $cuda_tests > "$LOGS/cuda_tests.log" 2>&1
    rc=$?
    summary=$(tail -1 "$LOGS/cuda_tests.log")
    # on the GPU machine nothing may skip: a skipped CUDA test there is a test that ran nowhere
    if [ $rc -ne 0 ] || grep -q "skipped" <<< "$summary"; then status=1 verdict=FAILED; else verdict=ok; fi
    rows+=("| CUDA-only tests ($cuda_tests) | $summary, rc $rc, $((SECONDS - start)) s | $verdict |")
fi

if [[ " $PARTS " == *" runs "* ]]; then
    start=$SECONDS
    timeout ${RUNS_TIMEOUT:-420} $PY bench/resume_parity.py "$LOGS/runs" ${RM_CPU:+--cpu} ${CONFIGS:+--configs $CONFIGS} \
        > "$LOGS/resume_parity.md" 2> "$LOGS/resume_parity.err"
    rc=$?
    [ $rc -eq 0 ] || status=1
    rows+=("| resume parity, ZeRO-2/3 x full/LoRA ($LOGS/resume_parity.md) | rc $rc, $((SECONDS - start)) s | $([ $rc -eq 0 ] && echo ok || echo FAILED) |")
fi

echo "== resume parity (per configuration)"
cat "$LOGS/resume_parity.md" 2>/dev/null
echo
echo "| part | result | verdict |"
echo "|---|---|---|"
printf '%s\n' "${rows[@]}"
exit $status
