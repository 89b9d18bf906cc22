"""Triton block-sparse flash attention forward (DESIGN.md step 4).

One program per (query tile of BM rows, batch * query head). Query tiles lie on the absolute
block grid, so a tile belongs to one query block I and reads its kept key blocks from the
pattern; query head h reads KV head h // GROUP. Kept ids are ascending and every kept block but
the last lies strictly before I, so only the last one needs the causal/length mask (it is the
diagonal whenever the window keeps it; masking a non-diagonal block is a no-op).
fp16/bf16 inputs, fp32 accumulation; head dims padded to a power of two inside the kernel.
Explicit strides: transformers' (B, H, T, D) views transposed to (B, T, H, D) need no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(
    acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
    kblock, pos, T_K, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
    MASKED: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
):
    d = tl.arange(0, D_PAD)
    for sub in tl.static_range(BS // BN):
        kpos = kblock * BS + sub * BN + tl.arange(0, BN).to(tl.int64)
        if USE_TMA:
            # k_base / v_base are tensor descriptors over (T_K, HEAD_DIM): rows past T_K and the
            # padded head-dim columns come back as zeros.
            k = k_base.load([(kblock * BS + sub * BN).to(tl.int32), 0])
            v = v_base.load([(kblock * BS + sub * BN).to(tl.int32), 0])
        else:
            kv_mask = d[None, :] < HEAD_DIM
            if MASKED:
                kv_mask = kv_mask & (kpos[:, None] < T_K)
            k = tl.load(k_base + kpos[:, None] * stride_kt + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(v_base + kpos[:, None] * stride_vt + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k))
        if MASKED:
            s = tl.where((kpos[None, :] <= pos[:, None]) & (kpos[None, :] < T_K), s, float("-inf"))
        # Scale inside the exponent (one fused multiply-add per score); qk_scale > 0 keeps the max.
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        correction = tl.exp2(m_i - m_new)
        l_i = l_i * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _sparse_attention_kernel(
    Q, K, V, O, KV_NUM, KV_IDX,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    T_Q, T_K, NUM_Q_HEADS, GROUP, NKB, NQB, FIRST_QB, FIRST_TILE, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    UPCAST: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    # Last query tiles first: they keep the most blocks, so the long programs start early.
    tile = FIRST_TILE + (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // NUM_Q_HEADS
    h = pid_bh % NUM_Q_HEADS
    hk = h // GROUP
    q_start = T_K - T_Q
    pos = tile * BM + tl.arange(0, BM).to(tl.int64)
    row_ok = (pos >= q_start) & (pos < T_K)
    d = tl.arange(0, D_PAD)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + (pos - q_start)[:, None] * stride_qt + d[None, :] * stride_qd,
        mask=row_ok[:, None] & (d[None, :] < HEAD_DIM),
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    qb = (tile * BM) // BS - FIRST_QB
    pattern_row = pid_bh * NQB + qb
    num_kept = tl.load(KV_NUM + pattern_row)
    idx = KV_IDX + pattern_row * NKB
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if USE_TMA:
        k_base = tl.make_tensor_descriptor(k_base, shape=[T_K, HEAD_DIM], strides=[stride_kt, 1],
                                           block_shape=[BN, D_PAD])
        v_base = tl.make_tensor_descriptor(v_base, shape=[T_K, HEAD_DIM], strides=[stride_vt, 1],
                                           block_shape=[BN, D_PAD])

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D_PAD], dtype=tl.float32)
    for j in tl.range(0, num_kept - 1, warp_specialize=WARP_SPECIALIZE):
        kblock = tl.load(idx + j).to(tl.int64)
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
            kblock, pos, T_K, qk_scale, HEAD_DIM, D_PAD, BS, BN, False, UPCAST, USE_TMA,
        )
    kblock = tl.load(idx + num_kept - 1).to(tl.int64)
    acc, m_i, l_i = _attend_block(
        acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        kblock, pos, T_K, qk_scale, HEAD_DIM, D_PAD, BS, BN, True, UPCAST, USE_TMA,
    )
    out = acc / l_i[:, None]
    tl.store(
        O + b * stride_ob + h * stride_oh + (pos - q_start)[:, None] * stride_ot + d[None, :] * stride_od,
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None] & (d[None, :] < HEAD_DIM),
    )


# K/V through tensor descriptors was 7-9% faster on the H200 (BENCHMARKS.md, tile sweep).
TMA_BY_DEFAULT = True


def _tma_ok(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Tensor descriptors need Hopper or newer, a unit last stride and 16-byte aligned rows and bases."""
    if k.device.type != "cuda" or torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    size = k.element_size()
    for t in (k, v):
        if t.stride(3) != 1 or (t.stride(1) * size) % 16 or (t.stride(2) * size) % 16 or (t.stride(0) * size) % 16:
            return False
        if t.data_ptr() % 16:
            return False
    return True


_allocator_set = False


def _ensure_allocator() -> None:
    """Device-side tensor descriptors need scratch memory from an allocator Triton can call."""
    global _allocator_set
    if not _allocator_set:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _allocator_set = True


def _tiles(block_size: int, d_pad: int) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) by head dim and block size: large head dims take smaller
    tiles to stay in registers; tiles never cross a sparsity block. 128 x 128 with 8 warps was
    the fastest of nine choices on the H200 at head dim 128 (BENCHMARKS.md, tile sweep)."""
    if d_pad >= 256:
        bm, bn, warps = 64, 32, 4
    else:
        bm, bn, warps = 128, 128, 8
    return min(bm, block_size), min(bn, block_size), warps, 2


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    scale: float,
    d_pad: int,
    upcast: bool,
    out: torch.Tensor | None = None,
    tiles: tuple[int, int, int, int] | None = None,
    use_tma: bool | None = None,
    warp_specialize: bool = False,
) -> torch.Tensor:
    """Block-sparse attention; q (B, Tq, HQ, D), k/v (B, Tk, H, D) -> (B, Tq, HQ, D).

    tiles: (BM, BN, num_warps, num_stages) to override the default choice (benchmark sweeps).
    use_tma: load K/V through tensor descriptors (Hopper's copy engine); None picks it where it is
    available and the strides allow it. warp_specialize: Triton's warp specialisation of the loop.
    """
    b, tq, hq, d = q.shape
    tk, h = k.shape[1], k.shape[2]
    nqb, nkb = kv_indices.shape[2], kv_indices.shape[3]
    bm, bn, warps, stages = tiles or _tiles(block_size, d_pad)
    first_tile = (tk - tq) // bm
    num_tiles = triton.cdiv(tk, bm) - first_tile
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if use_tma is None:
        use_tma = TMA_BY_DEFAULT and not upcast and _tma_ok(k, v)
    if use_tma:
        _ensure_allocator()
    _sparse_attention_kernel[(num_tiles, b * hq)](
        q, k, v, out, kv_num_blocks, kv_indices,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        tq, tk, hq, hq // h, nkb, nqb, (tk - tq) // block_size, first_tile, scale * LOG2E,
        HEAD_DIM=d, D_PAD=d_pad, BS=block_size, BM=bm, BN=bn, UPCAST=upcast,
        USE_TMA=use_tma, WARP_SPECIALIZE=warp_specialize, num_warps=warps, num_stages=stages,
    )
    return out
