"""Where the host time of one Hopper-kernel call goes at a short prompt (2K tokens, the dense
fallback below `min_seq_len`, every causal block): the whole `flash_prefill` call, the kernel's
wrapper, its pieces (`supported`, the four TMA descriptors, the work counter), the Gluon launch with
its arguments built, Triton's argument binding alone, and the compiled kernel's launcher alone. Host
microseconds per call (median of 7 rounds of `--calls` calls, the GPU synchronised every 25 calls so
that the launch queue never fills). A development script (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_launch_host.py [--tokens 2048] [--calls 400]
"""

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

from kernels import FlashPrefillConfig, flash_prefill
from kernels.flash_prefill import api
from kernels.flash_prefill import sparse_attention_sm90 as hk


def host_us(fn, calls: int) -> float:
    rounds = []
    for _ in range(7):
        spent = 0.0
        for i in range(calls):
            if i % 25 == 0:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            spent += time.perf_counter() - start
        rounds.append(1e6 * spent / calls)
    torch.cuda.synchronize()
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args()
    t = args.tokens
    q = torch.randn(1, t, 28, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, t, 4, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    config = FlashPrefillConfig.for_model("qwen2.5-vl", min_seq_len=2**30)
    scale = 128**-0.5
    pattern = api._kernel_causal_pattern(1, 28, t, t, 128, q.device)
    out = torch.empty_like(q)
    n, ids = pattern.kv_num_blocks, pattern.kv_indices
    d_pad = 128
    descs = [hk._descriptor(x, hk.BLOCK, d_pad) for x in (q, k, v)] + [hk._descriptor(out, hk.BLOCK // 2, d_pad)]
    nqb = nkb = ids.shape[3]
    programs = min(nqb * 28, hk._sm_count(q.device.index))
    counter = hk._work_counter(q.device)
    launch_args = (*descs, n, ids, counter, t, t, 28, 7, nkb, nqb, 0, nqb, nqb * 28, scale * hk.LOG2E, n, n)
    constexprs = dict(D_PAD=d_pad, BM=hk.BLOCK, STAGES=hk.DEFAULT_STAGES, GROUP_ORDER=True, DYNAMIC=True,
                      CONSUMER_REGS=hk.CONSUMER_REGS, TRACE_ITEMS=0, WRITE_LSE=False, num_warps=4)
    kernel = hk._sparse_attention_sm90_ws_kernel
    compiled = kernel[(programs,)](*launch_args, **constexprs)
    torch.testing.assert_close(out, hk.sparse_attention_sm90(q, k, v, n, ids, scale), atol=0, rtol=0)

    rows = {
        "flash_prefill below min_seq_len (whole call)": lambda: flash_prefill(q, k, v, config=config),
        "sparse_attention_sm90 (the kernel's wrapper)": lambda: hk.sparse_attention_sm90(q, k, v, n, ids, scale,
                                                                                         out=out),
        "supported": lambda: hk.supported(q, k, v, 128),
        "4 TMA descriptors": lambda: [hk._descriptor(x, hk.BLOCK, d_pad) for x in (q, k, v, out)],
        "work counter": lambda: hk._work_counter(q.device),
        "Gluon launch, arguments built": lambda: kernel[(programs,)](*launch_args, **constexprs),
    }
    try:
        device = torch.cuda.current_device()
        binder = kernel.device_caches[device][-1]
        bound, _, _ = binder(*launch_args, **constexprs)
        values = list(bound.values())
        rows["Triton's argument binding alone"] = lambda: binder(*launch_args, **constexprs)
        rows["compiled kernel's launcher alone"] = lambda: compiled[(programs, 1, 1)](*values)
    except Exception as error:  # another Triton's internals: report, time the rest
        print(f"(binder / launcher rows skipped: {type(error).__name__}: {error})")
    print(f"| {t} tokens: piece | host us per call |")
    print("|---|---|")
    for name, fn in rows.items():
        print(f"| {name} | {host_us(fn, args.calls):.1f} |", flush=True)
    profile = cProfile.Profile()
    profile.enable()
    for i in range(400):
        if i % 25 == 0:
            torch.cuda.synchronize()
        flash_prefill(q, k, v, config=config)
    profile.disable()
    listing = io.StringIO()
    pstats.Stats(profile, stream=listing).sort_stats("tottime").print_stats(18)
    print(listing.getvalue())


if __name__ == "__main__":
    main()
