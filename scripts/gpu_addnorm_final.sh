#!/usr/bin/env bash
# On the GPU machine (thirteenth session, final code): every CUDA test and the Triton kernels' own
# tests, the MLP's residual add in its down projection against a separate add
# (scripts/gpu_mlp_residual.py), first requests of fresh processes (scripts/gpu_warmup.py), and the
# end-to-end prefill bench at 128K video tokens. Needs .whl and .bench_media (carried).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export FORCE_QWENVL_VIDEO_READER=decord
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/pytest_cuda.log" \
  | tail -2
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_window_attention.py \
  tests/kernels/test_rms_norm.py tests/kernels/test_activation.py 2>&1 | tee "$OUT/pytest_kernels.log" | tail -2
timeout ${KERNEL_TIMEOUT:-60} python3 scripts/gpu_mlp_residual.py 2>&1 | tee "$OUT/mlp_residual.txt"
timeout ${WARMUP_TIMEOUT:-200} python3 scripts/gpu_warmup.py .bench_media/long_640x360_520s.mp4 --max-pixels 200704 \
  --fixed-density 0.05 --processes sample sample 2>&1 | grep -v "Loading weights\|cap_pixels" \
  | tee "$OUT/warmup.txt" | grep "^|"
timeout ${E2E_TIMEOUT:-150} python3 -m videoprefill.bench prefill --video-tokens 131072 --repeats 1 \
  --fixed-density 0.05 --json "$OUT/e2e.json" 2>&1 | grep -v "Loading weights\|cap_pixels" \
  | tee "$OUT/e2e.txt" | grep "^|"
