"""Block-sparse flash attention forward for Hopper (sm_90), written in Gluon (DESIGN.md step 4).

The same computation as `sparse_attention.py`, one program per (query tile, batch * query
head), with the schedule spelled out instead of left to Triton's pipeliner:

- Q, K and V arrive through TMA into shared memory; K and V sit in a ring of STAGES slots with
  one mbarrier each, so K of a block can be used while its V is still in flight.
- The two matrix products of a step are asynchronous warpgroup MMAs, and step j issues
  S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back, then computes the softmax of S_j while
  the P V product runs (the intra-warpgroup overlap of FlashAttention-3). Triton 3.6's own
  pipeliner waits for S before the softmax and for P V before the next S, so the exponentials
  and the tensor cores take turns there.
- Only the last kept block is masked (it is the diagonal whenever the window keeps it), by a
  branch inside the loop, so its loads stay in the pipeline.

It covers the common case only: bf16/fp16, block size 128, head dim up to 128, queries starting
on a 128-row boundary ((Tk - Tq) % 128 == 0), TMA-compatible strides. `supported` says whether a
call qualifies; the caller falls back to the Triton kernel otherwise.
"""

from __future__ import annotations

import torch

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
# K/V ring depth: 3 slots (224 KiB of shared memory with Q) were 4-9% faster than 2 on the H200
# (BENCHMARKS.md, Hopper kernel).
DEFAULT_STAGES = 3

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
    def _sparse_attention_sm90_kernel(
        q_desc, k_desc, v_desc, o_desc, KV_NUM, KV_IDX,
        T_Q, T_K, NUM_Q_HEADS, GROUP, NKB, NQB, FIRST_QB, FIRST_TILE, qk_scale,
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

        # Launch order as in the Triton kernel: last query tiles first, optionally a KV group's
        # heads side by side.
        num_tiles = gl.num_programs(0)
        if GROUP_ORDER:
            lin = gl.program_id(1) * num_tiles + gl.program_id(0)
            rest = lin // GROUP
            kv_heads = NUM_Q_HEADS // GROUP
            tile = FIRST_TILE + num_tiles - 1 - rest % num_tiles
            bg = rest // num_tiles
            pid_bh = (bg // kv_heads) * NUM_Q_HEADS + (bg % kv_heads) * GROUP + lin % GROUP
        else:
            tile = FIRST_TILE + num_tiles - 1 - gl.program_id(0)
            pid_bh = gl.program_id(1)
        b = pid_bh // NUM_Q_HEADS
        h = pid_bh % NUM_Q_HEADS
        hk = h // GROUP
        q_row = tile * BM - (T_K - T_Q)
        pattern_row = (pid_bh * NQB + tile - FIRST_QB).to(gl.int64)
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


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> bool:
    """Whether this kernel can run the call: Hopper, 16-bit floats, block 128, head dim up to 128
    (padded to 64 or 128 inside), queries on a 128-row boundary, strides TMA accepts."""
    if not HAVE_GLUON or q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or block_size != BLOCK or _d_pad(q.shape[-1]) is None:
        return False
    if (k.shape[1] - q.shape[1]) % BLOCK:
        return False
    size = q.element_size()
    for t in (q, k, v):
        if t.stride(3) != 1 or any((s * size) % 16 for s in t.stride()[:3]) or t.data_ptr() % 16:
            return False
    return True


def _d_pad(d: int) -> int | None:
    """The head dim the kernel computes with (zero columns past d), None where unsupported."""
    return 64 if 16 <= d <= 64 else 128 if 64 < d <= 128 else None


def _descriptor(t: torch.Tensor, rows: int, d_pad: int):
    """A TMA descriptor over (B, T, H, D) `t` in (B, H, T, D) order, one (rows, d_pad) tile per
    copy; rows past T and columns past D read as zeros and are not written."""
    b, n, h, d = t.shape
    sb, st, sh, sd = t.stride()
    dtype = gl.float16 if t.dtype == torch.float16 else gl.bfloat16
    layout = gl.NVMMASharedLayout.get_default_for([1, 1, rows, d_pad], dtype)
    return TensorDescriptor(t, [b, h, n, d], [sb, sh, st, sd], [1, 1, rows, d_pad], layout)


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
) -> torch.Tensor:
    """Block-sparse attention on Hopper; q (B, Tq, HQ, D), k/v (B, Tk, H, D) -> (B, Tq, HQ, D).
    The call must satisfy `supported` (block size 128)."""
    b, tq, hq, d = q.shape
    tk, h = k.shape[1], k.shape[2]
    nqb, nkb = kv_indices.shape[2], kv_indices.shape[3]
    d_pad = _d_pad(d)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    first_tile = (tk - tq) // BLOCK
    num_tiles = -(-tk // BLOCK) - first_tile
    _sparse_attention_sm90_kernel[(num_tiles, b * hq)](
        *(_descriptor(t, BLOCK, d_pad) for t in (q, k, v, out)),
        kv_num_blocks, kv_indices,
        tq, tk, hq, hq // h, nkb, nqb, first_tile, first_tile, scale * LOG2E,
        D_PAD=d_pad, BM=BLOCK, STAGES=stages, GROUP_ORDER=group_order, num_warps=8,
    )
    return out
