"""kernels.window_attention per launch shape (heads per program, warps) against kernels.rope and
then PyTorch's variable-length flash kernel, on Qwen2.5-VL's windowed-layer shape at 131K video
tokens (524,160 patches, 8,190 windows of 64, 16 heads of 80, bf16, cos / sin fp32): time per
layer (triton.testing.do_bench), the compiled kernel's shared memory, registers and spills, and
the output's difference from the unfused path. Also a rejected variant, one tile over the whole
head dim with the rotate-half partner read as a shifted load (`_one_tile_kernel`, run 10).

    PYTHONPATH=$PWD python3 scripts/gpu_window_kernel.py [--stages 0 1 2 3] [--heads 16 8] [--warps 4]
        [--one-tile]
"""

import argparse

import torch
import triton
import triton.language as tl

import models.vision as vision
from kernels.rope import rope
from kernels.window_attention import _launch


@triton.jit
def _one_tile_kernel(Q, K, V, COS, SIN, OFFSETS, OUT, stride_qs, stride_qh, stride_ks, stride_kh, stride_vs,
                     stride_vh, stride_cs, H, scale, D: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """The variant with the head dim as one tile padded to BLOCK_D, the rotate-half partner loaded
    as a second, shifted read of q and k (cos and sin with the stride of COS)."""
    chunk = tl.program_id(0)
    start = tl.load(OFFSETS + chunk).to(tl.int64)
    n = tl.load(OFFSETS + chunk + 1).to(tl.int64) - start
    i = tl.arange(0, BLOCK)
    rows = start + i
    cols = tl.arange(0, BLOCK_D)
    partner = tl.where(cols < HALF, cols + HALF, cols - HALF)
    sign = tl.where(cols < HALF, -1.0, 1.0)
    mask = (i[:, None] < n) & (cols[None, :] < D)
    c = tl.load(COS + rows[:, None] * stride_cs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sn = tl.load(SIN + rows[:, None] * stride_cs + cols[None, :], mask=mask, other=0.0).to(tl.float32) * sign
    keys = i[None, :] < n
    qk_scale = scale * 1.4426950408889634
    for h in range(H):
        qp = Q + h * stride_qh + rows[:, None] * stride_qs
        kp = K + h * stride_kh + rows[:, None] * stride_ks
        q = tl.load(qp + cols[None, :], mask=mask, other=0.0)
        k = tl.load(kp + cols[None, :], mask=mask, other=0.0)
        q = (q.to(tl.float32) * c + tl.load(qp + partner[None, :], mask=mask, other=0.0).to(tl.float32) * sn)
        k = (k.to(tl.float32) * c + tl.load(kp + partner[None, :], mask=mask, other=0.0).to(tl.float32) * sn)
        v = tl.load(V + h * stride_vh + rows[:, None] * stride_vs + cols[None, :], mask=mask, other=0.0)
        s = tl.dot(q.to(v.dtype), tl.trans(k.to(v.dtype)))
        s = tl.where(keys, s * qk_scale, float("-inf"))
        p = tl.exp2(s - tl.max(s, axis=1)[:, None])
        denominator = tl.sum(p, axis=1)[:, None]
        o = tl.dot(p.to(v.dtype), v) / denominator
        tl.store(OUT + (rows[:, None] * H + h) * D + cols[None, :], o.to(OUT.dtype.element_ty), mask=mask)


def one_tile(q, k, v, offsets, scale, cos, sin, num_warps):
    s, h, d = q.shape
    out = torch.empty(s, h, d, dtype=q.dtype, device=q.device)
    compiled = _one_tile_kernel[(offsets.numel() - 1,)](
        q, k, v, cos, sin, offsets, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), cos.stride(0), h, scale, D=d, HALF=d // 2, BLOCK=64, BLOCK_D=triton.next_power_of_2(d),
        num_warps=num_warps)
    return compiled, out


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--heads", type=int, nargs="+", default=[16], help="heads per program (run 7: 16 4 1)")
parser.add_argument("--warps", type=int, nargs="+", default=[4], help="warps per program (run 7: 2 4 8)")
parser.add_argument("--stages", type=int, nargs="+", default=[0],
                    help="software pipeline depths over the heads; 0 is Triton's default")
parser.add_argument("--one-tile", action="store_true", help="also time the rejected one-tile variant")
args = parser.parse_args()
s, h, d = 8190 * 64, 16, 80
qkv = torch.randn(s, 3, h, d, device="cuda", dtype=torch.bfloat16)
q, k, v = qkv.unbind(1)
angles = torch.randn(s, d // 2, device="cuda") * 20
angles = torch.cat([angles, angles], -1)
cos, sin = angles.cos(), angles.sin()
offsets = torch.arange(0, s + 1, 64, device="cuda", dtype=torch.int32)
scale = d**-0.5


def baseline():
    qr, kr = rope(q, k, cos, sin)
    return vision._varlen_flash(qr, kr, v, offsets, 64, scale)


ref = baseline()
ms = triton.testing.do_bench(baseline)
print(f"rope + varlen flash: {ms:.3f} ms per layer")
for stages in args.stages:
    for heads in args.heads:
        for warps in args.warps:
            ns = stages or None
            compiled, out = _launch(q, k, v, offsets, scale, cos, sin, heads, warps, ns)
            diff = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            t = triton.testing.do_bench(
                lambda hp=heads, w=warps, n=ns: _launch(q, k, v, offsets, scale, cos, sin, hp, w, n))
            print(f"window kernel, {stages or 'default'} stages, {heads} heads per program, {warps} warps: "
                  f"{t:.3f} ms per layer, shared {compiled.metadata.shared} B, registers {compiled.n_regs}, "
                  f"spills {compiled.n_spills}, relative L2 from baseline {diff:.2e}")
for warps in (4, 8) if args.one_tile else ():
    compiled, out = one_tile(q, k, v, offsets, scale, cos, sin, warps)
    diff = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    t = triton.testing.do_bench(lambda w=warps: one_tile(q, k, v, offsets, scale, cos, sin, w))
    print(f"one-tile variant, {warps} warps: {t:.3f} ms per layer, shared {compiled.metadata.shared} B, "
          f"registers {compiled.n_regs}, spills {compiled.n_spills}, relative L2 from baseline {diff:.2e}")
print(f"memory floor (q, k, v read once, output written once, 4.8 TB/s): {4 * s * h * d * 2 / 4.8e9:.3f} ms")
