"""The gated GEMV (kernels.gemv.gated_gemv) with the gate's and the up's rows in one loop over K
(each chunk of x, and of the norm's weight, loaded once; the norm's sum of squares once) against
the kept kernel's two loops, on the Qwen2.5-VL-7B shape (18,944 x 3,584, bf16), cold weights
(copies taken in turn), with and without the norm inside, for a few launch settings. GPU time from
CUDA graphs (`gpu_graph_decode.graph_ms`). A development script (results go to BENCHMARKS.md):

    PYTHONPATH=$PWD python3 scripts/gpu_gated_loop.py
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from gpu_graph_decode import graph_ms  # (this script's folder is on the path)

import kernels.gemv as gemv_module
from kernels.runtime import Launcher
from videoprefill.bench import markdown_table

HIDDEN, WIDTH = 3584, 18944


@triton.jit
def _gated_one_loop_kernel(X, G, WG, WU, Y, N, K, eps, NORM: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    block = tl.program_id(0)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offsets = rows[:, None].to(tl.int64) * K
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        mask = row_ok[:, None] & col_ok[None, :]
        wg = tl.load(WG + offsets + cols[None, :], mask=mask, other=0.0)
        wu = tl.load(WU + offsets + cols[None, :], mask=mask, other=0.0)
        x = tl.load(X + cols, mask=col_ok, other=0.0).to(tl.float32)
        if NORM:
            squares += x * x
            x = x * tl.load(G + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc_g += wg.to(tl.float32) * x[None, :]
        acc_u += wu.to(tl.float32) * x[None, :]
    g = tl.sum(acc_g, axis=1)
    u = tl.sum(acc_u, axis=1)
    if NORM:
        scale = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        g = g * scale
        u = u * scale
    tl.store(Y + rows, (g / (1.0 + tl.exp(-g)) * u).to(Y.dtype.element_ty), mask=row_ok)


_one_loop = Launcher(_gated_one_loop_kernel)


def one_loop(x, gate, up, norm, setting):
    block_n, block_k, warps = setting
    y = x.new_empty(*x.shape[:-1], WIDTH)
    _one_loop[(triton.cdiv(WIDTH, block_n),)](x, x if norm is None else norm[0], gate, up, y, WIDTH, HIDDEN,
                                             0.0 if norm is None else norm[1], NORM=norm is not None,
                                             BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y


def timings(x, gates, ups, norm, setting) -> tuple[float, float]:
    """(two loops, one loop) GPU ms of one launch, the weight copies taken in turn."""
    turn = itertools.count()
    stock_config = gemv_module.config

    def kept():
        i = next(turn) % len(gates)
        return gemv_module.gated_gemv(x, (gates[i], None), (ups[i], None), norm=norm)

    def merged():
        i = next(turn) % len(gates)
        return one_loop(x, gates[i], ups[i], norm, setting)

    gemv_module.config = lambda r, k, gated=False: setting
    try:
        two = graph_ms(kept)
    finally:
        gemv_module.config = stock_config
    return two, graph_ms(merged)


def main() -> None:
    torch.manual_seed(0)
    count = -(-100 * 2**20 // (2 * WIDTH * HIDDEN))
    gates = [torch.randn(WIDTH, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]
    ups = [torch.randn(WIDTH, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.1 + 1
    rows = []
    for norm in (None, (weight, 1e-6)):
        expected = gemv_module.gated_gemv_reference(x, (gates[0], None), (ups[0], None), norm=norm)
        for setting in [(8, 256, 4), (8, 512, 4), (4, 512, 4), (8, 256, 8), (16, 256, 8), (4, 256, 4)]:
            got = one_loop(x, gates[0], ups[0], norm, setting)
            torch.testing.assert_close(got, expected, rtol=2**-7, atol=2**-7)
            kept, merged = timings(x, gates, ups, norm, setting)
            rows.append({"norm": "inside" if norm else "none", "setting": str(setting), "kept": kept * 1e3,
                         "one": merged * 1e3})
            print(rows[-1], flush=True)
    print(markdown_table(rows, [("norm", "norm", "s"), ("(BLOCK_N, BLOCK_K, warps)", "setting", "s"),
                                ("two loops (kept) us", "kept", ".1f"), ("one loop us", "one", ".1f")]))


if __name__ == "__main__":
    main()
