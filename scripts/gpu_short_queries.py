"""Queries shorter than their keys off SDPA's cuDNN backend (`kernels.flash_prefill.api.
SHORT_QUERY_BACKENDS`, as kept) against cuDNN allowed (before), alternated in one process:

1. `kernels.flash_prefill.dense_attention` for a question's 32 tokens over a prompt under
   `min_seq_len` (the 7B attention shape), one synchronised call at a key length never run before
   (median over 8 lengths), and the two ways' largest difference;
2. first questions about synthetic videos on the Qwen2.5-VL-7B architecture (random weights,
   `videoprefill.bench.cold_qa`) at prompt lengths never run before (4K-6K video tokens: the
   sparse mode runs them dense, under `min_seq_len`), sparse and dense, TTFT without decoding;
   3 of each way, alternated.

A development script (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_short_queries.py
"""

import itertools
import statistics
import time

import torch
from torch.nn.attention import SDPBackend

from kernels.flash_prefill import api
from videoprefill.bench import cold_qa, synthetic_request

KEPT = list(api.SHORT_QUERY_BACKENDS)
WAYS = {"cuDNN excluded (kept)": KEPT, "cuDNN allowed": [SDPBackend.CUDNN_ATTENTION] + KEPT}
_fresh = itertools.count(1)


def use(way: str) -> None:
    api.SHORT_QUERY_BACKENDS[:] = WAYS[way]


def kernel_level() -> None:
    print("| call | way | ms, new key length (median of 8) |")
    print("|---|---|---|")
    times = {way: [] for way in WAYS}
    for _ in range(8):
        tk = 4096 + 64 * next(_fresh)
        q = torch.randn(1, 32, 28, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, tk, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for way in WAYS:
            use(way)
            torch.cuda.synchronize()
            start = time.perf_counter()
            api.dense_attention(q, k, v, 128**-0.5)
            torch.cuda.synchronize()
            times[way].append(1e3 * (time.perf_counter() - start))
    outs = []
    for way in WAYS:
        use(way)
        outs.append(api.dense_attention(q, k, v, 128**-0.5).float())
    for way, values in times.items():
        print(f"| 32 queries over 4.1-4.6K keys | {way} | {statistics.median(values):.3f} |")
    print(f"\nlargest difference between the two ways: {(outs[0] - outs[1]).abs().max().item():.3e}\n")


def requests() -> None:
    from kernels import FlashPrefillConfig

    qa = cold_qa()
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    print("| attention | way | TTFT s (no decode), 3 requests at new lengths | median |")
    print("|---|---|---|---|")
    for mode in ("sparse", "dense"):
        results = {way: [] for way in WAYS}
        for _ in range(3):
            for way in WAYS:
                use(way)
                prepared = synthetic_request(qa, 4096 + 256 * next(_fresh))
                answer = qa.run(prepared, mode, max_new_tokens=1, config=config)
                results[way].append(answer.timings["ttft_s"] - answer.timings["decode_video_s"])
        for way, values in results.items():
            print(f"| {mode} | {way} | {', '.join(f'{v:.3f}' for v in values)} | {statistics.median(values):.3f} |")
    use("cuDNN excluded (kept)")


if __name__ == "__main__":
    kernel_level()
    requests()
