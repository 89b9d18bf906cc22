"""Where a short prompt's dense-fallback call spends its time: for each length, 28 back-to-back
`flash_prefill` calls below `min_seq_len` (as scripts/gpu_short_prefill.py times them), on the
Hopper kernel and as the flash-attention call (`api.DENSE_FLASH_BELOW`), and the Triton kernel with
pointer loads over the same causal pattern (twenty-first session), under torch.profiler,
with each CUDA kernel's mean GPU time and count, the wall time of the 28 calls, and the same for
SDPA's cuDNN backend. A development script (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_short_profile.py [--tokens 1072 2096]
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from kernels import FlashPrefillConfig, flash_prefill
from kernels.flash_prefill import api
from kernels.flash_prefill import sparse_attention as triton_kernels

BELOW_MIN = FlashPrefillConfig.for_model("qwen2.5-vl", min_seq_len=2**30)


def cudnn(q, k, v):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=True)


def below_min(flash_below: int):
    """flash_prefill below its min_seq_len with api.DENSE_FLASH_BELOW set to `flash_below`."""
    def run(q, k, v):
        kept, api.DENSE_FLASH_BELOW = api.DENSE_FLASH_BELOW, flash_below
        try:
            flash_prefill(q, k, v, config=BELOW_MIN)
        finally:
            api.DENSE_FLASH_BELOW = kept
    return run


def triton_pointer_loads(q, k, v):
    """The Triton kernel (pointer loads, no tensor descriptors) over every causal block."""
    causal = api._kernel_causal_pattern(1, q.shape[2], q.shape[1], k.shape[1], 128, q.device)
    triton_kernels.sparse_attention(q, k, v, causal.kv_num_blocks, causal.kv_indices, 128, q.shape[-1] ** -0.5,
                                    128, False, tma=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1072, 2096])
    args = parser.parse_args()
    ways = {"flash_prefill below min_seq_len, Hopper kernel": below_min(0),
            "flash_prefill below min_seq_len, flash-attention call": below_min(2**30),
            "Triton kernel, pointer loads": triton_pointer_loads,
            "SDPA cuDNN": cudnn}
    for t in args.tokens:
        q = torch.randn(1, t, 28, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, t, 4, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        for name, way in ways.items():
            for _ in range(3):
                way(q, k, v)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(28):
                way(q, k, v)
            torch.cuda.synchronize()
            wall = 1e3 * (time.perf_counter() - start)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(28):
                    way(q, k, v)
                torch.cuda.synchronize()
            print(f"## {t} tokens, {name}: 28 calls {wall:.2f} ms wall")
            for event in prof.key_averages():
                if event.device_time_total > 0:
                    print(f"  {event.key[:90]}: {event.count} x {event.device_time_total / max(event.count, 1):.1f} us")


if __name__ == "__main__":
    main()
