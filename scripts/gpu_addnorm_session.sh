#!/usr/bin/env bash
# On the GPU machine (thirteenth session): the tests of the fused add and RMSNorm, the window kernel
# and the vision tower, the window kernel per pipeline depth (scripts/gpu_window_kernel.py), the
# tower with and without the fused adds and the MLP adding into the residual
# (scripts/gpu_vision_backends.py), then whole requests from the test file
# (scripts/gpu_prefix_from_file.py). Needs .whl and .bench_media (carried).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export FORCE_QWENVL_VIDEO_READER=decord
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_rms_norm.py \
  tests/kernels/test_window_attention.py tests/models/test_vision.py tests/models/test_text.py 2>&1 | tee "$OUT/pytest.log" | tail -3
timeout ${KERNEL_TIMEOUT:-60} python3 scripts/gpu_window_kernel.py --stages 0 2 2>&1 | tee "$OUT/window.txt"
timeout ${VISION_TIMEOUT:-200} python3 scripts/gpu_vision_backends.py .bench_media/long_640x360_520s.mp4 \
  --max-pixels 200704 --frames 1040 992 --synthetic 131072 \
  --kernels "fused windows, varlen flash" "fused windows and adds, varlen flash" \
  "fused windows and adds, MLP adding into the residual, varlen flash" \
  2>&1 | grep -v "Loading weights" | tee "$OUT/vision.txt" | grep "^|"
timeout ${FILE_TIMEOUT:-150} python3 scripts/gpu_prefix_from_file.py .bench_media/long_640x360_520s.mp4 \
  --max-pixels 200704 --fixed-density 0.05 2>&1 | grep -v "Loading weights\|cap_pixels" | tee "$OUT/from_file.txt" \
  | grep "^|"
