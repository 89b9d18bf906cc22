"""Readable PyTorch oracle for FlashPrefill, one function per stage.

Stage names follow the Triton kernels (block_means; block_scores + select_blocks, which the Triton
index build fuses; sparse_attention). Works on any device and dtype; every stage upcasts to
`compute_dtype` (fp32 by default). Layout as flash-attn: q (B, Tq, HQ, D), k/v (B, Tk, H, D),
query head h reads KV head h // (HQ // H), and the Tq queries are the last Tq of the Tk positions
(bottom-right causal alignment).
Optimised code never imports this module; tests and benchmarks compare against it.
"""

from __future__ import annotations

import math

import torch

from .config import BlockSparsePattern, FlashPrefillConfig


def block_means(k: torch.Tensor, block_size: int, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """kbar (B, H, NKB, D): the mean key of each block over its valid positions."""
    b, tk, h, d = k.shape
    nkb = math.ceil(tk / block_size)
    padded = torch.zeros(b, nkb * block_size, h, d, dtype=compute_dtype, device=k.device)
    padded[:, :tk] = k.to(compute_dtype)
    sums = padded.view(b, nkb, block_size, h, d).sum(2)
    counts = (tk - torch.arange(nkb, device=k.device) * block_size).clamp(max=block_size).to(compute_dtype)
    return (sums / counts[None, :, None, None]).permute(0, 2, 1, 3)


def block_scores(q: torch.Tensor, kbar: torch.Tensor, block_size: int, kv_len: int, scale: float) -> torch.Tensor:
    """score (B, HQ, NQB, NKB) in kbar's dtype, as in DESIGN.md step 1.

    s_iJ = scale * q_i . kbar_J over the rows i of query block I that see the whole of block J;
    score_IJ = sum_i exp(s_iJ - M_I) with M_I the largest visible s in row block I, which equals
    S_IJ * exp(m_IJ - max_J' m_IJ'). Pairs with no visible row score 0.
    """
    b, tq, hq, d = q.shape
    h, nkb = kbar.shape[1], kbar.shape[2]
    group = hq // h
    first = (kv_len - tq) // block_size
    nqb = nkb - first
    pos = torch.arange(kv_len - tq, kv_len, device=q.device)
    last_key = (torch.arange(1, nkb + 1, device=q.device) * block_size).clamp(max=kv_len) - 1
    kbar_per_q_head = kbar.repeat_interleave(group, dim=1)  # (B, HQ, NKB, D)
    scores = torch.zeros(b, hq, nqb, nkb, dtype=kbar.dtype, device=q.device)
    for qb in range(nqb):
        block = first + qb
        rows = (pos // block_size) == block
        s = scale * torch.einsum("bthd,bhjd->bhtj", q[:, rows].to(kbar.dtype), kbar_per_q_head)
        visible = pos[rows, None] >= last_key[None, :]  # (rows, NKB)
        s = s.masked_fill(~visible, float("-inf"))
        row_max = s.amax(dim=(2, 3), keepdim=True)  # M_I per (B, HQ)
        scores[:, :, qb] = torch.exp(s - row_max).sum(2)
    return scores


def select_blocks(scores: torch.Tensor, config: FlashPrefillConfig, q_len: int, kv_len: int) -> BlockSparsePattern:
    """Max-based threshold plus the always-kept blocks (DESIGN.md steps 2 and 3)."""
    bs = config.block_size
    nqb, nkb = scores.shape[-2:]
    query_block = (kv_len - q_len) // bs + torch.arange(nqb, device=scores.device)[:, None]
    key_block = torch.arange(nkb, device=scores.device)[None, :]
    keep = scores >= config.alpha * scores.amax(-1, keepdim=True)
    keep |= key_block < config.sink_blocks
    keep |= (key_block > query_block - config.window_blocks) & (key_block <= query_block)
    keep |= query_block >= nkb - config.last_full_blocks
    keep &= key_block <= query_block
    return BlockSparsePattern.from_dense(keep, bs, q_len, kv_len)


def causal_pattern(
    batch: int, num_q_heads: int, q_len: int, kv_len: int, block_size: int, device
) -> BlockSparsePattern:
    """Every causally visible block kept: the pattern of dense attention."""
    nkb = math.ceil(kv_len / block_size)
    first = (kv_len - q_len) // block_size
    key_block = torch.arange(nkb, device=device)
    keep = key_block[None, :] <= (first + torch.arange(nkb - first, device=device))[:, None]
    keep = keep.expand(batch, num_q_heads, -1, -1)
    return BlockSparsePattern.from_dense(keep, block_size, q_len, kv_len)


def group_scores(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Per-KV-head scores (B, HQ, NQB, NKB): each head's score (already divided by its own row
    maximum, see block_scores) summed over the query heads of its group, repeated for each of them."""
    b, hq = scores.shape[:2]
    group = hq // num_kv_heads
    summed = scores.view(b, num_kv_heads, group, *scores.shape[2:]).sum(2)
    return summed.repeat_interleave(group, dim=1)


def find_pattern(q: torch.Tensor, k: torch.Tensor, config: FlashPrefillConfig, scale: float) -> BlockSparsePattern:
    """Pattern discovery and selection for one (padded) batch."""
    kbar = block_means(k, config.block_size)
    scores = block_scores(q, kbar, config.block_size, k.shape[1], scale)
    if config.pattern_per_kv_head:
        scores = group_scores(scores, k.shape[2])
    return select_blocks(scores, config, q.shape[1], k.shape[1])


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockSparsePattern,
    scale: float,
    compute_dtype: torch.dtype | None = torch.float32,
    mean_correction: bool = False,
) -> torch.Tensor:
    """Exact softmax attention of each query row over the keys of its kept blocks, token-causal.

    mean_correction (FlashPrefillConfig.mean_correction): each pruned block J before the row's
    own block (so wholly visible) joins the softmax as one more token, logit
    scale * q . kbar_J + log(block_size) and value vbar_J (the block's mean key and value).
    compute_dtype=None computes in the input dtype (the rounding baseline of the tests).
    Returns (B, Tq, HQ, D) in q's dtype. Works one query block at a time to bound memory.
    """
    b, tq, hq, d = q.shape
    tk, h = k.shape[1], k.shape[2]
    group = hq // h
    bs = pattern.block_size
    dtype = compute_dtype or q.dtype
    kh = k.to(dtype).repeat_interleave(group, dim=2).permute(0, 2, 3, 1)  # (B, HQ, D, Tk)
    vh = v.to(dtype).repeat_interleave(group, dim=2).transpose(1, 2)  # (B, HQ, Tk, D)
    block_mask = pattern.to_dense()  # (B, HQ, NQB, NKB)
    nkb = block_mask.shape[-1]
    if mean_correction:  # the blocks' mean keys and values, per query head
        kbar = block_means(k, bs, dtype).repeat_interleave(group, dim=1).transpose(2, 3)  # (B, HQ, D, NKB)
        vbar = block_means(v, bs, dtype).repeat_interleave(group, dim=1)  # (B, HQ, NKB, D)
    key_pos = torch.arange(tk, device=q.device)
    q_pos = torch.arange(tk - tq, tk, device=q.device)
    out = torch.empty(b, tq, hq, d, dtype=q.dtype, device=q.device)
    for qb in range(block_mask.shape[2]):
        rows = (q_pos // bs) == pattern.first_q_block + qb
        if not rows.any():
            continue
        token_keep = block_mask[:, :, qb].repeat_interleave(bs, dim=-1)[..., :tk]  # (B, HQ, Tk)
        causal = key_pos[None, :] <= q_pos[rows, None]  # (rows, Tk)
        allowed = token_keep[:, :, None, :] & causal
        s = torch.matmul(q[:, rows].to(dtype).transpose(1, 2), kh) * scale  # (B, HQ, rows, Tk)
        s = s.masked_fill(~allowed, float("-inf"))
        if not mean_correction:
            p = torch.softmax(s, dim=-1)
            out[:, rows] = torch.matmul(p, vh).transpose(1, 2).to(q.dtype)
            continue
        before = torch.arange(nkb, device=q.device) < pattern.first_q_block + qb
        pruned = before & ~block_mask[:, :, qb]  # (B, HQ, NKB)
        c = torch.matmul(q[:, rows].to(dtype).transpose(1, 2), kbar) * scale + math.log(bs)  # (B, HQ, rows, NKB)
        c = c.masked_fill(~pruned[:, :, None, :], float("-inf"))
        p = torch.softmax(torch.cat([s, c], dim=-1), dim=-1)
        o = torch.matmul(p[..., :tk], vh) + torch.matmul(p[..., tk:], vbar)
        out[:, rows] = o.transpose(1, 2).to(q.dtype)
    return out
