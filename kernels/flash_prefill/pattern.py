"""Triton pattern discovery: block-mean keys and per-block scores (DESIGN.md step 1).

`block_means` writes kbar (B, H, NKB, D_PAD) in fp32. `block_scores` writes, for each
(batch, query head, query block I) and each key block J <= I, the log2 score
    log2 score_IJ = m_IJ + log2 sum_i exp2(s_iJ - m_IJ),   s_iJ = log2(e) * scale * q_i . kbar_J
over the rows i of block I that see all of block J (-inf when none does), into the int32 index
buffer reinterpreted as fp32: the scores occupy the block grid and nothing larger, and
select.py then overwrites them in place with the kept block ids.
Head dims that are not powers of two are padded to D_PAD inside the kernels.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _block_means_kernel(
    K, KBAR,
    stride_kb, stride_kt, stride_kh, stride_kd,
    T_K, NUM_KV_HEADS, NKB,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr,
):
    kb = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // NUM_KV_HEADS
    h = pid_bh % NUM_KV_HEADS
    d = tl.arange(0, D_PAD)
    base = K + b * stride_kb + h * stride_kh
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for t in tl.static_range(BS // BT):
        pos = kb * BS + t * BT + tl.arange(0, BT).to(tl.int64)
        ptrs = base + pos[:, None] * stride_kt + d[None, :] * stride_kd
        tile = tl.load(ptrs, mask=(pos[:, None] < T_K) & (d[None, :] < HEAD_DIM), other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
    count = tl.minimum(T_K - kb * BS, BS).to(tl.float32)
    tl.store(KBAR + (pid_bh * NKB + kb) * D_PAD + d, acc / count)


@triton.jit
def _block_scores_kernel(
    Q, KBAR, SCORES,
    stride_qb, stride_qt, stride_qh, stride_qd,
    T_Q, T_K, NUM_Q_HEADS, GROUP, NKB, NQB, FIRST_QB, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr,
    UPCAST: tl.constexpr,
):
    qb = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // NUM_Q_HEADS
    h = pid_bh % NUM_Q_HEADS
    num_kv_heads = NUM_Q_HEADS // GROUP
    kv_row = b * num_kv_heads + h // GROUP
    block = FIRST_QB + qb
    q_start = T_K - T_Q
    d = tl.arange(0, D_PAD)
    q_base = Q + b * stride_qb + h * stride_qh
    out = SCORES + (pid_bh * NQB + qb) * NKB
    for jc in range(0, block // BJ + 1):
        kblock = jc * BJ + tl.arange(0, BJ).to(tl.int64)
        kbar = tl.load(
            KBAR + (kv_row * NKB + kblock[:, None]) * D_PAD + d[None, :], mask=kblock[:, None] < NKB, other=0.0
        )
        last_key = tl.minimum((kblock + 1) * BS, T_K) - 1
        m = tl.full([BJ], float("-inf"), dtype=tl.float32)
        acc = tl.zeros([BJ], dtype=tl.float32)
        for r in tl.static_range(BS // BR):
            pos = block * BS + r * BR + tl.arange(0, BR).to(tl.int64)
            row_ok = (pos >= q_start) & (pos < T_K)
            q = tl.load(
                q_base + (pos - q_start)[:, None] * stride_qt + d[None, :] * stride_qd,
                mask=row_ok[:, None] & (d[None, :] < HEAD_DIM),
                other=0.0,
            )
            if UPCAST:
                s = tl.dot(q.to(tl.float32), tl.trans(kbar))
            else:
                s = tl.dot(q, tl.trans(kbar.to(q.dtype)))
            s = s * qk_scale
            visible = row_ok[:, None] & (pos[:, None] >= last_key[None, :])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp2(m - m_safe) + tl.sum(tl.where(visible, tl.exp2(s - m_safe[None, :]), 0.0), axis=0)
            m = m_new
        # acc >= 1 wherever a row is visible (its own maximum adds exp2(0)).
        log_score = tl.where(acc > 0, m + tl.log2(tl.maximum(acc, 1.0)), float("-inf"))
        tl.store(out + kblock, log_score.to(tl.int32, bitcast=True), mask=kblock <= block)


def _row_tile(block_size: int, d_pad: int) -> int:
    """Query rows per dot: a whole block when the tile stays small in registers, else a part of it."""
    return min(block_size, 128 if d_pad <= 128 else 64)


def block_means(k: torch.Tensor, block_size: int, d_pad: int) -> torch.Tensor:
    """kbar fp32 (B, H, NKB, d_pad); padded head-dim columns are zero."""
    b, tk, h, d = k.shape
    nkb = math.ceil(tk / block_size)
    kbar = torch.empty(b, h, nkb, d_pad, dtype=torch.float32, device=k.device)
    _block_means_kernel[(nkb, b * h)](
        k, kbar, *k.stride(), tk, h, nkb,
        HEAD_DIM=d, D_PAD=d_pad, BS=block_size, BT=min(block_size, 64), num_warps=4,
    )
    return kbar


def block_scores(
    q: torch.Tensor, kbar: torch.Tensor, out: torch.Tensor, block_size: int, kv_len: int, scale: float, upcast: bool
) -> None:
    """Write log2 block scores into `out` (int32 (B, HQ, NQB, NKB), read back as fp32 bits)."""
    b, tq, hq, d = q.shape
    h, nkb, d_pad = kbar.shape[1], kbar.shape[2], kbar.shape[3]
    first = (kv_len - tq) // block_size
    nqb = nkb - first
    _block_scores_kernel[(nqb, b * hq)](
        q, kbar, out, *q.stride(), tq, kv_len, hq, hq // h, nkb, nqb, first, scale * LOG2E,
        HEAD_DIM=d, D_PAD=d_pad, BS=block_size, BR=_row_tile(block_size, d_pad), BJ=64,
        UPCAST=upcast, num_warps=4,
    )
