"""One token's linear projections as matrix-vector products (GEMV), for captured decoding steps.

A decoding step multiplies one token's vector by every weight matrix of the language model: its
GPU time is the time to read the weights. On an H200 these launches, in place of cuBLAS's
`F.linear` calls (and the activation's kernel), took a replayed 7B decoding step's GPU time from
5.77 to 4.72 ms at 16K video tokens (BENCHMARKS.md, thirtieth session). Here:

- `gemv(x, parts)`: `y_i = W_i x + b_i` for up to three weight matrices of one input width (the
  attention's q, k and v projections) in one launch; `add=True` adds `W x` into a given output
  (a residual: the MLP's down projection);
- `gated_gemv(x, gate, up)`: `silu(W_gate x + b_gate) * (W_up x + b_up)`, the gated MLP's first
  half and its activation in one launch;
- both take `norm=(weight, eps)`: the RMSNorm before the projection (`F.rms_norm(x, weight, eps)`)
  computed inside the launch, and `gemv` takes `residual`: `r_i + W_i x + b_i` into new outputs
  (the attention's output projection adding the residual). A pre-norm decoder layer's norms and
  residual adds then cost no launches of their own (models.text).

Each program reads BLOCK_N whole rows of a weight matrix with the vector, in fp32, and writes its
BLOCK_N outputs rounded once to x's dtype. cuBLAS rounds the gate and up products before the
activation; `gated_gemv` does not (the same function within a rounding). With a norm, each
program sums x^2 over the same loop as its products and scales its sums by rsqrt(mean(x^2) +
eps) at the end: the normalised x is never rounded to x's dtype, where `F.rms_norm` rounds it.

x: one row of K (any leading shape of one element), contiguous; weights (N, K) contiguous, biases
(N,), all of x's dtype (fp16, bf16, fp32), on one CUDA device (or CPU under TRITON_INTERPRET=1).
Launched through `runtime.Launcher`. models.fused and models.text run them only inside
`models.fused.one_token_gemvs`, which models.decode enters while it captures a decoding step into
a CUDA graph, where a launch's host time is paid once. The readable PyTorch forms are
`gemv_reference` and `gated_gemv_reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .runtime import Launcher, check_device, interpreting

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_PARTS = 3


@triton.jit
def _dot_rows(X, G, W, N, K, eps, block, NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N,) fp32: rows block * BLOCK_N + [0, BLOCK_N) of W (N, K) times X (K,); 0 past N. With
    NORM, times the RMS norm of X with weight G instead: sum_k W[r, k] G[k] X[k], scaled by
    rsqrt(mean(X^2) + eps), both sums over the same loop."""
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = W + rows[:, None].to(tl.int64) * K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x = tl.load(X + cols, mask=col_ok, other=0.0).to(tl.float32)
        if NORM:
            squares += x * x
            x = x * tl.load(G + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if NORM:
        y = y * tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    return y


@triton.jit
def _part(X, G, W, B, R, Y, N, K, eps, block, NORM: tl.constexpr, BIAS: tl.constexpr, ADD: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    y = _dot_rows(X, G, W, N, K, eps, block, NORM, BLOCK_N, BLOCK_K)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    if BIAS:
        y += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)
    if ADD:
        y += tl.load(R + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_ok)


@triton.jit
def _gemv_kernel(X, G, W0, B0, R0, Y0, N0, W1, B1, R1, Y1, N1, W2, B2, R2, Y2, N2, K, eps, PARTS: tl.constexpr,
                 NORM: tl.constexpr, BIAS: tl.constexpr, ADD: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The first cdiv(N0, BLOCK_N) programs compute part 0's rows, the next part 1's, then part 2's."""
    block = tl.program_id(0)
    first = tl.cdiv(N0, BLOCK_N)
    if block < first:
        _part(X, G, W0, B0, R0, Y0, N0, K, eps, block, NORM, BIAS, ADD, BLOCK_N, BLOCK_K)
    elif PARTS > 1:
        block -= first
        second = tl.cdiv(N1, BLOCK_N)
        if block < second:
            _part(X, G, W1, B1, R1, Y1, N1, K, eps, block, NORM, BIAS, ADD, BLOCK_N, BLOCK_K)
        elif PARTS > 2:
            _part(X, G, W2, B2, R2, Y2, N2, K, eps, block - second, NORM, BIAS, ADD, BLOCK_N, BLOCK_K)


@triton.jit
def _gated_gemv_kernel(X, G, WG, WU, BG, BU, Y, N, K, eps, NORM: tl.constexpr, BIAS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    block = tl.program_id(0)
    g = _dot_rows(X, G, WG, N, K, eps, block, NORM, BLOCK_N, BLOCK_K)
    u = _dot_rows(X, G, WU, N, K, eps, block, NORM, BLOCK_N, BLOCK_K)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    if BIAS:
        g += tl.load(BG + rows, mask=row_ok, other=0.0).to(tl.float32)
        u += tl.load(BU + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Y + rows, (g / (1.0 + tl.exp(-g)) * u).to(Y.dtype.element_ty), mask=row_ok)


_gemv_launch = Launcher(_gemv_kernel)
_gated_launch = Launcher(_gated_gemv_kernel)


def config(rows: int, k: int, gated: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps) for a launch over `rows` weight rows of width k in all (gated: the
    gate's and the up's rows together). The best of 16 settings on an H200 for the 7B model's
    launches were within 4% of (8, 512, 4); these three rules keep the ones that gained 3-5%
    there: the gated launch and the down projection's long rows (BENCHMARKS.md, thirtieth session)."""
    block_k = min(512, triton.next_power_of_2(max(k, 16)))
    if gated:
        return 8, min(256, block_k), 4
    if k >= 8192:
        return 4, block_k, 8
    return 8, block_k, 4


def _reference_input(x: torch.Tensor, norm) -> torch.Tensor:
    """x as one fp32 row; with norm (weight, eps), its RMS norm in fp32 (not rounded)."""
    xs = x.reshape(-1).float()
    if norm is None:
        return xs
    return F.rms_norm(xs, (xs.shape[0],), norm[0].float(), norm[1])


def gemv_reference(x: torch.Tensor, parts, add: bool = False, out=None, residual=None, norm=None) -> list[torch.Tensor]:
    """[W x + b (+ out_i with add, + residual_i)] in fp32, each rounded once to x's dtype, shaped
    x.shape[:-1] + (N,); with norm (weight, eps), x's RMS norm in fp32 in place of x."""
    xs = _reference_input(x, norm)
    added = out if add else residual
    ys = []
    for i, (w, b) in enumerate(parts):
        y = w.float() @ xs + (b.float() if b is not None else 0)
        if added is not None:
            y = y + added[i].reshape(-1).float()
        ys.append(y.to(x.dtype).view(*x.shape[:-1], w.shape[0]))
    return ys


def gated_gemv_reference(x: torch.Tensor, gate, up, norm=None) -> torch.Tensor:
    """silu(W_gate x + b_gate) * (W_up x + b_up) in fp32, rounded once to x's dtype; with norm
    (weight, eps), of x's RMS norm in fp32."""
    xs = _reference_input(x, norm)
    g, u = (w.float() @ xs + (b.float() if b is not None else 0) for w, b in (gate, up))
    return (F.silu(g) * u).to(x.dtype).view(*x.shape[:-1], gate[0].shape[0])


def supported(x: torch.Tensor, parts, norm=None) -> bool:
    """Whether `gemv(x, parts, norm=norm)` (or `gated_gemv(x, *parts, norm=norm)`, two parts) runs on
    these tensors: see the module docstring. Its callers check each call's tensors with it, so it
    raises nothing."""
    if x.numel() == 0 or x.dim() == 0 or x.numel() != x.shape[-1] or x.stride(-1) != 1 or x.dtype not in _DTYPES:
        return False
    if not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
        return False
    return weights_supported(parts, x.shape[-1], x.dtype, x.device) and norm_supported(norm, x)


def norm_supported(norm, x: torch.Tensor) -> bool:
    """Whether `norm` is None or an (RMSNorm weight, eps) pair the launches take with x: a
    contiguous (K,) weight of x's dtype and device, a float eps."""
    if norm is None:
        return True
    weight, eps = norm
    return (isinstance(eps, float) and isinstance(weight, torch.Tensor) and weight.shape == x.shape[-1:]
            and weight.dtype == x.dtype and weight.device == x.device and weight.is_contiguous())


def weights_supported(parts, k: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `parts` ((W, b or None) pairs) are weights `gemv` takes for inputs of width k, dtype
    and device: 1-3 contiguous (N, k) matrices, with (N,) biases, all or none."""
    if not 1 <= len(parts) <= MAX_PARTS:
        return False
    has_bias = parts[0][1] is not None
    for w, b in parts:
        if w.dim() != 2 or w.shape[1] != k or w.dtype != dtype or w.device != device or not w.is_contiguous():
            return False
        if (b is not None) != has_bias:
            return False
        if b is not None and (b.shape != w.shape[:1] or b.dtype != dtype or b.device != device
                              or not b.is_contiguous()):
            return False
    return True


def _check(x: torch.Tensor, parts, name: str, norm=None) -> None:
    check_device(name, x.device)
    if not supported(x, parts, norm):
        shapes = [(tuple(w.shape), None if b is None else tuple(b.shape)) for w, b in parts]
        norm_shape = None if norm is None else (tuple(getattr(norm[0], "shape", ())), type(norm[1]).__name__)
        raise ValueError(f"{name} takes one contiguous row of K and (N, K) contiguous weights with (N,) biases "
                         f"(all or none), and optionally a (K,) RMSNorm weight with a float eps, of one dtype "
                         f"of {_DTYPES} on one device; got x {tuple(x.shape)} {x.dtype}, parts {shapes}, "
                         f"norm {norm_shape}")


def _vectors(tensors, parts, x: torch.Tensor, what: str) -> None:
    if len(tensors) != len(parts) or any(t.numel() != w.shape[0] or not t.is_contiguous() or t.dtype != x.dtype
                                         or t.device != x.device for t, (w, _) in zip(tensors, parts)):
        raise ValueError(f"gemv: {what} must hold one contiguous tensor of N_i elements per part, of x's dtype "
                         "and device")


def gemv(x: torch.Tensor, parts, add: bool = False, out=None, residual=None, norm=None) -> list[torch.Tensor]:
    """[W_i x + b_i for (W_i, b_i) in parts] (b_i may be None), one launch for all; each shaped
    x.shape[:-1] + (N_i,). With `add`, written into the given `out` tensors (one per part,
    contiguous, of x's dtype) as out_i + W_i x + b_i; with `residual` (tensors of the same kind),
    residual_i + W_i x + b_i, into `out` or new tensors. With `norm` = (weight, eps), x's RMS norm
    with that weight (`F.rms_norm`) in place of x, computed inside the launch: the norm before a
    projection costs no launch of its own."""
    _check(x, parts, "gemv", norm)
    k = x.shape[-1]
    lead = x.shape[:-1]
    if add and residual is not None:
        raise ValueError("gemv: add=True adds into out; give either add or residual")
    if residual is not None:
        _vectors(residual, parts, x, "residual")
    if out is None:
        if add:
            raise ValueError("gemv: add=True needs the out tensors to add into")
        out = [x.new_empty(*lead, w.shape[0]) for w, _ in parts]
    else:
        _vectors(out, parts, x, "out")
    added = out if add else residual
    ws = [w for w, _ in parts]
    padded = list(zip(ws, [b if b is not None else w for w, b in parts], added if added is not None else out, out))
    padded += [(ws[0], ws[0], out[0], out[0])] * (MAX_PARTS - len(parts))
    block_n, block_k, warps = config(sum(w.shape[0] for w in ws), k)
    blocks = sum(triton.cdiv(w.shape[0], block_n) for w in ws)
    args = [x, x if norm is None else norm[0]]
    for i, (w, b, r, y) in enumerate(padded):
        args += [w, b, r, y, w.shape[0] if i < len(parts) else 0]
    _gemv_launch[(blocks,)](*args, k, 0.0 if norm is None else norm[1], PARTS=len(parts), NORM=norm is not None,
                            BIAS=parts[0][1] is not None, ADD=added is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                            num_warps=warps)
    return list(out)


def gated_gemv(x: torch.Tensor, gate, up, norm=None) -> torch.Tensor:
    """silu(W_gate x + b_gate) * (W_up x + b_up), shaped x.shape[:-1] + (N,); gate, up: (W, b or None).
    With `norm` = (weight, eps), of x's RMS norm, as `gemv`'s."""
    _check(x, (gate, up), "gated_gemv", norm)
    if gate[0].shape != up[0].shape:
        raise ValueError(f"gated_gemv: gate and up weights differ in shape: {tuple(gate[0].shape)}, "
                         f"{tuple(up[0].shape)}")
    n, k = gate[0].shape
    y = x.new_empty(*x.shape[:-1], n)
    block_n, block_k, warps = config(2 * n, k, gated=True)
    bias = gate[1] is not None
    _gated_launch[(triton.cdiv(n, block_n),)](x, x if norm is None else norm[0], gate[0], up[0],
                                              gate[1] if bias else gate[0], up[1] if bias else up[0], y, n, k,
                                              0.0 if norm is None else norm[1], NORM=norm is not None, BIAS=bias,
                                              BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y
