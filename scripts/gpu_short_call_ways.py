"""Dense causal attention at short prompt lengths, one layer's call at a time: which kernel, called
how, gives the least wall time for 28 back-to-back calls (a forward's layers) where the calls are
bound by host time. Ways, alternated round by round on the same inputs:

- SDPA's cuDNN backend (its plan built for the length first);
- the Hopper kernel's wrapper over every causal block (the dense fallback's kernel);
- the same with its launch's TMA maps memoised: Triton's `make_tensordesc_arg` wrapped, in this
  process only, by a cache keyed on everything the map is encoded from (a trial, not the product);
- the Triton kernel over every causal block, pointer loads (`tma=0`) and tensor descriptors (2);
- the flash-attention call (`api.dense_flash`);
- `flash_prefill` below its `min_seq_len`, as the product runs it (`api.DENSE_FLASH_BELOW` as set).

Each cell: the median over `--rounds` rounds of the wall time of 28 calls, synchronised before and
after, microseconds per call; and each way's host time per call (the same calls with the GPU
synchronised every 7 calls, host time summed). A development script (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_short_call_ways.py [--tokens 1024 1536 2048] [--rounds 7]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from gpu_launch_host import host_us
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import FlashPrefillConfig, flash_prefill
from kernels.flash_prefill import api
from kernels.flash_prefill import sparse_attention as triton_kernels
from kernels.flash_prefill import sparse_attention_sm90 as hopper_kernels

BELOW_MIN = FlashPrefillConfig.for_model("qwen2.5-vl", min_seq_len=2**30)


def memoised_maps():
    """Wrap Triton's TMA map encoding (its NVIDIA driver's `make_tensordesc_arg`) in a cache keyed
    on what the map is encoded from; returns a switch (True: cached)."""
    from triton.backends.nvidia import driver as nvidia_driver

    plain = nvidia_driver.make_tensordesc_arg
    cache = {}
    state = {"on": False}

    def cached(arg, metadata, *rest):
        if not state["on"] or metadata is None:
            return plain(arg, metadata, *rest)
        key = (arg.base.data_ptr(), tuple(arg.shape), tuple(arg.strides), arg.padding, id(metadata))
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = plain(arg, metadata, *rest)
        return hit

    nvidia_driver.make_tensordesc_arg = cached
    return state


def ways_at(t: int, maps: dict) -> dict:
    """The ways timed at `t` tokens, by name, on one set of inputs."""
    q = torch.randn(1, t, 28, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, t, 4, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    scale = 128**-0.5
    causal = api._causal_pattern(1, 28, t, t, 128, q.device)
    n, ids = causal.kv_num_blocks, causal.kv_indices

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)

    def hopper():
        hopper_kernels.sparse_attention_sm90(q, k, v, n, ids, scale)

    def hopper_cached():
        maps["on"] = True
        try:
            hopper_kernels.sparse_attention_sm90(q, k, v, n, ids, scale)
        finally:
            maps["on"] = False

    def triton_kernel(tma):
        return lambda: triton_kernels.sparse_attention(q, k, v, n, ids, 128, scale, 128, False, tma=tma)

    return {
        "SDPA cuDNN": cudnn,
        "Hopper kernel": hopper,
        "Hopper kernel, TMA maps memoised": hopper_cached,
        "Triton kernel, pointer loads": triton_kernel(0),
        "Triton kernel, tensor descriptors": triton_kernel(2),
        "flash-attention call": lambda: api.dense_flash(q, k, v, scale),
        f"flash_prefill below min_seq_len (DENSE_FLASH_BELOW {api.DENSE_FLASH_BELOW})":
            lambda: flash_prefill(q, k, v, config=BELOW_MIN),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 1280, 1536, 2048])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    maps = memoised_maps()
    print("| tokens | way | wall us per call (28 calls) | host us per call |")
    print("|---|---|---|---|")
    for t in args.tokens:
        ways = ways_at(t, maps)
        for way in ways.values():
            way(), way()
        torch.cuda.synchronize()
        walls = {name: [] for name in ways}
        hosts = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, way in ways.items():
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(28):
                    way()
                torch.cuda.synchronize()
                walls[name].append(1e6 * (time.perf_counter() - start) / 28)
                hosts[name].append(host_us(way, 28, sync_every=7))
        for name in ways:
            print(f"| {t} | {name} | {statistics.median(walls[name]):.1f} | {statistics.median(hosts[name]):.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
