"""Triton block selection: max-based threshold and compaction (DESIGN.md steps 2 and 3).

Reads the log2 scores that pattern.py left in the index buffer, keeps block J of query block I
if log2 score_IJ >= max_J log2 score_IJ + log2(alpha) or it is a sink, window or last-full block,
and overwrites the same row with the kept ids in ascending order; kv_num_blocks gets the count.
No sort, no top-k, no host synchronisation. In place is safe: the compacted position of a block
never exceeds its own, and each chunk is fully read before it is written.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _select_kernel(
    SCORES, NUM,
    NKB, NQB, FIRST_QB, log2_alpha,
    SINK: tl.constexpr, WINDOW: tl.constexpr, LAST_FULL: tl.constexpr, KEEP_ALL: tl.constexpr, BJ: tl.constexpr,
):
    qb = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    block = FIRST_QB + qb
    row = SCORES + (pid_bh * NQB + qb) * NKB
    num_chunks = block // BJ + 1
    best = tl.full([BJ], float("-inf"), dtype=tl.float32)
    for jc in range(0, num_chunks):
        kblock = jc * BJ + tl.arange(0, BJ).to(tl.int64)
        bits = tl.load(row + kblock, mask=kblock <= block, other=0)
        s = tl.where(kblock <= block, bits.to(tl.float32, bitcast=True), float("-inf"))
        best = tl.maximum(best, s)
    threshold = tl.max(best, axis=0) + log2_alpha
    full_row = block >= NKB - LAST_FULL
    count = tl.zeros([], dtype=tl.int32)
    for jc in range(0, num_chunks):
        kblock = jc * BJ + tl.arange(0, BJ).to(tl.int64)
        in_range = kblock <= block
        bits = tl.load(row + kblock, mask=in_range, other=0)
        s = bits.to(tl.float32, bitcast=True)
        keep = (kblock < SINK) | (kblock > block - WINDOW) | full_row
        if KEEP_ALL:
            keep = keep | in_range
        else:
            keep = keep | (s >= threshold)
        keep = keep & in_range
        flags = keep.to(tl.int32)
        slot = count + tl.cumsum(flags, axis=0) - 1
        tl.debug_barrier()
        tl.store(row + slot, kblock.to(tl.int32), mask=keep)
        count += tl.sum(flags, axis=0)
    tl.store(NUM + pid_bh * NQB + qb, count)


def select_blocks(scores: torch.Tensor, kv_num_blocks: torch.Tensor, config, q_len: int, kv_len: int) -> None:
    """Threshold + compaction in place: `scores` (int32 bits of fp32) becomes kv_indices."""
    b, hq, nqb, nkb = scores.shape
    keep_all = config.alpha <= 0.0
    _select_kernel[(nqb, b * hq)](
        scores, kv_num_blocks, nkb, nqb, (kv_len - q_len) // config.block_size,
        0.0 if keep_all else math.log2(config.alpha),
        SINK=config.sink_blocks, WINDOW=config.window_blocks, LAST_FULL=config.last_full_blocks,
        KEEP_ALL=keep_all, BJ=64, num_warps=2,
    )
