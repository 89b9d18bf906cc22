"""Host time of each of 28 back-to-back `flash_prefill` calls below `min_seq_len` (the dense
fallback on the Hopper kernel), no synchronisation between them, three times per length, then a
cProfile listing of 28 calls. A development script (nineteenth session, run 6; results go to
BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_call_host_times.py
"""

import cProfile
import pstats
import statistics
import time

import torch

from kernels import FlashPrefillConfig, flash_prefill

BELOW = FlashPrefillConfig.for_model("qwen2.5-vl", min_seq_len=2**30)

for t in (1024, 2048):
    q = torch.randn(1, t, 28, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, t, 4, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for _ in range(3):
        flash_prefill(q, k, v, config=BELOW)
    for rep in range(3):
        torch.cuda.synchronize()
        per = []
        s0 = time.perf_counter()
        for _ in range(28):
            s = time.perf_counter()
            flash_prefill(q, k, v, config=BELOW)
            per.append(1e6 * (time.perf_counter() - s))
        host_end = time.perf_counter()
        torch.cuda.synchronize()
        e = time.perf_counter()
        print(t, rep, f"per-call host us: median {statistics.median(per):.1f} max {max(per):.1f} first {per[0]:.1f}",
              f"loop {1e3 * (host_end - s0):.2f} ms, to sync {1e3 * (e - s0):.2f} ms")
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(28):
        flash_prefill(q, k, v, config=BELOW)
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(12)
