"""Triton pattern discovery and selection (DESIGN.md steps 1-3) in two launches.

`block_means` writes kbar (B, H, NKB, D_PAD): the mean key of each block, already multiplied by
log2(e) * scale and stored in q's dtype, so the score dot needs no conversion and no scaling.
`build_index` is one program per (query block I, batch * query head). Pass 1 computes, for each
key block J <= I, the log2 score
    log2 score_IJ = m_IJ + log2 sum_i exp2(s_iJ - m_IJ),   s_iJ = log2(e) * scale * q_i . kbar_J
over the rows i of block I that see all of block J (-inf when none does) and keeps the running
maximum over J; the scores go into the program's own row of the int32 index buffer (as fp32
bits), so nothing larger than the block grid is allocated. Pass 2 keeps J when its score
reaches max + log2(alpha) or it is a sink, window or last-full block, and overwrites the same
row with the kept ids in ascending order; kv_num_blocks gets the count. No sort, no top-k, no
host synchronisation. In place is safe: a block's compacted slot never exceeds its own, and
each chunk is fully read before it is written.
With config.pattern_per_kv_head the program covers the GROUP query heads of one KV head: pass 1
runs per head into that head's own row (its M_I parked in kv_num_blocks), a middle pass sums
exp2(log2 score - M_I) over the heads into the first head's row, and pass 2 thresholds that sum
once and writes the same kept ids into every head's row.
Head dims that are not powers of two are padded to D_PAD inside the kernels.

On Hopper and later, up to PDL_MAX_BLOCKS key blocks, the index build is launched as a
programmatic dependent of the block means (PDL, `dependent_launch`): block means lets it start at
once, and each of its programs loads its query block, then waits for the block means to finish
before reading them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..runtime import Launcher, PreparedLaunches, capability, interpreting

try:  # (Triton's grid dependency control, sm_90 and later)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton
    gdc_launch_dependents = gdc_wait = None

# The index build as a programmatic dependent launch of the block means where the GPU has it and
# the key has at most PDL_MAX_BLOCKS blocks: as a CUDA graph 2 us less at 4K and 2-9 us less at
# 16K, the same at 32K; at 64K 14 us more in one run, within what two runs of one configuration
# differed by, so left out there (BENCHMARKS.md, nineteenth session, runs 8-10). False: two
# plain launches.
PDL = True
PDL_MAX_BLOCKS = 256  # (32K tokens of 128-token blocks)

LOG2E = 1.4426950408889634


# Not specialised on lengths (divisibility by 16, == 1): a new prompt length compiles nothing.
@triton.jit(do_not_specialize=["T_K", "NKB"])
def _block_means_kernel(
    K, KBAR,
    stride_kb, stride_kt, stride_kh, stride_kd,
    T_K, NUM_KV_HEADS, NKB, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, TRIGGER: tl.constexpr,
):
    if TRIGGER:  # the dependent index build may start now (it waits for this kernel before reading kbar)
        gdc_launch_dependents()
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
    tl.store(KBAR + (pid_bh * NKB + kb) * D_PAD + d, (acc * (qk_scale / count)).to(KBAR.dtype.element_ty))


_block_means_launch = Launcher(_block_means_kernel)
_block_means_prepared = PreparedLaunches(_block_means_launch, varying=(0, 1))  # (k, kbar)


@triton.jit
def _chunk_scores(q, KBAR, kv_row, jc, pos, row_ok, NKB, T_K,
                  D_PAD: tl.constexpr, BS: tl.constexpr, BJ: tl.constexpr, MASKED: tl.constexpr):
    """(key blocks, m, log2 score) of blocks jc*BJ .. jc*BJ+BJ-1 for one query block and head;
    the rows of the query block reduce within a warp."""
    d = tl.arange(0, D_PAD)
    kblock = jc * BJ + tl.arange(0, BJ).to(tl.int64)
    kbar = tl.load(KBAR + (kv_row * NKB + kblock[:, None]) * D_PAD + d[None, :], mask=kblock[:, None] < NKB,
                   other=0.0)
    s = tl.dot(kbar, tl.trans(q))  # (BJ, BS), already log2(e) * scale * q . kbar
    if MASKED:
        last_key = tl.minimum((kblock + 1) * BS, T_K) - 1
        visible = row_ok[None, :] & (pos[None, :] >= last_key[:, None])
        s = tl.where(visible, s, float("-inf"))
        m = tl.max(s, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        total = tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        # total >= 1 wherever a row is visible (its own maximum adds exp2(0)).
        return kblock, m, tl.where(total > 0, m + tl.log2(tl.maximum(total, 1.0)), float("-inf"))
    m = tl.max(s, axis=1)
    return kblock, m, m + tl.log2(tl.sum(tl.exp2(s - m[:, None]), axis=1))


@triton.jit
def _score_row(
    q_base, KBAR, kv_row, row, block, stride_qt, stride_qd, T_Q, T_K, NKB,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, BJ: tl.constexpr, UPCAST: tl.constexpr,
    PDL: tl.constexpr,
):
    """Pass 1 for one query head: log2 scores of every J <= I into `row`; returns the largest
    log2 score and the largest m_IJ (the head's row maximum M_I)."""
    q_start = T_K - T_Q
    d = tl.arange(0, D_PAD)
    pos = block * BS + tl.arange(0, BS).to(tl.int64)
    row_ok = (pos >= q_start) & (pos < T_K)
    q = tl.load(
        q_base + (pos - q_start)[:, None] * stride_qt + d[None, :] * stride_qd,
        mask=row_ok[:, None] & (d[None, :] < HEAD_DIM),
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    if PDL:  # the block means are complete and visible past this point
        gdc_wait()
    best = tl.full([BJ], float("-inf"), dtype=tl.float32)
    best_m = tl.full([BJ], float("-inf"), dtype=tl.float32)
    # Chunks wholly before block I are seen by every row; only a block with missing rows
    # (first or last of the sequence) and the chunk holding the diagonal need the mask.
    all_rows = (block * BS >= q_start) & ((block + 1) * BS <= T_K)
    num_plain = tl.where(all_rows, block // BJ, 0)
    for jc in range(0, num_plain):
        kblock, m, score = _chunk_scores(q, KBAR, kv_row, jc, pos, row_ok, NKB, T_K, D_PAD, BS, BJ, False)
        tl.store(row + kblock, score.to(tl.int32, bitcast=True))
        best = tl.maximum(best, score)
        best_m = tl.maximum(best_m, m)
    for jc in range(num_plain, block // BJ + 1):
        kblock, m, score = _chunk_scores(q, KBAR, kv_row, jc, pos, row_ok, NKB, T_K, D_PAD, BS, BJ, True)
        in_range = kblock <= block
        tl.store(row + kblock, score.to(tl.int32, bitcast=True), mask=in_range)
        best = tl.maximum(best, tl.where(in_range, score, float("-inf")))
        best_m = tl.maximum(best_m, tl.where(in_range, m, float("-inf")))
    return tl.max(best, axis=0), tl.max(best_m, axis=0)


# Not specialised on lengths (divisibility by 16, == 1): a new prompt length compiles nothing.
@triton.jit(do_not_specialize=["T_Q", "T_K", "NKB", "NQB", "FIRST_QB"])
def _index_kernel(
    Q, KBAR, IDX, NUM,
    stride_qb, stride_qt, stride_qh, stride_qd,
    T_Q, T_K, NUM_Q_HEADS, GROUP, NKB, NQB, FIRST_QB, log2_alpha,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, BJ: tl.constexpr, UPCAST: tl.constexpr,
    SINK: tl.constexpr, WINDOW: tl.constexpr, LAST_FULL: tl.constexpr, KEEP_ALL: tl.constexpr,
    PER_KV_HEAD: tl.constexpr, PDL: tl.constexpr,
):
    # One program per (query block, batch * query head), or per (query block, batch * KV head)
    # with PER_KV_HEAD, where it writes the same kept ids into the rows of all GROUP heads.
    # PDL: launched as a dependent of the block means; nothing is read or written before the
    # wait but the query block (complete before the block means started).
    if PDL and KEEP_ALL:
        gdc_wait()
    qb = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1).to(tl.int64)
    num_kv_heads = NUM_Q_HEADS // GROUP
    block = FIRST_QB + qb
    num_chunks = block // BJ + 1
    if PER_KV_HEAD:
        b = pid // num_kv_heads
        first_head = b * NUM_Q_HEADS + (pid % num_kv_heads) * GROUP  # batch * query-head row
        heads = GROUP
        kv_row = pid
    else:
        b = pid // NUM_Q_HEADS
        first_head = pid
        heads = 1
        kv_row = b * num_kv_heads + (pid % NUM_Q_HEADS) // GROUP
    row0 = IDX + (first_head * NQB + qb) * NKB
    threshold = 0.0
    if not KEEP_ALL:
        if PER_KV_HEAD:
            for hi in range(0, GROUP):
                r = (first_head + hi) * NQB + qb
                q_base = Q + b * stride_qb + (first_head + hi - b * NUM_Q_HEADS) * stride_qh
                _, top_m = _score_row(q_base, KBAR, kv_row, IDX + r * NKB, block, stride_qt, stride_qd,
                                      T_Q, T_K, NKB, HEAD_DIM, D_PAD, BS, BJ, UPCAST, PDL)
                tl.store(NUM + r, top_m.to(tl.int32, bitcast=True))  # scratch until the count lands
            tl.debug_barrier()
            # Pass 2: sum over the group of exp2(log2 score - M_I of the head), into the first row.
            best = tl.full([BJ], float("-inf"), dtype=tl.float32)
            for jc in range(0, num_chunks):
                kblock = jc * BJ + tl.arange(0, BJ).to(tl.int64)
                in_range = kblock <= block
                total = tl.zeros([BJ], dtype=tl.float32)
                for hi in range(0, GROUP):
                    r = (first_head + hi) * NQB + qb
                    top_m = tl.load(NUM + r).to(tl.float32, bitcast=True)
                    bits = tl.load(IDX + r * NKB + kblock, mask=in_range, other=0)
                    total += tl.where(in_range, tl.exp2(bits.to(tl.float32, bitcast=True) - top_m), 0.0)
                # Each head's best block adds >= 1 to its J, so the clamp only touches blocks far
                # below any threshold (and keeps log2 off zero).
                score = tl.where(total > 0, tl.log2(tl.maximum(total, 1e-30)), float("-inf"))
                tl.debug_barrier()  # the first row's chunk is read by every thread before it is overwritten
                tl.store(row0 + kblock, score.to(tl.int32, bitcast=True), mask=in_range)
                best = tl.maximum(best, tl.where(in_range, score, float("-inf")))
            threshold = tl.max(best, axis=0) + log2_alpha
        else:
            q_base = Q + b * stride_qb + (pid % NUM_Q_HEADS) * stride_qh
            top, _ = _score_row(q_base, KBAR, kv_row, row0, block, stride_qt, stride_qd,
                                T_Q, T_K, NKB, HEAD_DIM, D_PAD, BS, BJ, UPCAST, PDL)
            threshold = top + log2_alpha
        tl.debug_barrier()  # the whole row is written before any thread reads it back

    full_row = block >= NKB - LAST_FULL
    count = tl.zeros([], dtype=tl.int32)
    for jc in range(0, num_chunks):
        kblock = jc * BJ + tl.arange(0, BJ).to(tl.int64)
        in_range = kblock <= block
        keep = (kblock < SINK) | (kblock > block - WINDOW) | full_row
        if KEEP_ALL:
            keep = keep | in_range
        else:
            bits = tl.load(row0 + kblock, mask=in_range, other=0)
            keep = keep | (bits.to(tl.float32, bitcast=True) >= threshold)
        keep = keep & in_range
        flags = keep.to(tl.int32)
        slot = count + tl.cumsum(flags, axis=0) - 1
        tl.debug_barrier()  # every thread has read this chunk before any slot in it is overwritten
        for hi in range(0, heads):
            tl.store(IDX + ((first_head + hi) * NQB + qb) * NKB + slot, kblock.to(tl.int32), mask=keep)
        count += tl.sum(flags, axis=0)
    for hi in range(0, heads):
        tl.store(NUM + (first_head + hi) * NQB + qb, count)


_index_launch = Launcher(_index_kernel)
_index_prepared = PreparedLaunches(_index_launch, varying=(0, 1, 2, 3))  # (q, kbar, kv_indices, kv_num_blocks)


def dependent_launch(device: torch.device, num_key_blocks: int) -> bool:
    """Whether `build_index` runs as a programmatic dependent launch of `block_means` here."""
    return (PDL and num_key_blocks <= PDL_MAX_BLOCKS and gdc_wait is not None and not interpreting()
            and device.type == "cuda" and capability(device.index) >= (9, 0))


def block_means(k: torch.Tensor, block_size: int, d_pad: int, scale: float, dtype: torch.dtype,
                trigger: bool = False) -> torch.Tensor:
    """kbar (B, H, NKB, d_pad) in `dtype`, times log2(e) * scale; padded head-dim columns are zero.
    trigger: let a dependent launch (`build_index(..., dependent=True)`, next on the stream) start
    at once; only where `dependent_launch`."""
    b, tk, h, d = k.shape
    nkb = math.ceil(tk / block_size)
    kbar = torch.empty(b, h, nkb, d_pad, dtype=dtype, device=k.device)
    key = None
    if _block_means_prepared.active():
        key = (k.shape, k.stride(), k.dtype, k.device.index, k.data_ptr() % 16, kbar.data_ptr() % 16, block_size,
               d_pad, scale, dtype, trigger)
    _block_means_prepared.launch(key, (k, kbar), lambda: (
        (nkb, b * h), (k, kbar, *k.stride(), tk, h, nkb, scale * LOG2E),
        dict(HEAD_DIM=d, D_PAD=d_pad, BS=block_size, BT=min(block_size, 64), TRIGGER=trigger, num_warps=4)))
    return kbar


# (key blocks per chunk, warps) of the index kernel; 64 rows of s^T per warpgroup.
INDEX_TILES = (64, 4)


def build_index(
    q: torch.Tensor, kbar: torch.Tensor, kv_indices: torch.Tensor, kv_num_blocks: torch.Tensor, config, kv_len: int,
    upcast: bool, tiles: tuple[int, int] | None = None, dependent: bool = False,
) -> None:
    """Scores, threshold and compaction: fills kv_indices (B, HQ, NQB, NKB) and kv_num_blocks.
    dependent: launched right after `block_means(..., trigger=True)` wrote kbar, as its
    programmatic dependent (only where `dependent_launch`): the query block is read before
    that kernel has finished, so q must predate it."""
    b, tq, hq, d = q.shape
    h, nkb, d_pad = kbar.shape[1], kbar.shape[2], kbar.shape[3]
    bs = config.block_size
    first = (kv_len - tq) // bs
    nqb = nkb - first
    keep_all = config.alpha <= 0.0
    bj, warps = tiles or INDEX_TILES
    per_kv_head = config.pattern_per_kv_head and h < hq
    key = None
    if _index_prepared.active():
        key = (q.shape, q.stride(), q.dtype, q.device.index, kbar.shape, kbar.dtype, kv_indices.shape, kv_len,
               config, upcast, bj, warps, dependent, q.data_ptr() % 16, kbar.data_ptr() % 16,
               kv_indices.data_ptr() % 16, kv_num_blocks.data_ptr() % 16)
    _index_prepared.launch(key, (q, kbar, kv_indices, kv_num_blocks), lambda: (
        (nqb, b * (h if per_kv_head else hq)),
        (q, kbar, kv_indices, kv_num_blocks, *q.stride(), tq, kv_len, hq, hq // h, nkb, nqb, first,
         0.0 if keep_all else math.log2(config.alpha)),
        dict(HEAD_DIM=d, D_PAD=d_pad, BS=bs, BJ=bj, UPCAST=upcast, SINK=config.sink_blocks,
             WINDOW=config.window_blocks, LAST_FULL=config.last_full_blocks, KEEP_ALL=keep_all,
             PER_KV_HEAD=per_kv_head, PDL=dependent, num_warps=warps, **({"launch_pdl": True} if dependent else {}))))
