#!/usr/bin/env bash
# One GPU call that checks the default path after a change: the GPU tests that matter most (bf16 SIGKILL + resume
# without DeepSpeed and under ZeRO-2, i.e. restricted checkpoint loading on GPU states; packed flash-varlen rewards
# vs padded rows), then the qwen-lora row of ../shared/bench/side_by_side.sh (the original defaults, project default
# path vs TRL 1.16, same weights, tokenizer and data), in that order, so the speed rows run alone on the GPU.
# On the GPU machine, in the project root:  source .whl/env.sh && bash bench/gpu_check.sh
set -u
OUT=${OUT:-/tmp}
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/test_gpu_varlen.py \
  "tests/test_gpu.py::test_bf16_sigkill_then_resume_follows_the_uninterrupted_curve" > $OUT/gpu_tests.log 2>&1
echo "gpu tests: rc=$? $(tail -1 $OUT/gpu_tests.log)"
ROWS=default bash bench/lora_rows.sh  # the qwen-lora row and TRL beside it
