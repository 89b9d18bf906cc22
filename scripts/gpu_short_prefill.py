"""The language model's prefill attention below FlashPrefill's `min_seq_len`, where the sparse mode
runs dense: what each dense way costs for a forward's 28 layers at a prompt length the process has
not run before (a user's video) and at a length just run (a batch of alike videos). The
Qwen2.5-VL-7B attention shape (28 query / 4 KV heads, head dim 128, bf16), causal, queries = keys:

- SDPA as it chooses (cuDNN on the H200), and SDPA with cuDNN excluded (flash);
- this project's kernel with every block kept (`flash_prefill` at alpha 0, min_seq_len 0: block
  means, the index build, which skips the scores at alpha 0, and the attention kernel);
- `flash_prefill` below its `min_seq_len` (fifteenth session on: where the Hopper kernel takes
  the call, that kernel over the causal pattern built by torch ops, no pattern kernels; sixteenth
  session on: built once per shape, so once for the 28 calls), and the same with the pattern built
  at every call (the fifteenth session's code);
- (nineteenth session) `flash_prefill` below its `min_seq_len` with every kernel launched through
  Triton's launch (`kernels.runtime.DIRECT_LAUNCH = False`), the code before that session;
- (twentieth session) `flash_prefill` below its `min_seq_len` on the Hopper kernel at every length
  (`api.DENSE_FLASH_BELOW = 0`) and as the direct flash-attention call at every length
  (`DENSE_FLASH_BELOW` above it), around the default threshold;
- (twenty-first session) the Hopper kernel at every length with its launches built in full at every
  call (`kernels.runtime.PREPARED_LAUNCHES = 0`).

Each cell: the wall time of 28 synchronised back-to-back calls on fresh (B, T, H, D) tensors, the
median over `--lengths` new lengths (`--step`, 2 x `--step`, ... tokens above the length named, the
same lengths for every way: what cuDNN and the causal pattern's cache keep per length is each
way's own, and each way meets each length first in its own new-length cell), and over the same
lengths run again at once. A development script (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_short_prefill.py [--tokens 2048 4096 ...] [--lengths 5]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import FlashPrefillConfig, flash_prefill, runtime
from kernels.flash_prefill import api

ALL_KEPT = FlashPrefillConfig.for_model("qwen2.5-vl", alpha=0.0, min_seq_len=0)
BELOW_MIN = FlashPrefillConfig.for_model("qwen2.5-vl", min_seq_len=2**30)  # every length under it


def sdpa(backends):
    def run(q, k, v):
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
    return run


def tritons_launch(way):
    def run(q, k, v):
        runtime.DIRECT_LAUNCH = False
        try:
            way(q, k, v)
        finally:
            runtime.DIRECT_LAUNCH = True
    return run


def flash_below(tokens: int, way):
    def run(q, k, v):
        kept, api.DENSE_FLASH_BELOW = api.DENSE_FLASH_BELOW, tokens
        try:
            way(q, k, v)
        finally:
            api.DENSE_FLASH_BELOW = kept
    return run


def not_prepared(way):
    """`way` with the Hopper kernel's launches built in full at every call (before the twenty-first
    session)."""
    def run(q, k, v):
        kept, runtime.PREPARED_LAUNCHES = runtime.PREPARED_LAUNCHES, 0
        try:
            way(q, k, v)
        finally:
            runtime.PREPARED_LAUNCHES = kept
    return run


def below_min(q, k, v):
    flash_prefill(q, k, v, config=BELOW_MIN)


WAYS = {
    "SDPA's choice (cuDNN)": sdpa([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                   SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]),
    "SDPA without cuDNN (flash)": sdpa([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                        SDPBackend.MATH]),
    "ours, every block kept": lambda q, k, v: flash_prefill(q, k, v, config=ALL_KEPT),
    "flash_prefill below min_seq_len": below_min,
    "same, causal pattern built per call": lambda q, k, v: (api._cached_causal_pattern.cache_clear(),
                                                            flash_prefill(q, k, v, config=BELOW_MIN)),
    "same, Triton's launch": tritons_launch(below_min),
    "same, Hopper kernel at every length": flash_below(0, below_min),
    "same, flash-attention call at every length": flash_below(2**30, below_min),
    "same, Hopper kernel at every length, launches built in full": flash_below(0, not_prepared(below_min)),
}

WAY_IDS = dict(zip(["cudnn", "flash", "all-kept", "below-min", "pattern-per-call", "tritons-launch", "hopper",
                    "flash-call", "hopper-unprepared"], WAYS))


def layers_ms(way, length: int, calls: int = 28) -> float:
    """Wall ms of `calls` back-to-back calls at `length` tokens, synchronised before and after."""
    q = torch.randn(1, length, 28, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, length, 4, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        way(q, k, v)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 6144, 8192, 10240, 12288, 16384])
    parser.add_argument("--lengths", type=int, default=5)
    parser.add_argument("--step", type=int, default=48)
    parser.add_argument("--ways", nargs="+", choices=list(WAY_IDS), default=list(WAY_IDS),
                        help="which ways, by id (all by default)")
    args = parser.parse_args()
    gaps = [b - a for a, b in zip(sorted(args.tokens), sorted(args.tokens)[1:])]
    if gaps and args.step * args.lengths >= min(gaps):
        raise SystemExit("--step x --lengths must stay below the gap between --tokens: lengths would repeat")
    ways = {WAY_IDS[i]: WAYS[WAY_IDS[i]] for i in args.ways}
    for way in ways.values():  # compile and load everything at a length not timed
        layers_ms(way, 1000, calls=2)
    print("| tokens | way | 28 layers, new length ms | 28 layers, length just run ms |")
    print("|---|---|---|---|")
    for tokens in args.tokens:
        for name, way in ways.items():
            new, again = [], []
            for i in range(1, args.lengths + 1):
                length = tokens + args.step * i  # never run before by this way
                new.append(layers_ms(way, length))
                again.append(layers_ms(way, length))
            print(f"| {tokens} | {name} | {statistics.median(new):.2f} | {statistics.median(again):.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
