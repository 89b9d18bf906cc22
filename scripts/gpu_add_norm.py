"""A residual add fused with the RMSNorm after it, against PyTorch's add then F.rms_norm, on the
towers' shapes at 131K video tokens (vision: 524,160 x 1280; language: 131,102 x 3584; bf16):
time per call (triton.testing.do_bench), the bandwidth it implies and the difference from the
unfused result. A development script for a lead (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_add_norm.py
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(X, R, W, SUM, OUT, M, eps, N: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None] * N + cols[None, :]
    s = (tl.load(X + offs, mask=mask, other=0.0) + tl.load(R + offs, mask=mask, other=0.0))
    tl.store(SUM + offs, s, mask=mask)
    sf = s.to(tl.float32)
    inv = tl.rsqrt(tl.sum(sf * sf, axis=1) / N + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (sf * inv[:, None] * w[None, :]).to(OUT.dtype.element_ty), mask=mask)


def add_rms_norm(x, r, w, eps, rows, warps):
    m, n = x.shape
    total = torch.empty_like(x)
    out = torch.empty_like(x)
    _add_rms_norm_kernel[(triton.cdiv(m, rows),)](x, r, w, total, out, m, eps, N=n,
                                                   BLOCK_N=triton.next_power_of_2(n), ROWS=rows, num_warps=warps)
    return total, out


def unfused(x, r, w, eps):
    total = x + r
    return total, F.rms_norm(total, (x.shape[1],), w, eps)


def bench_shape(name: str, m: int, n: int) -> None:
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    eps = 1e-6
    ref_total, ref = unfused(x, r, w, eps)
    gb = m * n * 2 / 1e9
    t_add = triton.testing.do_bench(lambda: x + r)
    t_norm = triton.testing.do_bench(lambda: F.rms_norm(ref_total, (n,), w, eps))
    t = triton.testing.do_bench(lambda: unfused(x, r, w, eps))
    print(f"{name} {m} x {n}: add {t_add:.3f} ms ({3 * gb / t_add:.2f} TB/s), F.rms_norm {t_norm:.3f} ms "
          f"({2 * gb / t_norm:.2f} TB/s), both {t:.3f} ms")
    for rows in (1, 2, 4, 8):
        for warps in (4, 8):
            if rows * triton.next_power_of_2(n) > 32768:
                continue
            total, out = add_rms_norm(x, r, w, eps, rows, warps)
            same_sum = torch.equal(total, ref_total)
            diff = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            tf = triton.testing.do_bench(lambda rw=rows, wp=warps: add_rms_norm(x, r, w, eps, rw, wp))
            print(f"  fused, {rows} rows x {warps} warps: {tf:.3f} ms ({4 * gb / tf:.2f} TB/s), "
                  f"{t / tf:.2f}x, sum identical {same_sum}, norm relative L2 {diff:.2e}")
    print(f"  floor at 4.3 TB/s: unfused {5 * gb / 4300 * 1e3:.3f} ms, fused {4 * gb / 4300 * 1e3:.3f} ms")


for shape in (("vision", 524160, 1280), ("language", 131102, 3584)):
    bench_shape(*shape)
