"""kernels.window_attention per launch shape (heads per program, warps) against kernels.rope and
then PyTorch's variable-length flash kernel, on Qwen2.5-VL's windowed-layer shape at 131K video
tokens (524,160 patches, 8,190 windows of 64, 16 heads of 80, bf16, cos / sin fp32): time per
layer (triton.testing.do_bench), the compiled kernel's shared memory, registers and spills, and
the output's difference from the unfused path.

    PYTHONPATH=$PWD python3 scripts/gpu_window_kernel.py
"""

import torch
import triton

import models.vision as vision
from kernels.rope import rope
from kernels.window_attention import _launch

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
for heads in (16, 4, 1):
    for warps in (2, 4, 8):
        compiled, out = _launch(q, k, v, offsets, scale, cos, sin, heads, warps)
        diff = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        t = triton.testing.do_bench(
            lambda hp=heads, w=warps: _launch(q, k, v, offsets, scale, cos, sin, hp, w))
        print(f"window kernel, {heads} heads per program, {warps} warps: {t:.3f} ms per layer, "
              f"shared {compiled.metadata.shared} B, registers {compiled.n_regs}, spills {compiled.n_spills}, "
              f"relative L2 from baseline {diff:.2e}")
print(f"memory floor (q, k, v read once, output written once, 4.8 TB/s): {4 * s * h * d * 2 / 4.8e9:.3f} ms")
