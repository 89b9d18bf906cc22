"""Triton block-sparse flash attention forward (DESIGN.md step 4).

One program per (query tile of BM rows, batch * query head). Query tiles lie on the absolute
block grid, so a tile belongs to one query block I and reads its kept key blocks from the
pattern; query head h reads KV head h // GROUP. Kept ids are ascending and every kept block but
the last lies strictly before I, so only the last one needs the causal/length mask (it is the
diagonal whenever the window keeps it; masking a non-diagonal block is a no-op).
fp16/bf16 inputs, fp32 accumulation; head dims padded to a power of two inside the kernel.
Explicit strides: transformers' (B, H, T, D) views transposed to (B, T, H, D) need no copy.

TMA: 0 plain pointer loads; 1 K/V through tensor descriptors built on the host over the whole
tensor in (B, H, T, D) order (Hopper's copy engine); 2 Q and O through descriptors as well,
which needs the first query tile to start on row 0 ((Tk - Tq) % BM == 0).

Mean correction (FlashPrefillConfig.mean_correction): the kernel attends, after its kept blocks,
one token per pruned block before the tile's own (MEAN_CORRECTION).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..runtime import Launcher, capability

LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(
    acc, m_i, l_i, q, K, V, b, hk, stride_kt, stride_kd, stride_vt, stride_vd,
    kblock, pos, T_K, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
    MASKED: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
):
    d = tl.arange(0, D_PAD)
    for sub in tl.static_range(BS // BN):
        kpos = kblock * BS + sub * BN + tl.arange(0, BN).to(tl.int64)
        row = (kblock * BS + sub * BN).to(tl.int32)
        # Descriptor loads return zeros for rows past T_K and for the padded head-dim columns.
        if TMA > 0:
            k = K.load([b, hk, row, 0]).reshape(BN, D_PAD)
            v = V.load([b, hk, row, 0]).reshape(BN, D_PAD)
        else:
            kv_mask = d[None, :] < HEAD_DIM
            if MASKED:
                kv_mask = kv_mask & (kpos[:, None] < T_K)
            k = tl.load(K + kpos[:, None] * stride_kt + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(V + kpos[:, None] * stride_vt + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k))
        if MASKED:
            # 32-bit compares: positions stay far below 2**31, and 64-bit ones cost twice as much.
            kpos32 = kpos.to(tl.int32)
            s = tl.where((kpos32[None, :] <= pos.to(tl.int32)[:, None]) & (kpos32[None, :] < T_K), s, float("-inf"))
        # Scale inside the exponent (one fused multiply-add per score); qk_scale > 0 keeps the max.
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        correction = tl.exp2(m_i - m_new)
        l_i = l_i * correction + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def launch_order(w, num_tiles, NUM_Q_HEADS, GROUP, FIRST_TILE, GROUP_ORDER: tl.constexpr):
    """Work item w (0, 1, ... in launch order) -> (query tile, batch * NUM_Q_HEADS + query head).
    Last query tiles first: they keep the most blocks, so the long items start early. With
    GROUP_ORDER the GROUP query heads sharing a KV head side by side for each tile, so the K/V
    blocks they have in common are read from L2 by items running together. Also called by the
    Hopper (Gluon) kernels."""
    if GROUP_ORDER:
        rest = w // GROUP
        kv_heads = NUM_Q_HEADS // GROUP
        tile = FIRST_TILE + num_tiles - 1 - rest % num_tiles
        bg = rest // num_tiles
        pid_bh = (bg // kv_heads) * NUM_Q_HEADS + (bg % kv_heads) * GROUP + w % GROUP
    else:
        tile = FIRST_TILE + num_tiles - 1 - w % num_tiles
        pid_bh = w // num_tiles
    return tile, pid_bh


@triton.jit
def _attend_block_means(
    acc, m_i, l_i, q, KEPT, KBAR, VBAR, pattern_row, mean_row, block, num_kept, NKB, qk_scale,
    D_PAD: tl.constexpr, BJ: tl.constexpr, LOG2_BS: tl.constexpr, UPCAST: tl.constexpr,
):
    """Mean correction: every pruned key block before the query tile's own block `block` (so seen
    whole by each of its rows) as one token, logit scale * q . kbar_J + log(BS), value vbar_J;
    BJ blocks' means at a time. KEPT: uint8 (pattern rows, NKB), 1 where a block is kept; KBAR,
    VBAR: (B * H, NKB, D_PAD) rows of block means, the padded columns zero."""
    d = tl.arange(0, D_PAD)
    # Kept ids are distinct and at most `block`: num_kept > block means nothing before it is pruned.
    stop = tl.where(num_kept > block, 0, block)
    for j0 in tl.range(0, stop, BJ):
        j = j0 + tl.arange(0, BJ)
        pruned = (j < block) & (tl.load(KEPT + pattern_row * NKB + j, mask=j < block, other=1) == 0)
        rows = (mean_row * NKB + j.to(tl.int64))[:, None] * D_PAD + d[None, :]
        kb = tl.load(KBAR + rows, mask=pruned[:, None], other=0.0)
        vb = tl.load(VBAR + rows, mask=pruned[:, None], other=0.0)
        if UPCAST:
            kb = kb.to(tl.float32)
            vb = vb.to(tl.float32)
        s = tl.dot(q, tl.trans(kb)) * qk_scale + LOG2_BS
        s = tl.where(pruned[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        p = tl.exp2(s - m_safe[:, None])
        correction = tl.exp2(m_i - m_safe)
        l_i = l_i * correction + tl.sum(p, axis=1)
        acc = tl.dot(p.to(vb.dtype), vb, acc * correction[:, None])
        m_i = m_new
    return acc, m_i, l_i


# Not specialised on lengths (divisibility by 16, == 1): a new prompt length compiles nothing.
@triton.jit(do_not_specialize=["T_Q", "T_K", "NKB", "NQB", "FIRST_QB", "FIRST_TILE"])
def _sparse_attention_kernel(
    Q, K, V, O, KV_NUM, KV_IDX, KEPT, KBAR, VBAR,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    T_Q, T_K, NUM_Q_HEADS, GROUP, NKB, NQB, FIRST_QB, FIRST_TILE, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    UPCAST: tl.constexpr, TMA: tl.constexpr, GROUP_ORDER: tl.constexpr,
    MEAN_CORRECTION: tl.constexpr = False, BJ: tl.constexpr = 64, LOG2_BS: tl.constexpr = 7.0,
):
    num_tiles = tl.num_programs(0)
    tile, pid_bh = launch_order(tl.program_id(1).to(tl.int64) * num_tiles + tl.program_id(0), num_tiles,
                                NUM_Q_HEADS, GROUP, FIRST_TILE, GROUP_ORDER)
    b = pid_bh // NUM_Q_HEADS
    h = pid_bh % NUM_Q_HEADS
    hk = h // GROUP
    q_start = T_K - T_Q
    pos = tile * BM + tl.arange(0, BM).to(tl.int64)
    row_ok = (pos >= q_start) & (pos < T_K)
    d = tl.arange(0, D_PAD)
    b32 = b.to(tl.int32)
    h32 = h.to(tl.int32)
    hk32 = hk.to(tl.int32)
    if TMA == 2:
        q = Q.load([b32, h32, (tile * BM - q_start).to(tl.int32), 0]).reshape(BM, D_PAD)
    else:
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
    k_src = K
    v_src = V
    if TMA == 0:
        k_src = K + b * stride_kb + hk * stride_kh
        v_src = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D_PAD], dtype=tl.float32)
    for j in tl.range(0, num_kept - 1):
        kblock = tl.load(idx + j).to(tl.int64)
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_src, v_src, b32, hk32, stride_kt, stride_kd, stride_vt, stride_vd,
            kblock, pos, T_K, qk_scale, HEAD_DIM, D_PAD, BS, BN, False, UPCAST, TMA,
        )
    kblock = tl.load(idx + num_kept - 1).to(tl.int64)
    acc, m_i, l_i = _attend_block(
        acc, m_i, l_i, q, k_src, v_src, b32, hk32, stride_kt, stride_kd, stride_vt, stride_vd,
        kblock, pos, T_K, qk_scale, HEAD_DIM, D_PAD, BS, BN, True, UPCAST, TMA,
    )
    if MEAN_CORRECTION:
        acc, m_i, l_i = _attend_block_means(
            acc, m_i, l_i, q, KEPT, KBAR, VBAR, pattern_row, b * (NUM_Q_HEADS // GROUP) + hk,
            (qb + FIRST_QB).to(tl.int32), num_kept, NKB, qk_scale, D_PAD, BJ, LOG2_BS, UPCAST,
        )
    out = acc * (1.0 / l_i)[:, None]
    if TMA == 2:
        O.store([b32, h32, (tile * BM - q_start).to(tl.int32), 0], out.to(O.dtype).reshape(1, 1, BM, D_PAD))
    else:
        tl.store(
            O + b * stride_ob + h * stride_oh + (pos - q_start)[:, None] * stride_ot + d[None, :] * stride_od,
            out.to(O.dtype.element_ty),
            mask=row_ok[:, None] & (d[None, :] < HEAD_DIM),
        )


_sparse_attention_launch = Launcher(_sparse_attention_kernel)


# Q, K, V and O through host-built tensor descriptors: the fastest load path on the H200, 9-12%
# faster than pointer loads at 64K-256K (BENCHMARKS.md, tile sweep).
TMA_BY_DEFAULT = 2
# Heads of a KV group side by side: 10-14% faster on patterns FlashPrefill selects (their heads
# share sinks, windows and topics), within 3% either way on random masks (BENCHMARKS.md).
GROUP_ORDER_BY_DEFAULT = True


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors need Hopper or newer, a unit last stride and 16-byte aligned strides and bases."""
    t0 = tensors[0]
    if t0.device.type != "cuda" or capability(t0.device.index)[0] < 9:
        return False
    size = t0.element_size()
    for t in tensors:
        if t.stride(3) != 1 or any((s * size) % 16 for s in t.stride()[:3]) or t.data_ptr() % 16:
            return False
    return True


