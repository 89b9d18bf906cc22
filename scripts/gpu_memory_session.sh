#!/usr/bin/env bash
# On the GPU machine (eleventh session): the tests of what changed, then the memory of a long
# request stage by stage (scripts/gpu_prefill_memory.py). Needs .whl and .bench_media (carried).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export FORCE_QWENVL_VIDEO_READER=decord
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider tests/models/test_text.py \
  tests/models/test_vision.py tests/videoprefill/test_prefix.py 2>&1 | tee "$OUT/pytest.log" | tail -4
timeout ${MEM_TIMEOUT:-330} python3 scripts/gpu_prefill_memory.py .bench_media/long_640x360_520s.mp4 \
  --max-pixels 200704 --fixed-density 0.05 2>&1 | grep -v "Loading weights" | tee "$OUT/memory.txt" | grep -v "^[0-9] {"
