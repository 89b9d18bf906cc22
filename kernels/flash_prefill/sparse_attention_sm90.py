"""Block-sparse flash attention forward for Hopper (sm_90), written in Gluon (DESIGN.md step 4).

The same computation as `sparse_attention.py` (same operations in the same order per row), with
the schedule spelled out instead of left to Triton's pipeliner. Two kernels:

- `_sparse_attention_sm90_ws_kernel` (the default): persistent, one program per SM, warp-
  specialised. A 1-warp producer claims work items (query tile, batch x head) from an atomic
  counter in the launch order below and streams Q and the kept K/V blocks through a ring of
  shared-memory slots with TMA (ready/empty mbarriers per slot), running ahead across work items;
  two 4-warp consumer warpgroups each own 64 of the tile's 128 query rows, copy them from shared
  memory into registers at the start of the item (the A operand of their S products; the Q buffer
  then refills with the next item's rows during this one) and run the loop below on them
  independently, storing their rows with TMA through the item's last K slot.
- `_sparse_attention_sm90_kernel`: one program per (query tile, batch x head), 8 warps, issuing
  its own TMA loads into the ring (kept for comparison and as a simpler fallback).

In both, the two matrix products of a step are asynchronous warpgroup MMAs: step j issues
S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back and waits for S_j. The source then computes
the softmax of S_j before it waits for the P V product (the intra-warpgroup overlap of
FlashAttention-3), but ptxas moves that wait to the front of the softmax (seen in the warp-
specialised kernel's machine code): within a warpgroup the exponentials follow its P V product,
and the other consumer warpgroup's products keep the tensor cores busy meanwhile. A form of that
kernel that keeps the wait behind the softmax measured level or slower
(BENCHMARKS.md, twenty-fifth session; `scripts/sm90_resources.py --schedule` shows where it
falls). Only the last kept block is masked (it is the diagonal whenever the window keeps it), by
a branch inside the loop, so its loads stay in the pipeline.

With the mean correction (FlashPrefillConfig.mean_correction) each work item of the warp-
specialised kernel runs, after its kept blocks, its tiles of 128 block means (mean keys and values
of blocks 0-127, 128-255, ...) through the same ring and the same loop, each with those blocks'
kept flags copied beside it into shared memory; their scores take log2 of the block size and are
masked to the pruned blocks before the tile's own.

They cover the common case only: bf16/fp16, block size 128, head dim up to 128, queries starting
on a 128-row boundary ((Tk - Tq) % 128 == 0), TMA-compatible strides. `supported` says whether a
call qualifies; the caller falls back to the Triton kernel otherwise.
"""

from __future__ import annotations

import functools
import math

import torch

from ..runtime import Launcher, PreparedLaunches, capability, current_stream_getter
from .sparse_attention import _correction_inputs, launch_order

try:  # Gluon is Triton's explicit-layout dialect; Hopper pieces from triton 3.5 on.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # A barrier over the CTA's threads: `thread_barrier` in triton 3.6, `barrier` later.
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

LOG2E = 1.4426950408889634
BLOCK = 128  # query rows per program = key rows per step = the sparsity block size
# K/V ring depth: 3 slots (224 KiB of shared memory with Q) took 3-15% less time than 2 in both
# kernels on the H200 (BENCHMARKS.md, Hopper kernels).
DEFAULT_STAGES = 3
# The mean correction's kept-block map has rows of a multiple of 16 flags, so that its TMA copies
# start on 16-byte boundaries and it spans a multiple of 16 bytes (with rows of 1025 flags, a
# 128K-token prompt's, the copies failed with an illegal instruction on the H200).
KEPT_ROW_MULTIPLE = 16
# Registers per thread asked for the second consumer partition of the warp-specialised kernel.
CONSUMER_REGS = 232

