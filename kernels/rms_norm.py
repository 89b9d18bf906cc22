"""A residual add and the RMSNorm after it in one pass: `total = x + y`, `normed = rms_norm(total)`,
and optionally a bias vector added to the total as it is written.

A Qwen2.5-VL vision block computes `h = h + attn(norm1(h))` and then `norm2(h)`. PyTorch runs the
add (reading two tensors, writing one) and then the norm (reading the sum again, writing one): five
passes over the hidden states. Here one kernel reads x and y once and writes the sum and the
normalised rows: four. At 131K video tokens (524,160 x 1280 in bf16) on an H200 that is 1.27 ms
against 1.72 ms for the add and `F.rms_norm` (BENCHMARKS.md).

Numerics: the sum rounded to the inputs' dtype, as PyTorch's add; the norm of that rounded sum
in fp32, times the weight, rounded once, as `torch.nn.functional.rms_norm`. With `bias`, the
written total is that rounded sum plus the bias, rounded again (PyTorch's `total + bias`); the
norm is still that of the sum. `models.vision` gives the MLP's output bias here, so the MLP can
add its product into the total in place (cuBLAS's accumulating product) instead of a separate
residual add.

x, y: (rows, N), contiguous, one dtype of fp16 / bf16 / fp32; weight and bias: (N,) of that
dtype. The total may be written over y (`out=y`). `add_rms_norm_reference` is the readable
PyTorch form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .runtime import Launcher, PreparedLaunches, check_device

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_WIDTH = 16384  # one row per program, held in registers


# M is not specialised: a new token count compiles nothing.
@triton.jit(do_not_specialize=["M"])
def _add_rms_norm_kernel(X, Y, W, B, SUM, OUT, M, eps, N: tl.constexpr, BLOCK_N: tl.constexpr, BIAS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    offs = row * N + cols
    x = tl.load(X + offs, mask=mask, other=0.0)
    # In fp32 and rounded: what a half-precision add gives (and Triton's interpreter adds bf16 wrongly).
    total = (x.to(tl.float32) + tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
    t = total.to(tl.float32)
    if BIAS:
        total = (t + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
    tl.store(SUM + offs, total, mask=mask)
    inv = tl.rsqrt(tl.sum(t * t, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (t * inv * w).to(OUT.dtype.element_ty), mask=mask)


_add_rms_norm_launch = Launcher(_add_rms_norm_kernel)
# (x, y, weight, bias, total, normed)
_add_rms_norm_prepared = PreparedLaunches(_add_rms_norm_launch, varying=(0, 1, 2, 3, 4, 5))


def add_rms_norm_reference(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                           bias: torch.Tensor | None = None):
    """(x + y [+ bias], F.rms_norm(x + y) with `weight`), the norm computed in fp32 and rounded once."""
    total = x + y
    normed = F.rms_norm(total.float(), (total.shape[-1],), weight.float(), eps)
    return total if bias is None else total + bias, normed.to(total.dtype)


def check(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
          bias: torch.Tensor | None = None) -> None:
    """Raise ValueError / TypeError for inputs `add_rms_norm` does not take."""
    if x.dim() != 2 or y.shape != x.shape:
        raise ValueError(f"x and y must be one (rows, N) shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    vectors = (weight,) if bias is None else (weight, bias)
    if any(t.shape != (x.shape[1],) for t in vectors):
        raise ValueError(f"weight and bias must be ({x.shape[1]},), got {[tuple(t.shape) for t in vectors]}")
    if not 0 < x.shape[1] <= MAX_WIDTH:
        raise ValueError(f"rows of 1 to {MAX_WIDTH} elements are supported, got {x.shape[1]}")
    if x.dtype not in _DTYPES or any(t.dtype != x.dtype for t in (y, *vectors)):
        raise TypeError(f"x, y, weight and bias must share one of {_DTYPES}, got "
                        f"{[t.dtype for t in (x, y, *vectors)]}")
    tensors = (x, y, *vectors) if out is None else (x, y, *vectors, out)
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("x, y, weight, bias and out must be contiguous")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(f"out must have x's shape {tuple(x.shape)} and dtype {x.dtype}")
    check_device("add_rms_norm", x.device)
    if any(t.device != x.device for t in tensors):
        raise ValueError("x, y, weight, bias and out must be on one device")


def supported(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> bool:
    """Whether `add_rms_norm` takes these inputs (`check` passes)."""
    try:
        check(x, y, weight, out, bias)
    except (TypeError, ValueError):
        return False
    return True


def add_rms_norm(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y [+ bias], the RMSNorm of x + y times `weight`): the total into `out` (which may be y
    itself) or a new tensor, the normalised rows into a new tensor."""
    check(x, y, weight, out, bias)
    total = torch.empty_like(x) if out is None else out
    normed = torch.empty_like(x)
    rows, n = x.shape
    if rows:
        tensors = (x, y, weight, weight if bias is None else bias, total, normed)
        key = None
        if _add_rms_norm_prepared.active():
            key = (x.shape, x.dtype, y.dtype, weight.dtype, None if bias is None else bias.dtype, eps, x.device.index,
                   *(t.data_ptr() % 16 for t in tensors))
        _add_rms_norm_prepared.launch(key, tensors, lambda: (
            (rows,), (*tensors, rows, eps),
            dict(N=n, BLOCK_N=triton.next_power_of_2(n), BIAS=bias is not None, num_warps=4)))
    return total, normed
