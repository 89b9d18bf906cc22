#!/usr/bin/env bash
# On the GPU machine (eleventh session): the tests of what changed, then the memory of a long
# request stage by stage (scripts/gpu_prefill_memory.py). Needs .whl and .bench_media (carried).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FORCE_QWENVL_VIDEO_READER=decord
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider tests/models/test_text.py \
  tests/models/test_vision.py tests/videoprefill/test_prefix.py 2>&1 | tee "$OUT/pytest.log" | tail -4
timeout ${MEM_TIMEOUT:-330} python3 scripts/gpu_prefill_memory.py .bench_media/long_640x360_520s.mp4 \
  --max-pixels 200704 --fixed-density 0.05 2>&1 | grep -v "Loading weights" | tee "$OUT/memory.txt" | grep -v "^[0-9] {"
