#!/usr/bin/env bash
# On the GPU machine: the video prefix (two-call prefill, KV cache kept for the next question).
# STAGES picks from: tests profile bench file. Needs .whl (carried); `file` needs .bench_media.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export FORCE_QWENVL_VIDEO_READER=decord
quiet() { grep -v "Loading weights\|cap_pixels\|^\s*$"; }
for stage in ${STAGES:-tests profile}; do
  case $stage in
    tests) timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/videoprefill/test_prefix.py \
             tests/models/test_attention.py tests/models/test_demo_model.py 2>&1 | tee "$OUT/pytest.log" | tail -4 ;;
    profile) timeout ${PROFILE_TIMEOUT:-300} python3 scripts/gpu_prefix_profile.py --video-tokens ${TOKENS:-131072} \
             --repeats 3 2>&1 | quiet | tee "$OUT/profile.txt" | grep "^|" ;;
    bench) timeout ${BENCH_TIMEOUT:-300} python3 -m videoprefill.bench prefill --video-tokens ${TOKENS:-131072} \
             --repeats 2 --fixed-density 0.05 --later-question --json "$OUT/e2e.json" 2>&1 | quiet \
             | tee "$OUT/e2e.txt" | grep "^|" ;;
    file) timeout ${FILE_TIMEOUT:-300} python3 scripts/gpu_prefix_from_file.py .bench_media/long_640x360_520s.mp4 \
             --max-pixels 200704 --fixed-density 0.05 2>&1 | quiet | tee "$OUT/file.txt" | grep "^|" ;;
  esac
done
