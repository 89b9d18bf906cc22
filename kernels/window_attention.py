"""Attention within the short chunks of a packed sequence, with the rotary embedding fused in: one
read of q, k and v and one write of the output.

Qwen2.5-VL's vision tower attends within windows of at most 8 x 8 = 64 patches in 28 of its 32
layers. A general attention kernel pads such a window to its 128-row tiles, and the rotary
embedding before it reads and writes q and k once more; at 131K video tokens both took 0.2 s of
the tower's 1.4 s of GPU time (BENCHMARKS.md, twelfth session). Here one program takes one chunk,
loads its cos and sin once and, for each head, applies the rotary embedding to q and k in
registers, computes the chunk's whole score matrix, its softmax and the output: a chunk of at
most MAX_CHUNK tokens needs no online softmax. On an H200, for Qwen2.5-VL's windowed layers at
131K video tokens: 2.23 ms per layer against 4.68 ms for `kernels.rope` and then PyTorch's flash
kernel (BENCHMARKS.md). The loop over the heads is software-pipelined two deep: a program holds
80 KiB of shared memory on the H200 (128 KiB three deep, Triton's default), and two programs fit
one of its SMs. Where a GPU has less shared memory per block than the compiled program asks,
Triton raises OutOfResources, and `models.vision` then runs the unfused path.

The head dim is split at D / 2, as the rotate-half layout splits it, so q . k and P v are two
products over D / 2 padded to a power of two (Qwen2.5-VL's 80 as two halves of 40 padded to
64). Numerics: the rotary embedding in fp32 rounded to q's dtype (as `kernels.rope`), scores and
softmax in fp32, P rounded to v's dtype for P v, fp32 accumulation.

q, k, v: (S, H, D), any strides with a unit last stride (views of the qkv projection); offsets:
int32 (n + 1,) on q's device, rising from 0 to S, no empty chunk, none longer than MAX_CHUNK; cos,
sin: (S, D) with a unit last stride, or None (no rotary embedding). fp16 and bf16; D even, at
most 256. Returns (S, H, D), contiguous, in q's dtype. `window_attention_reference` is the
readable PyTorch form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .rope import rope_reference
from .runtime import Launcher, check_device, interpreting

MAX_CHUNK = 64
_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _halves(X, rows, cols, mask, stride_s, HALF: tl.constexpr):
    x = X + rows[:, None] * stride_s + cols[None, :]
    return tl.load(x, mask=mask, other=0.0), tl.load(x + HALF, mask=mask, other=0.0)


@triton.jit
def _rotated(x1, x2, c1, c2, s1, s2, ROPE: tl.constexpr):
    if ROPE:
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        return (a * c1 - b * s1).to(x1.dtype), (b * c2 + a * s2).to(x1.dtype)
    return x1, x2


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:  # Triton's interpreter multiplies bf16 bits wrongly: fp32 there
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _window_kernel(
    Q, K, V, COS, SIN, OFFSETS, OUT,
    stride_qs, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_cs, stride_ss,
    H, scale,
    HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_HALF: tl.constexpr, ROPE: tl.constexpr, UPCAST: tl.constexpr,
    HEADS: tl.constexpr,
):
    chunk = tl.program_id(0)
    first = tl.program_id(1) * HEADS
    start = tl.load(OFFSETS + chunk).to(tl.int64)
    n = tl.load(OFFSETS + chunk + 1).to(tl.int64) - start
    i = tl.arange(0, BLOCK)
    rows = start + i
    cols = tl.arange(0, BLOCK_HALF)
    mask = (i[:, None] < n) & (cols[None, :] < HALF)
    c1, c2 = _halves(COS, rows, cols, mask & ROPE, stride_cs, HALF)  # no loads without a rotary embedding
    s1, s2 = _halves(SIN, rows, cols, mask & ROPE, stride_ss, HALF)
    c1, c2, s1, s2 = c1.to(tl.float32), c2.to(tl.float32), s1.to(tl.float32), s2.to(tl.float32)
    keys = i[None, :] < n
    qk_scale = scale * 1.4426950408889634  # softmax in base 2
    for h in range(first, tl.minimum(first + HEADS, H)):
        q1, q2 = _halves(Q + h * stride_qh, rows, cols, mask, stride_qs, HALF)
        k1, k2 = _halves(K + h * stride_kh, rows, cols, mask, stride_ks, HALF)
        v1, v2 = _halves(V + h * stride_vh, rows, cols, mask, stride_vs, HALF)
        q1, q2 = _rotated(q1, q2, c1, c2, s1, s2, ROPE)
        k1, k2 = _rotated(k1, k2, c1, c2, s1, s2, ROPE)
        s = _dot(q1, tl.trans(k1), UPCAST) + _dot(q2, tl.trans(k2), UPCAST)
        s = tl.where(keys, s * qk_scale, float("-inf"))
        p = tl.exp2(s - tl.max(s, axis=1)[:, None])
        denominator = tl.sum(p, axis=1)[:, None]
        p = p.to(v1.dtype)
        o = OUT + (rows[:, None] * H + h) * (2 * HALF) + cols[None, :]
        tl.store(o, (_dot(p, v1, UPCAST) / denominator).to(OUT.dtype.element_ty), mask=mask)
        tl.store(o + HALF, (_dot(p, v2, UPCAST) / denominator).to(OUT.dtype.element_ty), mask=mask)


_window_launch = Launcher(_window_kernel)


def window_attention_reference(q, k, v, offsets, scale, cos=None, sin=None) -> torch.Tensor:
    """The same in PyTorch: `kernels.rope`'s map on q and k, then SDPA within each chunk."""
    if cos is not None:
        q, k = rope_reference(q, k, cos, sin)
    bounds = offsets.tolist()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for a, b in zip(bounds, bounds[1:]):
        qc, kc, vc = (x[a:b].transpose(0, 1) for x in (q, k, v))
        out[a:b] = F.scaled_dot_product_attention(qc, kc, vc, scale=scale).transpose(0, 1)
    return out


