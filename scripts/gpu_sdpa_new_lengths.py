"""What a key length SDPA has not run before costs, per backend: the Qwen2.5-VL-7B attention shape
(28 query / 4 KV heads, head dim 128, bf16, GQA in SDPA), as a decoding step (1 query over all
keys, no mask) and as a causal prefill (queries = keys). For each backend, the wall time of one
synchronised call at a length not run before (`--lengths` new lengths in a row, the median), then
at a length just run (median of as many), then 28 calls in a row (a forward's layers) at a new
length and at a length just run. A development script (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_sdpa_new_lengths.py [--lengths 12]
"""

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "cuDNN": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "memory-efficient": [SDPBackend.EFFICIENT_ATTENTION],
}
_fresh = itertools.count()


def call_ms(q_len: int, k_len: int, backend, calls: int = 1) -> float:
    """Wall ms of `calls` back-to-back calls on fresh tensors, synchronised before and after."""
    q = torch.randn(1, 28, q_len, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, k_len, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    causal = q_len > 1
    with sdpa_kernel(backend):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, default=12)
    args = parser.parse_args()
    cases = {"decoding step over ~16K keys": (1, 16414), "decoding step over ~131K keys": (1, 131102),
             "prefill of ~4K tokens": (None, 4096), "prefill of ~9K tokens": (None, 9000)}
    print("| call | backend | 1 call, new length ms | 1 call, length just run ms | 28 calls, new length ms | "
          "28 calls, length just run ms |")
    print("|---|---|---|---|---|---|")
    for (case, (q_len, base)), (name, backend) in itertools.product(cases.items(), BACKENDS.items()):
        row = []
        try:
            for calls in (1, 28):
                new, again = [], []
                for _ in range(args.lengths):
                    length = base + 64 + next(_fresh)  # never run before in this process
                    ql = length if q_len is None else q_len
                    new.append(call_ms(ql, length, backend, calls))
                    again.append(call_ms(ql, length, backend, calls))
                row += [statistics.median(new), statistics.median(again)]
        except RuntimeError as error:  # the backend refuses this call
            print(f"| {case} | {name} | refused: {str(error).splitlines()[0][:80]} | | | |", flush=True)
            continue
        print(f"| {case} | {name} | " + " | ".join(f"{x:.3f}" for x in row) + " |", flush=True)


if __name__ == "__main__":
    main()