def _descriptor(t: torch.Tensor, rows: int, d_pad: int):
    """A descriptor over (B, T, H, D) `t` in (B, H, T, D) order, one (rows, d_pad) tile per load;
    rows past T and the padded head-dim columns read as zeros and are not written."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, n, h, d = t.shape
    sb, st, sh, sd = t.stride()
    return TensorDescriptor(t, [b, h, n, d], [sb, sh, st, sd], [1, 1, rows, d_pad])


def _tiles(block_size: int, d_pad: int) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) by head dim and block size: large head dims take smaller
    tiles to stay in registers; tiles never cross a sparsity block. 128 x 128 with 8 warps and
    2 stages was the fastest choice on the H200 at head dim 128 (BENCHMARKS.md, tile sweep)."""
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
    tma: int | None = None,
    group_order: bool | None = None,
    mean_correction: bool = False,
) -> torch.Tensor:
    """Block-sparse attention; q (B, Tq, HQ, D), k/v (B, Tk, H, D) -> (B, Tq, HQ, D).

    mean_correction: also each pruned block seen whole by a query block, as one token of its mean
    key and value (FlashPrefillConfig.mean_correction; reference.sparse_attention has the formula).

    tiles: (BM, BN, num_warps, num_stages) to override the default choice (benchmark sweeps).
    tma: 0 pointer loads, 1 K/V and 2 also Q/O through tensor descriptors; None picks the
    default where the GPU and the strides allow it (else pointer loads).
    group_order: launch the query heads of a KV group side by side per tile instead of all tiles
    of one head in a row; None picks the default.
    """
    b, tq, hq, d = q.shape
    tk, h = k.shape[1], k.shape[2]
    nqb, nkb = kv_indices.shape[2], kv_indices.shape[3]
    bm, bn, warps, stages = tiles or _tiles(block_size, d_pad)
    first_tile = (tk - tq) // bm
    num_tiles = triton.cdiv(tk, bm) - first_tile
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if tma is None:
        tma = TMA_BY_DEFAULT
    if group_order is None:
        group_order = GROUP_ORDER_BY_DEFAULT
    if tma == 2 and (tk - tq) % bm:
        tma = 1
    if tma and (upcast or not _tma_ok(*((q, k, v, out) if tma == 2 else (k, v)))):
        tma = 0
    q_arg, k_arg, v_arg, o_arg = q, k, v, out
    if tma:
        k_arg, v_arg = _descriptor(k, bn, d_pad), _descriptor(v, bn, d_pad)
    if tma == 2:
        q_arg, o_arg = _descriptor(q, bm, d_pad), _descriptor(out, bm, d_pad)
    kept = kbar = vbar = kv_num_blocks  # (not read without the mean correction)
    if mean_correction:
        kept, kbar, vbar = _correction_inputs(k, v, kv_num_blocks, kv_indices, block_size, d_pad, q.dtype, upcast)
    _sparse_attention_launch[(num_tiles, b * hq)](
        q_arg, k_arg, v_arg, o_arg, kv_num_blocks, kv_indices, kept, kbar, vbar,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        tq, tk, hq, hq // h, nkb, nqb, (tk - tq) // block_size, first_tile, scale * LOG2E,
        HEAD_DIM=d, D_PAD=d_pad, BS=block_size, BM=bm, BN=bn, UPCAST=upcast,
        TMA=tma, GROUP_ORDER=group_order, MEAN_CORRECTION=mean_correction,
        LOG2_BS=float(math.log2(block_size)), num_warps=warps, num_stages=stages,
    )
    return out


