#!/usr/bin/env bash
# On the GPU machine: the whole test suite, the end-to-end 7B-architecture prefill benchmark, then
# the kernel benchmark. Needs the wheels of ../shared/tools/gpu-wheels in .whl (carried).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_all.log" | tail -15
timeout ${E2E_TIMEOUT:-200} python3 -m videoprefill.bench --json "$OUT/e2e.json" ${E2E_ARGS:-} 2>&1 | grep -v "Loading weights" | tee "$OUT/e2e.txt" | tail -12
timeout ${BENCH_TIMEOUT:-240} python3 -m kernels.bench --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt" | tail -40
