#!/usr/bin/env bash
# On the GPU machine (eleventh session, after gpu_memory_session.sh): every CUDA test, then the
# final code end to end: from the test file (scripts/gpu_prefix_from_file.py) and the prefill
# bench at 16K / 64K / 128K video tokens. Needs .whl and .bench_media (carried).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export FORCE_QWENVL_VIDEO_READER=decord
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/pytest.log" | tail -3
timeout ${FILE_TIMEOUT:-150} python3 scripts/gpu_prefix_from_file.py .bench_media/long_640x360_520s.mp4 \
  --max-pixels 200704 --fixed-density 0.05 2>&1 | grep -v "Loading weights\|cap_pixels" | tee "$OUT/from_file.txt" \
  | grep "^|"
timeout ${E2E_TIMEOUT:-200} python3 -m videoprefill.bench prefill --video-tokens 16384 65536 131072 --repeats 1 \
  --fixed-density 0.05 0.1 0.3 --json "$OUT/e2e.json" 2>&1 | grep -v "Loading weights\|cap_pixels" \
  | tee "$OUT/e2e.txt" | grep "^|"