@triton.jit
def _kept_map_kernel(KV_NUM, KV_IDX, KEPT, NKB, KEPT_ROW, BLOCK: tl.constexpr):
    """Row r of the pattern: KEPT[r, id] = 1 for each of its kept ids (KEPT zeroed before, rows
    KEPT_ROW apart)."""
    r = tl.program_id(0).to(tl.int64)
    n = tl.load(KV_NUM + r)
    for j0 in tl.range(0, n, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        ids = tl.load(KV_IDX + r * NKB + j, mask=j < n, other=0)
        tl.store(KEPT + r * KEPT_ROW + ids, tl.full([BLOCK], 1, tl.uint8), mask=j < n)


_kept_map_launch = Launcher(_kept_map_kernel)


def _correction_inputs(k, v, kv_num_blocks, kv_indices, block_size: int, d_pad: int, dtype: torch.dtype,
                       upcast: bool, row_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the mean correction reads: the kept-block map (`kept_blocks`) and the blocks' mean keys
    and values (in fp32 under the interpreter's upcast, else in the inputs' dtype)."""
    dtype = torch.float32 if upcast else dtype
    return (kept_blocks(kv_num_blocks, kv_indices, row_multiple), block_means(k, block_size, d_pad, dtype),
            block_means(v, block_size, d_pad, dtype))


def kept_blocks(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, row_multiple: int = 1) -> torch.Tensor:
    """uint8 (B, HQ, NQB, NKB rounded up to a multiple of row_multiple), 1 where the pattern keeps
    the block (its block grid; padded columns 0)."""
    nkb = kv_indices.shape[-1]
    row = -(-nkb // row_multiple) * row_multiple
    kept = torch.zeros(*kv_indices.shape[:-1], row, dtype=torch.uint8, device=kv_indices.device)
    _kept_map_launch[(kv_num_blocks.numel(),)](kv_num_blocks, kv_indices, kept, nkb, row, BLOCK=128, num_warps=4)
    return kept


def block_means(x: torch.Tensor, block_size: int, d_pad: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, NKB, d_pad) mean of each block of (B, T, H, D) x in dtype, the padded columns zero
    (the pattern stage's kernel, unscaled; a partial last block's mean, over its valid positions,
    is never read: no query block sees that block whole)."""
    from .pattern import block_means as scaled_block_means

    return scaled_block_means(x, block_size, d_pad, 1.0 / LOG2E, dtype)
