#!/usr/bin/env bash
# On the GPU machine (twelfth session): every CUDA test, the vision tower per attention kernel
# (scripts/gpu_vision_backends.py), then whole requests from the test file, dense and at 5%
# (scripts/gpu_prefix_from_file.py). Needs .whl and .bench_media (carried).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export FORCE_QWENVL_VIDEO_READER=decord
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/pytest.log" | tail -3
timeout ${VISION_TIMEOUT:-150} python3 scripts/gpu_vision_backends.py .bench_media/long_640x360_520s.mp4 \
  --max-pixels 200704 --frames 1040 1024 992 2>&1 | grep -v "Loading weights" | tee "$OUT/vision.txt" | grep "^|"
timeout ${FILE_TIMEOUT:-150} python3 scripts/gpu_prefix_from_file.py .bench_media/long_640x360_520s.mp4 \
  --max-pixels 200704 --fixed-density 0.05 2>&1 | grep -v "Loading weights\|cap_pixels" | tee "$OUT/from_file.txt" \
  | grep "^|"
