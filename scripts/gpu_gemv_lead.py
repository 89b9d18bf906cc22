"""A lead for decoding steps: the language model's projections for one token (GEMVs) in a Triton
kernel against cuBLAS (`F.linear`), on the Qwen2.5-VL-7B shapes, GPU time only (CUDA graphs of 20
calls, `gpu_graph_decode.graph_ms`). Nothing in the product uses the kernel; this measures whether
one would pay.

A development script (results go to BENCHMARKS.md):

    PYTHONPATH=$PWD python3 scripts/gpu_gemv_lead.py
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from gpu_graph_decode import graph_ms  # (this script's folder is on the path)

from videoprefill.bench import markdown_table

# (name, out features N, in features K) of one decoder layer and the head, and two fused forms.
SHAPES = [("q / o", 3584, 3584), ("k, v", 512, 3584), ("q, k, v fused", 4608, 3584), ("gate, up", 18944, 3584),
          ("gate and up fused", 37888, 3584), ("down", 3584, 18944), ("lm head", 152064, 3584)]


@triton.jit
def _gemv_kernel(W, X, Y, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    """Y[n] += sum over this program's share of k of W[n, k] * X[k] (fp32 Y, zeroed before)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    span = tl.cdiv(K, SPLIT * BLOCK_K) * BLOCK_K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(pid_k * span, tl.minimum((pid_k + 1) * span, K), BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(W + rows[:, None].to(tl.int64) * K + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < K),
                    other=0.0)
        x = tl.load(X + cols, mask=cols < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    out = tl.sum(acc, axis=1)
    if SPLIT == 1:
        tl.store(Y + rows, out, mask=rows < N)
    else:
        tl.atomic_add(Y + rows, out, mask=rows < N)


def gemv(w, x, y32, block_n, block_k, split, warps):
    n, k = w.shape
    if split > 1:
        y32.zero_()
    _gemv_kernel[(triton.cdiv(n, block_n), split)](w, x, y32, n, k, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split,
                                                   num_warps=warps)
    return y32.to(torch.bfloat16)


def main() -> None:
    rows = []
    for name, n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        y32 = torch.empty(n, device="cuda", dtype=torch.float32)
        reference = (w.float() @ x.float())
        cublas = graph_ms(lambda: torch.nn.functional.linear(x[None], w))  # noqa: B023
        best = None
        for block_n, block_k, split, warps in itertools.product((8, 16, 32), (256, 512), (1, 2, 4), (4, 8)):
            if block_n * block_k > 8192:
                continue
            fn = lambda: gemv(w, x, y32, block_n, block_k, split, warps)  # noqa: B023, E731
            error = (fn().float() - reference).abs().max().item()
            ms = graph_ms(fn)
            if best is None or ms < best[0]:
                best = (ms, (block_n, block_k, split, warps), error)
        gb = n * k * 2 / 1e9
        rows.append({"shape": name, "n": n, "k": k, "cublas": cublas * 1e3, "cublas_tbs": gb / cublas,
                     "ours": best[0] * 1e3, "ours_tbs": gb / best[0], "config": str(best[1]), "error": best[2]})
        print(rows[-1], flush=True)
    print(markdown_table(rows, [("projection", "shape", "s"), ("N", "n", "d"), ("K", "k", "d"),
                                ("cuBLAS us", "cublas", ".1f"), ("cuBLAS TB/s", "cublas_tbs", ".2f"),
                                ("Triton us (best)", "ours", ".1f"), ("Triton TB/s", "ours_tbs", ".2f"),
                                ("best (BLOCK_N, BLOCK_K, split, warps)", "config", "s"),
                                ("max abs error vs fp32", "error", ".2e")]))


if __name__ == "__main__":
    main()
