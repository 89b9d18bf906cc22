"""On the GPU: where the host time of an eager flash_prefill call goes at short lengths.

`python3 scripts/gpu_host_profile.py [--tokens 4096] [--json FILE]`: host microseconds per call of
each piece of the sparse path (the pattern stage, the attention launch and its parts), measured
as the mean over many calls with the GPU kept busy enough not to block the host, plus a cProfile
listing of the whole call. A development script (results go to BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch

from kernels import FlashPrefillConfig, flash_prefill
from kernels.bench import bench_ms, environment, graphed
from kernels.flash_prefill import api
from kernels.flash_prefill import pattern as pattern_kernels
from kernels.flash_prefill import sparse_attention_sm90 as sm90
from kernels.testing import structured_qkv


def host_us(fn, calls: int = 100) -> float:
    """Mean host time of fn in microseconds: the launches queue on the GPU while the host runs."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def profile_length(t: int) -> dict:
    q, k, v = structured_qkv(1, t, t, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    cfg = FlashPrefillConfig(min_seq_len=0)
    scale = 128**-0.5
    pattern = api._find_pattern_triton(q, k, cfg, scale)
    out = torch.empty_like(q)
    d_pad = 128
    row = {"tokens": t, "density": pattern.density()}
    row["whole_host_us"] = host_us(lambda: flash_prefill(q, k, v, cfg))
    row["pattern_host_us"] = host_us(lambda: api._find_pattern_triton(q, k, cfg, scale))
    row["attention_host_us"] = host_us(lambda: api._sparse_attention_triton(q, k, v, pattern, scale))
    row["sm90_call_host_us"] = host_us(lambda: sm90.sparse_attention_sm90(
        q, k, v, pattern.kv_num_blocks, pattern.kv_indices, scale, out=out))
    row["supported_host_us"] = host_us(lambda: sm90.supported(q, k, v, 128))
    row["descriptors_host_us"] = host_us(lambda: [sm90._descriptor(x, 128, d_pad) for x in (q, k, v)])
    row["counter_host_us"] = host_us(lambda: torch.zeros(1, dtype=torch.int32, device="cuda"))
    row["empty_host_us"] = host_us(lambda: torch.empty_like(q))
    api.USE_HOPPER_KERNEL = False
    row["triton_attention_host_us"] = host_us(lambda: api._sparse_attention_triton(q, k, v, pattern, scale))
    api.USE_HOPPER_KERNEL = True
    row["whole_eager_ms"] = bench_ms(lambda: flash_prefill(q, k, v, cfg))
    graph = torch.cuda.CUDAGraph()
    flash_prefill(q, k, v, cfg)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        flash_prefill(q, k, v, cfg)
    row["whole_graph_ms"] = bench_ms(graph.replay)
    # GPU time of each pattern-stage kernel alone (CUDA-graph replay).
    kbar = pattern_kernels.block_means(k, 128, d_pad, scale, q.dtype)
    indices, counts = torch.empty_like(pattern.kv_indices), torch.empty_like(pattern.kv_num_blocks)
    row["block_means_graph_ms"] = bench_ms(graphed(lambda: pattern_kernels.block_means(k, 128, d_pad, scale, q.dtype)))
    row["build_index_graph_ms"] = bench_ms(graphed(
        lambda: pattern_kernels.build_index(q, kbar, indices, counts, cfg, t, False)))
    row["pattern_graph_ms"] = bench_ms(graphed(lambda: api._find_pattern_triton(q, k, cfg, scale)))
    row["attention_graph_ms"] = bench_ms(graphed(lambda: api._sparse_attention_triton(q, k, v, pattern, scale)))
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        flash_prefill(q, k, v, cfg)
    profile.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    row["profile_tottime"] = text.getvalue()
    print(row["profile_tottime"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = [profile_length(t) for t in args.tokens]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": environment(), "rows": rows}, fh, indent=1)
    print("| tokens | density | whole host us | pattern | attention | sm90 call | supported | 3 descriptors | "
          "zeroed counter | empty | Triton attention | whole eager ms | whole graph ms | block means graph ms | "
          "index graph ms | pattern graph ms | attention graph ms |")
    for r in rows:
        print(f"| {r['tokens']} | {100 * r['density']:.1f}% | {r['whole_host_us']:.0f} | {r['pattern_host_us']:.0f} | "
              f"{r['attention_host_us']:.0f} | {r['sm90_call_host_us']:.0f} | {r['supported_host_us']:.1f} | "
              f"{r['descriptors_host_us']:.1f} | {r['counter_host_us']:.1f} | {r['empty_host_us']:.1f} | "
              f"{r['triton_attention_host_us']:.0f} | {r['whole_eager_ms']:.3f} | {r['whole_graph_ms']:.3f} | "
              f"{r['block_means_graph_ms']:.4f} | {r['build_index_graph_ms']:.4f} | {r['pattern_graph_ms']:.4f} | "
              f"{r['attention_graph_ms']:.4f} |")


if __name__ == "__main__":
    main()
