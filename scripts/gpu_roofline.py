"""On the GPU: the memory roofline of sparse attention on random block masks.

`python3 scripts/gpu_roofline.py [--lengths ...] [--densities ...] [--json FILE]`. Measures the
GPU's memory bandwidth (a large sum and a large copy), then for each random block mask the bytes
the attention kernel must move from memory when no K/V block is found in L2 (each kept block's
K and V, each work item's Q read and O write), the bandwidth that time implies, and the ratio
to (density x cuDNN dense) that moving those bytes at the measured bandwidth alone would give.
Random masks draw independent blocks per head, so K/V blocks are rarely shared between the work
items that run together; as a control, the same kind of mask shared by each KV group's heads.
A development script (results go to BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json

import torch

from kernels.bench import bench_ms, cudnn_dense_ms, environment
from kernels.flash_prefill import api
from kernels.testing import random_pattern, random_qkv

BLOCK = 128


def bandwidth() -> dict:
    """GB/s of a 4 GiB bf16 sum (reads) and copy (reads + writes)."""
    x = torch.randn(2 * 1024**3, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    read = nbytes / bench_ms(lambda: x.sum()) / 1e6
    copy = 2 * nbytes / bench_ms(lambda: y.copy_(x)) / 1e6
    return {"read_gbs": read, "copy_gbs": copy}


def attention_ms(q, k, v, pattern) -> float:
    return bench_ms(lambda: api._sparse_attention_triton(q, k, v, pattern, q.shape[-1] ** -0.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.25])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    bw = bandwidth()
    best = max(bw.values())
    print(environment())
    print(f"memory bandwidth: sum {bw['read_gbs']:.0f} GB/s, copy {bw['copy_gbs']:.0f} GB/s")
    rows = []
    hq, h, d = 28, 4, 128
    tile_bytes = BLOCK * d * 2
    for t in args.lengths:
        q, k, v = random_qkv(1, t, t, hq, h, d, dtype=torch.bfloat16, device="cuda")
        cudnn = cudnn_dense_ms(q, k, v)
        items = (t // BLOCK) * hq
        for density in args.densities:
            pattern = random_pattern(1, hq, t, BLOCK, density, "cuda", seed=t)
            dens = pattern.density()
            blocks = int(pattern.kv_num_blocks.sum().item())
            ms = attention_ms(q, k, v, pattern)
            nbytes = blocks * 2 * tile_bytes + items * 2 * tile_bytes
            floor_ms = nbytes / best / 1e6
            row = {"tokens": t, "density": dens, "ms": ms, "cudnn_ms": cudnn, "ratio": ms / (dens * cudnn),
                   "bytes": nbytes, "achieved_gbs": nbytes / ms / 1e6, "floor_ms": floor_ms,
                   "floor_ratio": floor_ms / (dens * cudnn)}
            # Control: the same kind of mask shared by the 7 query heads of each KV group, whose
            # items run side by side (group launch order), so most K/V blocks come from L2.
            shared = random_pattern(1, hq, t, BLOCK, density, "cuda", seed=t, group=hq // h)
            row["shared_density"] = shared.density()
            row["shared_ms"] = attention_ms(q, k, v, shared)
            row["shared_ratio"] = row["shared_ms"] / (row["shared_density"] * cudnn)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": environment(), "bandwidth": bw, "rows": rows}, fh, indent=1)
    print("| tokens | density | ms | ratio | GB moved without L2 reuse | implied GB/s | ratio at the measured bandwidth"
          " | mask shared by a KV group: density | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {100 * r['density']:.1f}% | {r['ms']:.3f} | {r['ratio']:.2f} | "
              f"{r['bytes'] / 1e9:.2f} | {r['achieved_gbs']:.0f} | {r['floor_ratio']:.2f} | "
              f"{100 * r['shared_density']:.1f}% | {r['shared_ratio']:.2f} |")


if __name__ == "__main__":
    main()