def check(q, k, v, offsets, cos=None, sin=None) -> None:
    """Raise ValueError / TypeError for inputs `window_attention` does not take. Reads no values:
    the chunk bounds are the caller's to check."""
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must be one (S, H, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    s, _, d = q.shape
    if d % 2 or d > 256:
        raise ValueError(f"head dim must be even and at most 256, got {d}")
    if q.dtype not in _DTYPES or not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must have one dtype of {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if (cos is None) != (sin is None):
        raise ValueError("give both cos and sin, or neither")
    rotary = () if cos is None else (cos, sin)
    if any(x.shape != (s, d) for x in rotary):
        raise ValueError(f"cos and sin must be (S, D) = {(s, d)}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if not all(x.stride(-1) == 1 for x in (q, k, v, *rotary)):
        raise ValueError("q, k, v, cos and sin need a unit last stride")
    if offsets.dim() != 1 or offsets.dtype != torch.int32 or offsets.numel() < 1:
        raise ValueError(f"offsets must be int32 (n + 1,), got {offsets.dtype} {tuple(offsets.shape)}")
    check_device("window_attention", q.device)
    if any(x.device != q.device for x in (k, v, offsets, *rotary)):
        raise ValueError("q, k, v, offsets, cos and sin must be on one device")


def supported(q, k, v, offsets, cos=None, sin=None) -> bool:
    """Whether `window_attention` takes these inputs (`check` passes)."""
    try:
        check(q, k, v, offsets, cos, sin)
    except (TypeError, ValueError):
        return False
    return True


def window_attention(q, k, v, offsets, scale: float, cos=None, sin=None) -> torch.Tensor:
    """Non-causal attention within each chunk [offsets[i], offsets[i + 1]) of (S, H, D) q, k, v, the
    rotary embedding by cos and sin (S, D) applied to q and k first when given. Chunks of at most
    MAX_CHUNK tokens, none empty. Raises triton.runtime.errors.OutOfResources on GPUs with less
    shared memory per block than the program needs (80 KiB on the H200)."""
    return _launch(q, k, v, offsets, scale, cos, sin)[1]


def _launch(q, k, v, offsets, scale, cos=None, sin=None, heads_per_program: int | None = None, num_warps: int = 4,
            num_stages: int | None = 2):
    """(the compiled kernel or None, the output). One program per chunk and `heads_per_program`
    heads (default all), `num_stages` the software pipeline's depth over the heads (None: Triton's
    default, 3). All heads, 4 warps and 2 stages were the fastest on an H200 (BENCHMARKS.md)."""
    check(q, k, v, offsets, cos, sin)
    s, h, d = q.shape
    out = torch.empty(s, h, d, dtype=q.dtype, device=q.device)
    chunks = offsets.numel() - 1
    if chunks == 0 or h == 0:
        return None, out
    heads = heads_per_program or h
    half = d // 2
    rope = cos is not None
    compiled = _window_launch[(chunks, triton.cdiv(h, heads))](
        q, k, v, cos if rope else q, sin if rope else q, offsets, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0) if rope else 0, sin.stride(0) if rope else 0,
        h, scale,
        HALF=half, BLOCK=MAX_CHUNK, BLOCK_HALF=max(16, triton.next_power_of_2(half)), ROPE=rope,
        UPCAST=interpreting() and q.dtype == torch.bfloat16, HEADS=heads, num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}),
    )
    return compiled, out
