#!/usr/bin/env bash
# On the GPU machine: the whole test suite, the end-to-end 7B-architecture prefill benchmark, then
# the kernel benchmark. Needs the wheels of ../shared/tools/gpu-wheels in .whl (carried).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_all.log" | tail -15
timeout ${E2E_TIMEOUT:-200} python3 -m videoprefill.bench --json "$OUT/e2e.json" ${E2E_ARGS:-} 2>&1 | grep -v "Loading weights" | tee "$OUT/e2e.txt" | tail -12
timeout ${BENCH_TIMEOUT:-240} python3 -m kernels.bench --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt" | tail -40
