#!/usr/bin/env bash
# On the GPU machine: kernel and model tests, the kernel benchmark (with the sink / local input
# at the paper code's densities, 1K-256K) and the host-time profile at 4K. Needs .whl (carried).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/kernels tests/models 2>&1 \
  | tee "$OUT/pytest.log" | tail -2
timeout ${BENCH_TIMEOUT:-240} python3 -m kernels.bench --no-flex --lengths ${LENGTHS:-4096 16384 65536 131072 262144} \
  --json "$OUT/bench.json" > "$OUT/bench.txt" 2> "$OUT/bench.err"; tail -1 "$OUT/bench.err"
timeout 120 python3 -m kernels.bench --no-flex --lengths 1024 2048 8192 32768 --densities 1.0 \
  --json "$OUT/bench_short.json" > "$OUT/bench_short.txt" 2> "$OUT/bench_short.err"; tail -1 "$OUT/bench_short.err"
timeout 90 python3 scripts/gpu_host_profile.py --tokens 4096 --json "$OUT/host.json" > "$OUT/host.txt" 2>&1
tail -2 "$OUT/host.txt"
sed -n '/^Sink/,/^$/p' "$OUT/bench.txt" "$OUT/bench_short.txt"
