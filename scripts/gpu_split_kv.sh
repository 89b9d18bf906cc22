#!/usr/bin/env bash
# On the GPU machine, the thirty-fourth session's two switches in one call: the CUDA tests of the
# code they route to (`kernels.short_query_attention` against `dense_flash`; the last full blocks
# apart against one call), then scripts/gpu_short_query.py (per call and in the pipeline). Results
# land in $OUT: the pytest log, the benchmark's JSON and tables. About 8 minutes; the whole CUDA
# suite (`python3 -m pytest -q -m cuda tests`, about 3) needs a call of its own.
#     bash scripts/gpu_split_kv.sh [gpu_short_query.py options]
set -uo pipefail
source scripts/gpu_env.sh >/dev/null 2>&1
export FORCE_QWENVL_VIDEO_READER=decord
timeout ${TEST_TIMEOUT:-100} python3 -m pytest -q -p no:cacheprovider -m cuda \
    tests/kernels/test_short_query_attention.py tests/kernels/test_flash_prefill_cuda.py \
    -k "7b_shape_on_the_gpu or last_full_blocks_apart" 2>&1 \
    | tee "$OUT/pytest_new.log" | tail -5
timeout ${BENCH_TIMEOUT:-440} python3 scripts/gpu_short_query.py --json "$OUT/short_query.json" "$@" \
    > "$OUT/short_query.txt" 2>&1
cat "$OUT/versions.txt"
grep "^|" "$OUT/short_query.txt"
