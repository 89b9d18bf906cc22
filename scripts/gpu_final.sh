#!/usr/bin/env bash
# On the GPU machine: kernel and model tests, the end-to-end prefill benchmark with fixed
# densities, and the needle accuracy benchmark on long videos. Needs .whl (carried).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider tests/kernels tests/models \
  tests/videoprefill/test_synthetic.py 2>&1 | tee "$OUT/pytest.log" | tail -4
timeout ${E2E_TIMEOUT:-240} python3 -m videoprefill.bench prefill --video-tokens ${E2E_TOKENS:-16384 65536 131072} \
  --repeats 1 --fixed-density 0.05 0.1 0.3 --json "$OUT/e2e.json" 2>&1 | grep -v "Loading weights\|cap_pixels" \
  | tee "$OUT/e2e.txt" | grep "^|"
timeout ${ACC_TIMEOUT:-180} python3 -m videoprefill.bench accuracy --device cuda --lengths ${ACC_LENGTHS:-64 256 1024 2048} \
  --per-cell 2 --json "$OUT/accuracy.json" --heatmap "$OUT/accuracy.png" 2>&1 | tee "$OUT/accuracy.txt" | grep -v "^  "