if HAVE_GLUON:

    @gluon.jit
    def _softmax_step(s, m_i, l_i, qk_scale, kblock, rows, T_K, is_last, BN: gl.constexpr, layout: gl.constexpr):
        """Online-softmax update for one block of scores s (fp32, layout `layout`); the last
        kept block is masked to keys <= the query position and < T_K."""
        if is_last:
            cols = kblock * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
            keep = (cols[None, :] <= rows[:, None]) & (cols[None, :] < T_K)
            s = gl.where(keep, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        correction = gl.exp2(m_i - m_new)
        l_i = l_i * correction + gl.sum(p, axis=1)
        return p, m_new, l_i, correction

    @gluon.jit
    def _mean_tokens(s, kept_smem, first, tile, bias, BN: gl.constexpr, layout: gl.constexpr):
        """Scores of a tile of block means (blocks first .. first + BN - 1) as mean tokens: the
        pruned blocks before the query tile's own block `tile` get `bias` (log2 of the block size
        over the scale), the rest are masked out. kept_smem: the blocks' kept flags (uint8)."""
        cols = first + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
        kept = kept_smem.load(gl.SliceLayout(0, layout))
        return gl.where(((kept == 0) & (cols < tile))[None, :], s + bias, float("-inf"))

    @gluon.jit
    def _mean_tiles(tile, num_kept, BM: gl.constexpr):
        """Tiles of BM block means a work item attends after its kept blocks: those covering the
        blocks before its own, none where all of them are kept (kept ids are distinct and at most
        `tile`)."""
        return (tile + BM - 1) // BM * (num_kept <= tile).to(gl.int32)

    @gluon.jit
    def _record(TRACE, item, k: gl.constexpr, value, TRACE_ITEMS: gl.constexpr):
        """Profiling only: TRACE[program, item, k] = value."""
        if TRACE_ITEMS > 0:
            if item < TRACE_ITEMS:
                gl.store(TRACE + (gl.program_id(0) * TRACE_ITEMS + item) * 16 + k, value.to(gl.int64))

    @gluon.jit
    def _stamp(TRACE, item, k: gl.constexpr, anchor, TRACE_ITEMS: gl.constexpr, GLOBAL: gl.constexpr = False):
        """Profiling only (TRACE_ITEMS > 0, compiled out otherwise): TRACE[program, item, k] = the
        SM's clock (GLOBAL: the global nanosecond timer) once `anchor`, an int32 scalar, is known."""
        if TRACE_ITEMS > 0:
            if item < TRACE_ITEMS:
                timer: gl.constexpr = "%globaltimer" if GLOBAL else "%clock64"
                now = gl.inline_asm_elementwise("mov.u64 $0, " + timer + ";", "=l,r", [anchor], dtype=gl.int64,
                                                is_pure=False, pack=1)
                _record(TRACE, item, k, now, TRACE_ITEMS)

    @gluon.jit
    def _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, idx, j, num_kept, slot, b, hk,
                  BN: gl.constexpr):
        """Start the TMA loads of the j-th kept block's K and V into ring slot `slot` (no-op past
        the last kept block)."""
        pred = j < num_kept
        kblock = gl.load(idx + j, mask=pred, other=0)
        row = kblock * BN
        mbarrier.expect(k_bars.index(slot), k_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(k_desc, [b, hk, row, 0], k_bars.index(slot), k_smem.index(slot), pred=pred)
        mbarrier.expect(v_bars.index(slot), v_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(v_desc, [b, hk, row, 0], v_bars.index(slot), v_smem.index(slot), pred=pred)

    @gluon.jit
    def _work_item(w, num_tiles, NUM_Q_HEADS, GROUP, FIRST_TILE, NQB, T_Q, T_K, BM: gl.constexpr,
                   GROUP_ORDER: gl.constexpr):
        """Work item w (0, 1, ... in launch order, `sparse_attention.launch_order`) -> (query
        tile, batch, query head, first query row, pattern row)."""
        tile, pid_bh = launch_order(w, num_tiles, NUM_Q_HEADS, GROUP, FIRST_TILE, GROUP_ORDER)
        b = pid_bh // NUM_Q_HEADS
        h = pid_bh % NUM_Q_HEADS
        q_row = tile * BM - (T_K - T_Q)
        pattern_row = (pid_bh * NQB + tile - FIRST_TILE).to(gl.int64)
        return tile, b, h, q_row, pattern_row

    # Not specialised on lengths (divisibility by 16, == 1): a new prompt length compiles nothing.
    @gluon.jit(do_not_specialize=["T_Q", "T_K", "NKB", "NQB", "FIRST_TILE"])
    def _sparse_attention_sm90_kernel(
        q_desc, k_desc, v_desc, o_desc, KV_NUM, KV_IDX,
        T_Q, T_K, NUM_Q_HEADS, GROUP, NKB, NQB, FIRST_TILE, qk_scale,
        D_PAD: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr, GROUP_ORDER: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        BN: gl.constexpr = BM
        dtype: gl.constexpr = q_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, D_PAD, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        tile_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, D_PAD], dtype)

        num_tiles = gl.num_programs(0)
        tile, b, h, q_row, pattern_row = _work_item(
            gl.program_id(1) * num_tiles + gl.program_id(0), num_tiles, NUM_Q_HEADS, GROUP, FIRST_TILE, NQB, T_Q,
            T_K, BM, GROUP_ORDER,
        )
        hk = h // GROUP
        num_kept = gl.load(KV_NUM + pattern_row)
        idx = KV_IDX + pattern_row * NKB

        q_smem = gl.allocate_shared_memory(dtype, [BM, D_PAD], tile_smem)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D_PAD], tile_smem)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D_PAD], tile_smem)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)

        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, q_row, 0], q_bar, q_smem)
        for i in gl.static_range(STAGES):
            _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, idx, i, num_kept, i, b, hk, BN)

        rows = tile * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
        s_zero = gl.zeros([BM, BN], gl.float32, s_layout)
        acc = gl.zeros([BM, D_PAD], gl.float32, o_layout)
        m_i = gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, s_layout))

        # Step 0: the first kept block's scores and probabilities.
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bars.index(0), 0)
        s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=[s_tok])
        kblock = gl.load(idx)
        p, m_i, l_i, correction = _softmax_step(s, m_i, l_i, qk_scale, kblock, rows, T_K, num_kept == 1, BN, s_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)

        for j in range(1, num_kept):
            slot = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(k_bars.index(slot), (j // STAGES) & 1)
            s_tok = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
            acc_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            # S_j is done (MMA groups retire in order); P_{j-1} V_{j-1} may still run.
            s = warpgroup_mma_wait(1, deps=[s_tok])
            kblock = gl.load(idx + j)
            p, m_i, l_i, correction = _softmax_step(
                s, m_i, l_i, qk_scale, kblock, rows, T_K, j == num_kept - 1, BN, s_layout
            )
            acc, p_op = warpgroup_mma_wait(0, deps=[acc_tok, p_op])
            # Slot `prev` is free once both warpgroups are past their waits: refill it.
            _cta_barrier()
            _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, idx, j - 1 + STAGES, num_kept, prev, b, hk, BN)
            acc = acc * gl.convert_layout(correction, gl.SliceLayout(1, o_layout))[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)

        last = num_kept - 1
        mbarrier.wait(v_bars.index(last % STAGES), (last // STAGES) & 1)
        acc_tok = warpgroup_mma(p_op, v_smem.index(last % STAGES), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc_tok])

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bars.index(i))
            mbarrier.invalidate(v_bars.index(i))

        out = acc * gl.convert_layout(1.0 / l_i, gl.SliceLayout(1, o_layout))[:, None]
        # Every warpgroup is past its last read of Q: reuse its buffer to stage the output.
        _cta_barrier()
        q_smem.store(out.to(dtype))
        fence_async_shared()
        _cta_barrier()
        tma.async_copy_shared_to_global(o_desc, [b, h, q_row, 0], q_smem)
        tma.store_wait(0)

    _sparse_attention_sm90_launch = Launcher(_sparse_attention_sm90_kernel)

    # ---- Warp-specialised, persistent kernel (the default) ----------------------------------

    @gluon.jit
    def _ws_producer(q_desc, k_desc, v_desc, km_desc, vm_desc, kept_desc, q_smem, k_smem, v_smem, kept_smem,
                     q_ready, q_empty, k_ready, v_ready, kv_empty, info, COUNTER, KV_NUM, KV_IDX, total, num_tiles,
                     T_Q, T_K, NUM_Q_HEADS, GROUP, NKB, NQB, FIRST_TILE, TRACE, KEPT_ROW, BM: gl.constexpr,
                     STAGES: gl.constexpr, GROUP_ORDER: gl.constexpr, DYNAMIC: gl.constexpr, TRACE_ITEMS: gl.constexpr,
                     MEAN_CORRECTION: gl.constexpr):
        """1 warp: claims work items, publishes each one's index in `info` with its Q load on
        `q_ready`, and streams the item's kept K/V blocks into the ring (slot = running block count
        % STAGES), waiting on each slot's `kv_empty` (both consumers done with it); with
        MEAN_CORRECTION then the item's tiles of block means (km_desc, vm_desc) the same way, each
        with its 128 blocks' kept flags (kept_desc, rows of KEPT_ROW flags, into the slot's `kept_smem`)."""
        info_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        count = 0
        t = 0
        w = gl.program_id(0)
        while w < total:
            tile, b, h, q_row, pattern_row = _work_item(
                w, num_tiles, NUM_Q_HEADS, GROUP, FIRST_TILE, NQB, T_Q, T_K, BM, GROUP_ORDER
            )
            hk = h // GROUP
            num_kept = gl.load(KV_NUM + pattern_row)
            idx = KV_IDX + pattern_row * NKB
            _stamp(TRACE, t, 8, num_kept, TRACE_ITEMS)
            # Both consumers have the previous item's Q in registers: the buffer and `info` are free.
            mbarrier.wait(q_empty, (t & 1) ^ 1)
            _stamp(TRACE, t, 9, num_kept, TRACE_ITEMS)
            info.store(gl.full([1], w, gl.int32, info_layout))
            mbarrier.expect(q_ready, q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, h, q_row, 0], q_ready, q_smem)
            for j in range(num_kept):
                slot = count % STAGES
                mbarrier.wait(kv_empty.index(slot), ((count // STAGES) & 1) ^ 1)
                row = gl.load(idx + j) * BM
                mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(k_desc, [b, hk, row, 0], k_ready.index(slot), k_smem.index(slot))
                mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(v_desc, [b, hk, row, 0], v_ready.index(slot), v_smem.index(slot))
                count += 1
            if MEAN_CORRECTION:
                for jm in range(_mean_tiles(tile, num_kept, BM)):
                    slot = count % STAGES
                    mbarrier.wait(kv_empty.index(slot), ((count // STAGES) & 1) ^ 1)
                    mbarrier.expect(k_ready.index(slot), km_desc.block_type.nbytes + kept_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(km_desc, [b, hk, jm * BM, 0], k_ready.index(slot),
                                                    k_smem.index(slot))
                    tma.async_copy_global_to_shared(kept_desc, [pattern_row.to(gl.int32) * KEPT_ROW + jm * BM],
                                                    k_ready.index(slot), kept_smem.index(slot))
                    mbarrier.expect(v_ready.index(slot), vm_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(vm_desc, [b, hk, jm * BM, 0], v_ready.index(slot),
                                                    v_smem.index(slot))
                    count += 1
            _stamp(TRACE, t, 10, count, TRACE_ITEMS)
            t += 1
            if DYNAMIC:  # the next unclaimed item, as the hardware scheduler would hand out blocks
                w = gl.num_programs(0) + gl.atomic_add(COUNTER, 1)
            else:
                w = w + gl.num_programs(0)
        if DYNAMIC:  # the program that draws last leaves COUNTER at zero for the next launch
            if gl.atomic_add(COUNTER + 1, 1) == gl.num_programs(0) - 1:
                gl.atomic_xchg(COUNTER, 0)
                gl.atomic_xchg(COUNTER + 1, 0)
        # No item left: wake the consumers with an out-of-range item.
        mbarrier.wait(q_empty, (t & 1) ^ 1)
        info.store(gl.full([1], total, gl.int32, info_layout))
        mbarrier.arrive(q_ready)

    @gluon.jit
    def _ws_consumer(q_smem, k_smem, v_smem, q_ready, q_empty, s_done, k_ready, v_ready, kv_empty, info, o_desc,
                     KV_NUM, KV_IDX, total, num_tiles, T_Q, T_K, NUM_Q_HEADS, GROUP, NKB, NQB, FIRST_TILE, qk_scale,
                     TRACE, kept_smem, mean_bias, D_PAD: gl.constexpr, BM: gl.constexpr, ROW0: gl.constexpr,
                     STAGES: gl.constexpr, GROUP_ORDER: gl.constexpr, TRACE_ITEMS: gl.constexpr,
                     MEAN_CORRECTION: gl.constexpr):
        """One warpgroup: query rows ROW0 .. ROW0 + BM/2 of every work item the producer hands out.
        Arrives on `q_empty` once it has copied its rows of the item's Q into registers, on
        `s_done` once its last S of the item is done, and on a slot's `kv_empty` once its P V
        product with that slot is done, except the item's last slot, which carries its rows of O
        out (below) and is released after that.
        MEAN_CORRECTION: after the kept blocks, the item's tiles of block means as one token per
        pruned block before the tile's own (each ring slot's kept flags in `kept_smem`)."""
        ROWS: gl.constexpr = BM // 2
        BN: gl.constexpr = BM
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BN, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D_PAD, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        q_half = q_smem.slice(ROW0, ROWS)
        q_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        s_zero = gl.zeros([ROWS, BN], gl.float32, s_layout)
        info_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        count = 0
        t = 0
        mbarrier.wait(q_ready, 0)
        w = gl.max(info.load(info_layout), axis=0)
        while w < total:
            _stamp(TRACE, t, 0, w, TRACE_ITEMS)
            _stamp(TRACE, t, 12, w, TRACE_ITEMS, GLOBAL=True)
            tile, b, h, q_row, pattern_row = _work_item(
                w, num_tiles, NUM_Q_HEADS, GROUP, FIRST_TILE, NQB, T_Q, T_K, BM, GROUP_ORDER
            )
            num_kept = gl.load(KV_NUM + pattern_row)
            idx = KV_IDX + pattern_row * NKB
            steps = num_kept
            if MEAN_CORRECTION:
                steps = num_kept + _mean_tiles(tile, num_kept, BM)
            _stamp(TRACE, t, 1, num_kept, TRACE_ITEMS)
            _record(TRACE, t, 7, num_kept, TRACE_ITEMS)
            q_regs = q_half.load(q_layout)
            # This warpgroup's rows of Q into registers: the buffer may take the next item's (the
            # producer loads it during this item instead of after its last S; BENCHMARKS.md).
            mbarrier.arrive(q_empty)
            rows = tile * BM + ROW0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
            acc = gl.zeros([ROWS, D_PAD], gl.float32, o_layout)
            m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
            l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))

            slot = count % STAGES
            mbarrier.wait(k_ready.index(slot), (count // STAGES) & 1)
            _stamp(TRACE, t, 2, num_kept, TRACE_ITEMS)
            s_tok = warpgroup_mma(q_regs, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=[s_tok])
            _stamp(TRACE, t, 3, num_kept, TRACE_ITEMS)
            mbarrier.arrive(s_done, pred=steps == 1)
            kblock = gl.load(idx)
            p, m_i, l_i, correction = _softmax_step(s, m_i, l_i, qk_scale, kblock, rows, T_K, num_kept == 1, BN,
                                                    s_layout)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            for j in range(1, steps):
                prev = slot
                slot = (count + j) % STAGES
                mbarrier.wait(k_ready.index(slot), ((count + j) // STAGES) & 1)
                s_tok = warpgroup_mma(q_regs, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False,
                                      is_async=True)
                mbarrier.wait(v_ready.index(prev), ((count + j - 1) // STAGES) & 1)
                acc_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=[s_tok])
                mbarrier.arrive(s_done, pred=j == steps - 1)
                kj = j
                if MEAN_CORRECTION:
                    kj = gl.minimum(j, num_kept - 1)  # (a tile of means has no kept block of its own)
                    if j >= num_kept:
                        s = _mean_tokens(s, kept_smem.index(slot), (j - num_kept) * BN, tile, mean_bias, BN,
                                         s_layout)
                is_last = j == num_kept - 1
                kblock = gl.load(idx + kj)
                p, m_i, l_i, correction = _softmax_step(s, m_i, l_i, qk_scale, kblock, rows, T_K, is_last, BN,
                                                        s_layout)
                acc, p_op = warpgroup_mma_wait(0, deps=[acc_tok, p_op])
                mbarrier.arrive(kv_empty.index(prev))
                acc = acc * gl.convert_layout(correction, gl.SliceLayout(1, o_layout))[:, None]
                p_op = gl.convert_layout(p.to(dtype), p_layout)
            _stamp(TRACE, t, 4, num_kept, TRACE_ITEMS)
            mbarrier.wait(v_ready.index(slot), ((count + steps - 1) // STAGES) & 1)
            acc_tok = warpgroup_mma(p_op, v_smem.index(slot), acc, is_async=True)
            acc, p_op = warpgroup_mma_wait(0, deps=[acc_tok, p_op])
            _stamp(TRACE, t, 5, num_kept, TRACE_ITEMS)
            # Output rows: staged in this item's last K slot, which no S reads any more once both
            # consumers are past their last S (this item's `s_done` phase), and written with one
            # TMA store (rows past T_Q and columns past the head dim are dropped); the slot goes
            # back to the producer once the store has read it. Per-thread global stores from the
            # MMA layout took about 2 us per item (BENCHMARKS.md).
            out = acc * gl.convert_layout(1.0 / l_i, gl.SliceLayout(1, o_layout))[:, None]
            stage = k_smem.index(slot).slice(ROW0, ROWS)
            mbarrier.wait(s_done, t & 1)
            stage.store(out.to(dtype))
            fence_async_shared()
            _cta_barrier()
            tma.async_copy_shared_to_global(o_desc, [b, h, q_row + ROW0, 0], stage)
            tma.store_wait(0)
            _cta_barrier()
            mbarrier.arrive(kv_empty.index(slot))
            count += steps
            t += 1
            _stamp(TRACE, t - 1, 6, num_kept, TRACE_ITEMS)
            mbarrier.wait(q_ready, t & 1)
            w = gl.max(info.load(info_layout), axis=0)

    # Not specialised on lengths (divisibility by 16, == 1): a new prompt length compiles nothing.
    @gluon.jit(do_not_specialize=["T_Q", "T_K", "NKB", "NQB", "FIRST_TILE", "num_tiles", "total", "KEPT_ROW"])
    def _sparse_attention_sm90_ws_kernel(
        q_desc, k_desc, v_desc, o_desc, km_desc, vm_desc, kept_desc, KV_NUM, KV_IDX, COUNTER,
        T_Q, T_K, NUM_Q_HEADS, GROUP, NKB, NQB, FIRST_TILE, num_tiles, total, qk_scale, TRACE, mean_bias, KEPT_ROW,
        D_PAD: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr,
        GROUP_ORDER: gl.constexpr, DYNAMIC: gl.constexpr, CONSUMER_REGS: gl.constexpr, TRACE_ITEMS: gl.constexpr,
        MEAN_CORRECTION: gl.constexpr, num_warps: gl.constexpr,
    ):
        """num_warps (4) run the first consumer; the second consumer and the producer are worker
        partitions. COUNTER (int32 [next item, programs done drawing], zero at launch) hands out
        items from num_programs on; the last program to finish drawing sets it back to zero.
        km_desc, vm_desc, kept_desc: the block means and the flattened kept-block map (uint8, 1
        where kept) of the mean correction, KEPT_ROW the map's row length (a multiple of
        KEPT_ROW_MULTIPLE flags); None without it."""
        dtype: gl.constexpr = q_desc.dtype
        tile_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, D_PAD], dtype)
        q_smem = gl.allocate_shared_memory(dtype, [BM, D_PAD], tile_smem)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, D_PAD], tile_smem)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, D_PAD], tile_smem)
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        s_done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        info = gl.allocate_shared_memory(gl.int32, [1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        kept_smem = k_smem  # (unused without the correction)
        if MEAN_CORRECTION:  # a ring slot's kept flags of its tile of means
            kept_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BM],
                                                  gl.NVMMASharedLayout.get_default_for([BM], gl.uint8))
        mbarrier.init(q_ready, count=1)
        mbarrier.init(q_empty, count=2)
        mbarrier.init(s_done, count=2)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)
        gl.warp_specialize(
            [
                (_ws_consumer, (q_smem, k_smem, v_smem, q_ready, q_empty, s_done, k_ready, v_ready, kv_empty, info,
                                o_desc, KV_NUM, KV_IDX, total, num_tiles, T_Q, T_K, NUM_Q_HEADS, GROUP, NKB, NQB,
                                FIRST_TILE, qk_scale, TRACE, kept_smem, mean_bias, D_PAD, BM, 0, STAGES, GROUP_ORDER,
                                TRACE_ITEMS, MEAN_CORRECTION)),
                (_ws_consumer, (q_smem, k_smem, v_smem, q_ready, q_empty, s_done, k_ready, v_ready, kv_empty, info,
                                o_desc, KV_NUM, KV_IDX, total, num_tiles, T_Q, T_K, NUM_Q_HEADS, GROUP, NKB, NQB,
                                FIRST_TILE, qk_scale, TRACE, kept_smem, mean_bias, D_PAD, BM, BM // 2, STAGES,
                                GROUP_ORDER, 0, MEAN_CORRECTION)),
                (_ws_producer, (q_desc, k_desc, v_desc, km_desc, vm_desc, kept_desc, q_smem, k_smem, v_smem,
                                kept_smem, q_ready, q_empty, k_ready, v_ready, kv_empty, info, COUNTER, KV_NUM,
                                KV_IDX, total, num_tiles, T_Q, T_K, NUM_Q_HEADS, GROUP, NKB, NQB, FIRST_TILE, TRACE,
                                KEPT_ROW, BM, STAGES, GROUP_ORDER, DYNAMIC, TRACE_ITEMS, MEAN_CORRECTION)),
            ],
            [4, 1],
            [CONSUMER_REGS, 24],
        )

    _sparse_attention_sm90_ws_launch = Launcher(_sparse_attention_sm90_ws_kernel)
    # Its launches made again with other Q, K, V, outputs and block lists (those positions) by
    # shape, stride and value; a forward's layers attend at one shape.
    _ws_prepared = PreparedLaunches(_sparse_attention_sm90_ws_launch, varying=(0, 1, 2, 3, 7, 8, 20))


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> bool:
    """Whether this kernel can run the call: Hopper, 16-bit floats, block 128, head dim up to 128
    (padded to 64 or 128 inside), queries on a 128-row boundary, strides TMA accepts."""
    if not HAVE_GLUON or q.device.type != "cuda" or capability(q.device.index)[0] != 9:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or block_size != BLOCK or _d_pad(q.shape[-1]) is None:
        return False
    if (k.shape[1] - q.shape[1]) % BLOCK:
        return False
    return all(_tma_compatible(t) for t in (q, k, v))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}


def _work_counter(device: torch.device) -> torch.Tensor:
    """The dynamic schedule's two int32 counters for launches on the current stream. Zeroed once;
    each launch leaves them at zero, and launches on one stream run in order, so no per-call
    memset (one set per stream, so kernels running concurrently never share one). Under CUDA
    graph capture a fresh zeroed pair, its memset part of the graph."""
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(2, dtype=torch.int32, device=device)
    key = (device.index, current_stream_getter()(device.index))
    counter = _COUNTERS.get(key)
    if counter is None:
        counter = _COUNTERS[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return counter


def _tma_compatible(t: torch.Tensor) -> bool:
    """Unit last stride, 16-byte aligned base and other strides (what a TMA descriptor needs)."""
    size, (s0, s1, s2, s3) = t.element_size(), t.stride()  # (checked at every call: no generator)
    return s3 == 1 and not ((s0 * size) % 16 or (s1 * size) % 16 or (s2 * size) % 16) and t.data_ptr() % 16 == 0


def _d_pad(d: int) -> int | None:
    """The head dim the kernel computes with (zero columns past d), None where unsupported."""
    return 64 if 16 <= d <= 64 else 128 if 64 < d <= 128 else None


@functools.cache
def _smem_layout(rows: int, d_pad: int, fp16: bool):
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, d_pad], gl.float16 if fp16 else gl.bfloat16)


@functools.cache
def _descriptor_fields_known() -> bool:
    """Whether Gluon's TensorDescriptor is the dataclass `_descriptor` fills in directly: the five
    fields it sets, and defaults for the rest."""
    import dataclasses

    if not dataclasses.is_dataclass(TensorDescriptor):
        return False
    fields = dataclasses.fields(TensorDescriptor)
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    return required == ["base", "shape", "strides", "block_shape", "layout"] and all(
        f.default_factory is dataclasses.MISSING for f in fields)


def _descriptor(t: torch.Tensor, rows: int, d_pad: int):
    """A TMA descriptor over (B, T, H, D) `t` in (B, H, T, D) order, one (rows, d_pad) tile per
    copy; rows past T and columns past D read as zeros and are not written. `t` must be what
    `_tma_compatible` accepts (every caller checks it): then the descriptor's fields are filled in
    without its constructor's checks of the same, which cost 3-5 us of host time a descriptor
    (four a call; BENCHMARKS.md, twentieth session)."""
    b, n, h, d = t.shape
    sb, st, sh, sd = t.stride()
    layout = _smem_layout(rows, d_pad, t.dtype == torch.float16)
    if not _descriptor_fields_known():
        return TensorDescriptor(t, [b, h, n, d], [sb, sh, st, sd], [1, 1, rows, d_pad], layout)
    desc = object.__new__(TensorDescriptor)
    desc.base, desc.shape, desc.strides, desc.block_shape, desc.layout = (
        t, [b, h, n, d], [sb, sh, st, sd], [1, 1, rows, d_pad], layout)
    return desc


def _means_descriptor(means: torch.Tensor):
    """A TMA descriptor over contiguous (B, H, NKB, d_pad) block means, one (128, d_pad) tile (128
    blocks' means) per copy; rows past NKB read as zeros."""
    layout = _smem_layout(BLOCK, means.shape[3], means.dtype == torch.float16)
    return TensorDescriptor(means, list(means.shape), list(means.stride()), [1, 1, BLOCK, means.shape[3]], layout)


def _kept_descriptor(kept: torch.Tensor):
    """A TMA descriptor over the kept-block map (uint8 (B, HQ, NQB, NKB padded to a multiple of
    KEPT_ROW_MULTIPLE)) flattened, 128 flags per copy (past the end: zeros); offsets are int32."""
    if kept.numel() >= 2**31:
        raise ValueError(f"the mean correction on this kernel takes block grids under 2^31 entries, got {kept.numel()}")
    flat = kept.view(-1)
    return TensorDescriptor(flat, [flat.numel()], [1], [BLOCK], gl.NVMMASharedLayout.get_default_for([BLOCK], gl.uint8))


def sparse_attention_sm90(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    group_order: bool = True,
    stages: int = DEFAULT_STAGES,
    warp_specialized: bool = True,
    dynamic: bool = True,
    trace: torch.Tensor | None = None,
    mean_correction: bool = False,
) -> torch.Tensor:
    """Block-sparse attention on Hopper; q (B, Tq, HQ, D), k/v (B, Tk, H, D) -> (B, Tq, HQ, D).
    The call must satisfy `supported` (block size 128).

    mean_correction: warp-specialised kernel, also attend each pruned block before a query tile's
    own block as one token, logit scale * q . kbar + log(128), value vbar (the block's mean key and
    value; FlashPrefillConfig.mean_correction): each work item runs its tiles of 128 block means
    through the ring after its kept blocks, each with its blocks' kept flags.

    warp_specialized: the persistent kernel with a producer warp and two consumer warpgroups
    (default; 13-22% less time than the per-tile one at 16K-128K, BENCHMARKS.md) instead of one program
    per tile. dynamic: its programs claim work items from an atomic counter (default) instead of
    a fixed round-robin, which balances the uneven rows of selected patterns.

    trace: profiling only (`scripts/gpu_trace_sm90.py`), warp-specialised kernel: an int64 tensor
    (programs, items, 16), programs = min(work items, SMs), that receives clock stamps of each
    program's first `items` work items (the layout is in that script).
    """
    if (trace is not None or mean_correction) and not warp_specialized:
        raise ValueError("trace and mean_correction run on the warp-specialised kernel only (warp_specialized=True)")
    b, tq, hq, d = q.shape
    tk, h = k.shape[1], k.shape[2]
    nqb, nkb = kv_indices.shape[2], kv_indices.shape[3]
    d_pad = _d_pad(d)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or not _tma_compatible(out):
        raise ValueError(
            f"out must have q's shape {tuple(q.shape)} and dtype {q.dtype}, a unit last stride and 16-byte "
            f"aligned strides; got {tuple(out.shape)}, {out.dtype}, strides {out.stride()}"
        )
    first_tile = (tk - tq) // BLOCK
    num_tiles = -(-tk // BLOCK) - first_tile
    if warp_specialized:
        total = num_tiles * b * hq
        programs = min(total, _sm_count(q.device.index))
        if trace is not None and (trace.dtype != torch.int64 or trace.dim() != 3 or trace.shape[0] != programs
                                  or trace.shape[2] != 16 or not trace.is_contiguous()):
            raise ValueError(f"trace must be a contiguous int64 tensor ({programs}, items, 16)")
        key = None
        if trace is None and not mean_correction and _ws_prepared.active():
            counts, ids = kv_num_blocks.data_ptr(), kv_indices.data_ptr()
            key = (q.shape, k.shape, v.shape, kv_indices.shape, q.stride(), k.stride(), v.stride(), out.stride(),
                   q.dtype, q.device.index, current_stream_getter()(q.device.index), scale, counts % 16, ids % 16,
                   group_order, stages, dynamic, CONSUMER_REGS)

        def build():
            k_means = v_means = kept = kept_row = None
            if mean_correction:
                kept_map, kbar, vbar = _correction_inputs(k, v, kv_num_blocks, kv_indices, BLOCK, d_pad, q.dtype,
                                                          False, row_multiple=KEPT_ROW_MULTIPLE)
                k_means, v_means, kept = _means_descriptor(kbar), _means_descriptor(vbar), _kept_descriptor(kept_map)
                kept_row = kept_map.shape[-1]
            args = (
                *(_descriptor(t, BLOCK, d_pad) for t in (q, k, v)), _descriptor(out, BLOCK // 2, d_pad),
                k_means, v_means, kept,
                kv_num_blocks, kv_indices, _work_counter(q.device),
                tq, tk, hq, hq // h, nkb, nqb, first_tile, num_tiles, total, scale * LOG2E,
                kv_num_blocks if trace is None else trace,
                math.log2(BLOCK) / (scale * LOG2E) if mean_correction else None, kept_row,
            )
            return (programs,), args, dict(
                D_PAD=d_pad, BM=BLOCK, STAGES=stages, GROUP_ORDER=group_order, DYNAMIC=dynamic,
                CONSUMER_REGS=CONSUMER_REGS, TRACE_ITEMS=0 if trace is None else trace.shape[1],
                MEAN_CORRECTION=mean_correction, num_warps=4)

        _ws_prepared.launch(key, (q, k, v, out, kv_num_blocks, kv_indices, kv_num_blocks), build)
        return out
    _sparse_attention_sm90_launch[(num_tiles, b * hq)](
        *(_descriptor(t, BLOCK, d_pad) for t in (q, k, v, out)),
        kv_num_blocks, kv_indices,
        tq, tk, hq, hq // h, nkb, nqb, first_tile, scale * LOG2E,
        D_PAD=d_pad, BM=BLOCK, STAGES=stages, GROUP_ORDER=group_order, num_warps=8,
    )
    return out
