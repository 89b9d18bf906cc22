#!/usr/bin/env bash
# On the GPU machine (twelfth session, after gpu_varlen_session.sh): the end-to-end prefill bench
# at 16K / 64K / 128K video tokens, then where the vision encoder's time goes
# (scripts/gpu_vision_profile.py). Needs .whl (carried).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
timeout ${E2E_TIMEOUT:-240} python3 -m videoprefill.bench prefill --video-tokens 16384 65536 131072 --repeats 1 \
  --fixed-density 0.05 0.1 0.3 --json "$OUT/e2e.json" 2>&1 | grep -v "Loading weights\|cap_pixels" \
  | tee "$OUT/e2e.txt" | grep "^|"
timeout ${PROFILE_TIMEOUT:-200} python3 scripts/gpu_vision_profile.py --video-tokens 131072 --json "$OUT/vision.json" \
  2>&1 | tee "$OUT/vision_profile.txt" | tail -30
