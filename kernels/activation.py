"""The gated MLP's activation, fused: silu(gate) * up in one pass.

Qwen-VL's gated MLPs (both towers) compute `down(silu(gate(x)) * up(x))`. PyTorch runs the middle
as two kernels, `silu(gate)` and the product, each writing a tensor of the MLP's width: at 128K
tokens in the 7B language model that is 5 GB per tensor per layer. Here one kernel reads gate and
up once and writes the product once, in fp32 and rounded once to the inputs' dtype (PyTorch
rounds after the silu and again after the product). `out=gate` writes it over gate in place, so
no third tensor of that size is allocated.

gate, up: one shape, one dtype (fp16, bf16, fp32), contiguous, on one CUDA device (or CPU under
TRITON_INTERPRET=1). `silu_mul_reference` is the readable PyTorch form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .runtime import Launcher, PreparedLaunches, check_device

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# N stays specialised: its divisibility by 16 lets the masked loads be vectorised, and the
# widths of Qwen-VL's MLPs (18944, 3456 padded) make N a multiple of 16 at every length.
@triton.jit
def _silu_mul_kernel(GATE, UP, OUT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    out = g / (1.0 + tl.exp(-g)) * u
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


_silu_mul_launch = Launcher(_silu_mul_kernel)
_silu_mul_prepared = PreparedLaunches(_silu_mul_launch, varying=(0, 1, 2))  # (gate, up, out)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32, rounded to gate's dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def check(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> None:
    """Raise ValueError / TypeError for inputs `silu_mul` does not take."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype not in _DTYPES or up.dtype != gate.dtype:
        raise TypeError(f"gate and up must share one of {_DTYPES}, got {gate.dtype} and {up.dtype}")
    if not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError("gate and up must be contiguous")
    if out is not None and (out.shape != gate.shape or out.dtype != gate.dtype or not out.is_contiguous()
                            or out.device != gate.device):
        raise ValueError("out must be a contiguous tensor of gate's shape, dtype and device")
    check_device("silu_mul", gate.device)
    if up.device != gate.device:
        raise ValueError(f"gate and up must be on one device, got {gate.device} and {up.device}")


def silu_mul(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None, block: int = 2048) -> torch.Tensor:
    """silu(gate) * up, into `out` (which may be gate itself) or a new tensor."""
    check(gate, up, out)
    out = torch.empty_like(gate) if out is None else out
    n = gate.numel()
    if n:
        key = None
        if _silu_mul_prepared.active():
            key = (n, gate.dtype, up.dtype, out.dtype, block, gate.device.index, gate.data_ptr() % 16,
                   up.data_ptr() % 16, out.data_ptr() % 16)
        _silu_mul_prepared.launch(key, (gate, up, out), lambda: (
            (triton.cdiv(n, block),), (gate, up, out, n), dict(BLOCK=block, num_warps=8)))
    return out
