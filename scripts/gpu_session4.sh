#!/usr/bin/env bash
# On the GPU machine: CUDA kernel tests, the kernel benchmark (incl. the sink / local input) and
# the host-time profile. Needs .whl (carried).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$OUT/pytest.log" | tail -4
timeout ${BENCH_TIMEOUT:-300} python3 -m kernels.bench --no-flex --lengths ${LENGTHS:-4096 16384 65536 131072 262144} \
  --json "$OUT/bench.json" > "$OUT/bench.txt" 2> "$OUT/bench.err"; tail -3 "$OUT/bench.err"
timeout 60 python3 scripts/gpu_host_profile.py --tokens 4096 --json "$OUT/host.json" > "$OUT/host.txt" 2>&1
tail -2 "$OUT/host.txt"
sed -n '/Sink/,/^$/p' "$OUT/bench.txt"
