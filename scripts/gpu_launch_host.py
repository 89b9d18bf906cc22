"""Host time of short prompts' attention calls, with the kernels launched through Triton's launch
and directly (`kernels.runtime.Launcher`, DIRECT_LAUNCH): the whole `flash_prefill` call below
`min_seq_len` (the Hopper kernel over every causal block), the kernel's wrapper and its pieces
(`supported`, the four TMA descriptors, the work counter), and the whole sparse `flash_prefill`
call (block means, index build, attention). Host microseconds per call (median of 7 rounds of
`--calls` calls, the GPU synchronised every 25 calls so that the launch queue never fills), the
two ways alternated round by round. A development script (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_launch_host.py [--tokens 2048 4096] [--calls 400]
"""

import argparse
import statistics
import time

import torch

from kernels import FlashPrefillConfig, flash_prefill, runtime
from kernels.flash_prefill import api
from kernels.flash_prefill import sparse_attention_sm90 as hk


def host_us(fn, calls: int, sync_every: int = 25) -> float:
    """Mean host microseconds of `fn` over `calls` calls, the GPU synchronised every `sync_every`
    calls (so launches queue, but not without bound), each call timed alone."""
    spent = 0.0
    for i in range(calls):
        if i % sync_every == 0:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        spent += time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * spent / calls


def pieces(t: int, below: FlashPrefillConfig, sparse: FlashPrefillConfig) -> dict:
    """The calls timed at `t` tokens, by name."""
    q = torch.randn(1, t, 28, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, t, 4, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    pattern = api._kernel_causal_pattern(1, 28, t, t, 128, q.device)
    n, ids = pattern.kv_num_blocks, pattern.kv_indices
    out = torch.empty_like(q)
    scale = 128**-0.5
    return {
        "flash_prefill below min_seq_len (whole call)": lambda: flash_prefill(q, k, v, config=below),
        "sparse_attention_sm90 (the kernel's wrapper)": lambda: hk.sparse_attention_sm90(q, k, v, n, ids, scale,
                                                                                         out=out),
        "flash_prefill, sparse (whole call)": lambda: flash_prefill(q, k, v, config=sparse),
        "supported": lambda: hk.supported(q, k, v, 128),
        "4 TMA descriptors": lambda: [hk._descriptor(x, hk.BLOCK, 128) for x in (q, k, v, out)],
        "work counter": lambda: hk._work_counter(q.device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args()
    below = FlashPrefillConfig.for_model("qwen2.5-vl", min_seq_len=2**30)
    sparse = FlashPrefillConfig.for_model("qwen2.5-vl", min_seq_len=0)
    print("| tokens | piece | Triton's launch, host us | direct, host us |")
    print("|---|---|---|---|")
    for t in args.tokens:
        rows = pieces(t, below, sparse)
        for fn in rows.values():  # compile, and the direct path's first (Triton) launch
            fn(), fn()
        torch.cuda.synchronize()
        for name, fn in rows.items():
            times = {False: [], True: []}
            for _ in range(7):
                for direct in (False, True):
                    runtime.DIRECT_LAUNCH = direct
                    times[direct].append(host_us(fn, args.calls))
            runtime.DIRECT_LAUNCH = True
            print(f"| {t} | {name} | {statistics.median(times[False]):.1f} | {statistics.median(times[True]):.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
