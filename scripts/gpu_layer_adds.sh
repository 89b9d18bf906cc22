#!/usr/bin/env bash
# On the GPU machine (thirteenth session, after gpu_addnorm_final.sh): every CUDA test and the tests
# of both towers' fused residual adds, one block's second half with and without them
# (scripts/gpu_mlp_residual.py), the end-to-end prefill bench at 128K video tokens, then whole
# requests from the test file. Needs .whl and .bench_media (carried).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export FORCE_QWENVL_VIDEO_READER=decord
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/pytest_cuda.log" \
  | tail -2
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_rms_norm.py \
  tests/models/test_text.py tests/models/test_vision.py 2>&1 | tee "$OUT/pytest_towers.log" | tail -2
timeout ${KERNEL_TIMEOUT:-90} python3 scripts/gpu_mlp_residual.py 2>&1 | tee "$OUT/second_half.txt"
timeout ${E2E_TIMEOUT:-150} python3 -m videoprefill.bench prefill --video-tokens 131072 --repeats 1 \
  --fixed-density 0.05 --json "$OUT/e2e.json" 2>&1 | grep -v "Loading weights\|cap_pixels" \
  | tee "$OUT/e2e.txt" | grep "^|"
timeout ${FILE_TIMEOUT:-150} python3 scripts/gpu_prefix_from_file.py .bench_media/long_640x360_520s.mp4 \
  --max-pixels 200704 --fixed-density 0.05 2>&1 | grep -v "Loading weights\|cap_pixels" | tee "$OUT/from_file.txt" \
  | grep "^|"
