"""Rotary position embedding in the rotate-half layout, fused: one read and one write of q and k.

For x = (x1, x2) split at D / 2, and cos = (c1, c2), sin = (s1, s2) split the same way:
    out = (x1 * c1 - x2 * s1,  x2 * c2 + x1 * s2)
in fp32, rounded to x's dtype. That is `x * cos + rotate_half(x) * sin` in fp32, the rotary
embedding of the Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers, which PyTorch computes in about
a dozen fp32 passes over q and k (casts, broadcast products, the negation and concatenation of
rotate_half), and of their language models (the same map with cos and sin in the model's dtype,
computed in that dtype in five passes per tensor); here it is one program per BLOCK_S tokens
that loads cos and sin once and loops over the heads. Few tokens (a question, a decoding step)
make few programs, so there the heads are split between programs too (`head_programs`): one
program looping over the 7B model's 32 heads took 10 us for one token on an H200 (BENCHMARKS.md,
twenty-eighth session).

q: (S, HQ, D), k: (S, HK, D) (HK may differ from HQ: grouped KV heads), any strides with a unit
last stride (views of the projections); cos, sin: (S, D), broadcast over the heads. Returns new
contiguous tensors of q's and k's shapes and dtypes. fp16, bf16, fp32; D even, at most 256.
`rope_reference` is the readable PyTorch form.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import Launcher, PreparedLaunches, check_device

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rope_one(X, OUT, rows, cols, mask, h, stride_xs, stride_xh, H, c1, c2, s1, s2, HALF: tl.constexpr):
    x = X + rows[:, None] * stride_xs + h * stride_xh + cols[None, :]
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
    o = OUT + (rows[:, None] * H + h) * (2 * HALF) + cols[None, :]
    tl.store(o, (x1 * c1 - x2 * s1).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o + HALF, (x2 * c2 + x1 * s2).to(OUT.dtype.element_ty), mask=mask)


# Not specialised on lengths (divisibility by 16, == 1): a new prompt length compiles nothing.
@triton.jit(do_not_specialize=["S"])
def _rope_kernel(
    Q, K, COS, SIN, QO, KO,
    stride_qs, stride_qh, stride_ks, stride_kh, stride_cs, stride_ss,
    S, HQ, HK,
    HALF: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (rows[:, None] < S) & (cols[None, :] < HALF)
    c = COS + rows[:, None] * stride_cs + cols[None, :]
    s = SIN + rows[:, None] * stride_ss + cols[None, :]
    c1 = tl.load(c, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s + HALF, mask=mask, other=0.0).to(tl.float32)
    # Heads program_id(1), + num_programs(1), ... of q and of k.
    for h in range(tl.program_id(1), HQ, tl.num_programs(1)):
        _rope_one(Q, QO, rows, cols, mask, h, stride_qs, stride_qh, HQ, c1, c2, s1, s2, HALF)
    for h in range(tl.program_id(1), HK, tl.num_programs(1)):
        _rope_one(K, KO, rows, cols, mask, h, stride_ks, stride_kh, HK, c1, c2, s1, s2, HALF)


_rope_launch = Launcher(_rope_kernel)
_rope_prepared = PreparedLaunches(_rope_launch, varying=(0, 1, 2, 3, 4, 5))  # (q, k, cos, sin, q_out, k_out)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The same map in PyTorch: x * cos + rotate_half(x) * sin in fp32, back in x's dtype."""

    def one(x):
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (xf * cos[:, None].float() + rotated * sin[:, None].float()).to(x.dtype)

    return one(q), one(k)


def check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Raise ValueError / TypeError for inputs `rope` does not take."""
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"q and k must be (S, HQ, D) and (S, HK, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    s, _, d = q.shape
    if d % 2 or d > 256:
        raise ValueError(f"head dim must be even and at most 256, got {d}")
    if cos.shape != (s, d) or sin.shape != (s, d):
        raise ValueError(f"cos and sin must be (S, D) = {(s, d)}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if q.dtype not in _DTYPES or k.dtype not in _DTYPES:
        raise TypeError(f"q and k must be one of {_DTYPES}, got {q.dtype} and {k.dtype}")
    if not all(x.stride(-1) == 1 for x in (q, k, cos, sin)):
        raise ValueError("q, k, cos and sin need a unit last stride")
    check_device("rope", q.device)
    if not (q.device == k.device == cos.device == sin.device):
        devices = ", ".join(str(x.device) for x in (q, k, cos, sin))
        raise ValueError(f"q, k, cos, sin must be on one device, got {devices}")


def supported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `rope` takes these inputs (`check` passes)."""
    try:
        check(q, k, cos, sin)
    except (TypeError, ValueError):
        return False
    return True


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_s: int = 32):
    """Rotary embedding of q (S, HQ, D) and k (S, HK, D) by cos and sin, (S, D): (q_out, k_out), contiguous."""
    check(q, k, cos, sin)
    return launch(q, k, cos, sin, block_s)


# Programs a launch aims for at least, splitting the heads between them when there are few tokens.
MIN_PROGRAMS = 128


def head_programs(blocks: int, heads: int) -> int:
    """How many programs share the heads of one block of tokens: up to `heads` (the larger of q's
    and k's), so that `blocks` blocks make about MIN_PROGRAMS programs; 1 from MIN_PROGRAMS blocks."""
    return max(1, min(heads, MIN_PROGRAMS // blocks))


def launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_s: int = 32):
    """`rope` without its input checks, for a caller that has just checked these tensors (`supported`):
    at one token a step's host time is what counts."""
    s, hq, d = q.shape
    hk = k.shape[1]
    q_out = torch.empty(s, hq, d, dtype=q.dtype, device=q.device)
    k_out = torch.empty(s, hk, d, dtype=k.dtype, device=k.device)
    if s == 0 or hq + hk == 0:
        return q_out, k_out
    half = d // 2
    tensors = (q, k, cos, sin, q_out, k_out)
    key = None
    if _rope_prepared.active():
        key = (q.shape, k.shape, q.stride(), k.stride(), cos.stride(0), sin.stride(0), q.dtype, k.dtype, cos.dtype,
               sin.dtype, q.device.index, block_s, *(t.data_ptr() % 16 for t in tensors))
    blocks = triton.cdiv(s, block_s)
    _rope_prepared.launch(key, tensors, lambda: (
        (blocks, head_programs(blocks, max(hq, hk))),
        (*tensors, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0), s, hq, hk),
        dict(HALF=half, BLOCK_S=block_s, BLOCK_HALF=triton.next_power_of_2(half), num_warps=4)))
    return q_out, k_out
