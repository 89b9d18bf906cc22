#!/usr/bin/env bash
# On the GPU machine: kernel tests (CUDA ones included), then the kernel benchmark.
# Results land in $OUT (or ./out): pytest log, benchmark JSON and table.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider tests/kernels -x 2>&1 | tee "$OUT/pytest_kernels.log" | tail -25
timeout ${BENCH_TIMEOUT:-420} python3 -m kernels.bench --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.txt"
