#!/usr/bin/env bash
# On the GPU machine: the vision encoder run while the frames are read (videoprefill.streaming).
# STAGES picks from: tests stream file. Needs .whl (carried); `stream` and `file` need .bench_media.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FORCE_QWENVL_VIDEO_READER=decord
quiet() { grep -v "Loading weights\|cap_pixels\|^\s*$"; }
for stage in ${STAGES:-tests stream}; do
  case $stage in
    tests) timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/videoprefill/test_streaming.py \
             tests/videoprefill/test_prefix.py tests/videoprefill/test_video.py tests/models/test_vision.py} 2>&1 \
             | tee "$OUT/pytest.log" | tail -4 ;;
    stream) timeout ${STREAM_TIMEOUT:-360} python3 scripts/gpu_stream_profile.py .bench_media/long_640x360_520s.mp4 \
             --max-pixels 200704 --fixed-density 0.05 --repeats ${REPEATS:-3} 2>&1 | quiet | tee "$OUT/stream.txt" \
             | grep "^|" ;;
    file) timeout ${FILE_TIMEOUT:-300} python3 scripts/gpu_prefix_from_file.py .bench_media/long_640x360_520s.mp4 \
             --max-pixels 200704 --fixed-density 0.05 2>&1 | quiet | tee "$OUT/file.txt" | grep "^|" ;;
  esac
done
