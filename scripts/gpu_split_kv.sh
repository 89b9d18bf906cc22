#!/usr/bin/env bash
# On the GPU machine, kernels.short_query_attention (SPLIT_KV_SHORT_QUERIES) in one call:
# scripts/gpu_short_query.py (per call, the host's launch time, later questions in the pipeline),
# then the whole CUDA test suite. Results land in $OUT: the benchmark's JSON and tables, the pytest
# log. About 6 minutes.
#     bash scripts/gpu_split_kv.sh [gpu_short_query.py options]
set -uo pipefail
source scripts/gpu_env.sh >/dev/null 2>&1
export FORCE_QWENVL_VIDEO_READER=decord
timeout ${BENCH_TIMEOUT:-300} python3 scripts/gpu_short_query.py --json "$OUT/short_query.json" "$@" \
    > "$OUT/short_query.txt" 2>&1
timeout ${TEST_TIMEOUT:-260} python3 -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/pytest_cuda.log" 2>&1
tail -3 "$OUT/pytest_cuda.log"
cat "$OUT/versions.txt"
grep "^|" "$OUT/short_query.txt"
