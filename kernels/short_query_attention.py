"""Dense causal attention of a few queries over many keys, split along the keys.

A question asked about a video whose KV cache is kept prefills a few to a few hundred tokens over
a prefix of up to 256K keys. Every block of such a call is kept (FlashPrefill's last full blocks),
so it is dense attention. PyTorch's flash-attention kernel runs it per query head, each reading
its KV head's keys and values: 7 reads of them for Qwen2.5-VL-7B, 0.43 ms a layer for 16 queries
over 131K keys on an H200, where reading them once takes about 60 us (BENCHMARKS.md, thirty-third
and thirty-fourth sessions). Here the query heads of a KV head and several queries share each load,
and the keys are split into spans as in flash decoding (kernels.decode_attention).

q (B, TQ, HQ, D), k / v (B, TK, H, D) (flash_prefill's layout; any strides with a unit last one):
the queries are the last TQ of the TK positions (bottom-right causal alignment), query t sees keys
0 .. TK - TQ + t. HQ a multiple of H. Returns (B, TQ, HQ, D) in q's dtype; fp16 / bf16 / fp32,
head dim up to 256.

One program per (row, KV head, tile of BLOCK_M packed rows, span): the rows of a tile are (query,
query head of the KV head) pairs, query-major, so the query heads of a KV head read its keys and
values together. A program runs an online softmax in fp32 over its span, BLOCK_N keys a tile, the
tiles every row of it sees whole first and the causal edge after, and writes the span's
unnormalised output, maximum and sum; decode_attention's combine kernel then merges the spans of
each (row, query, query head). `short_query_attention_reference` is the readable PyTorch form.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_attention import MIN_SPLIT, _combine_launch, _sm_count, attend_tile
from .runtime import Launcher, check_device, interpreting

LOG2E = 1.4426950408889634
# Launch settings (first choice; see BENCHMARKS.md for what was measured).
BLOCK_M = 128  # packed (query, query head) rows per program, at most
BLOCK_N = 64  # keys per tile
# Spans are sized so that a launch has about min(PROGRAMS_PER_SM, tiles of a KV head) programs per SM:
# on an H200, one a SM for a tile a KV head (16 queries of Qwen2.5-VL-7B), four from four tiles on.
PROGRAMS_PER_SM = 4
NUM_WARPS, NUM_STAGES = 8, 3
COMBINE_DIMS, COMBINE_SPANS = 32, 128  # as decode_attention's
MAX_QUERIES = 1024  # the partial outputs grow with TQ x spans: longer queries belong to a prefill kernel
MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# The query count, keys, tiles and spans vary from call to call: not specialised on (one compiled
# kernel serves every question, which the pipeline's warm-up compiles).
@triton.jit(do_not_specialize=["TQ", "TK", "NUM_TILES", "NUM_SPLITS"])
def _short_query_spans_kernel(Q, K, V, PART_O, PART_ML, scale_log2, TQ, TK, H, NUM_TILES, SPAN, NUM_SPLITS,
                              s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                              GROUP: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)  # (row * H + KV head) * NUM_TILES + tile
    split = tl.program_id(1)
    tile = pid % NUM_TILES
    bh = pid // NUM_TILES
    b = (bh // H).to(tl.int64)
    hk = (bh % H).to(tl.int64)
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    t = r // GROUP  # the row's query
    g = r % GROUP  # its query head within the KV head
    in_rows = t < TQ
    seen = TK - TQ + t  # the last key the query sees
    first_query = tile * BLOCK_M // GROUP
    last_query = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP, TQ - 1)
    start = split * SPAN
    end = tl.minimum(start + SPAN, TK - TQ + last_query + 1)  # past the tile's last query's keys: nothing
    # Tiles of keys every row of the tile sees, whole: no causal mask.
    whole_end = tl.maximum(start, start + (tl.minimum(end, TK - TQ + first_query + 1) - start) // BLOCK_N * BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    in_dim = d < D
    q = tl.load(Q + b * s_qb + t.to(tl.int64)[:, None] * s_qt + (hk * GROUP + g)[:, None] * s_qh + d[None, :],
                mask=in_rows[:, None] & in_dim[None, :], other=0.0)
    if UPCAST:  # Triton's interpreter multiplies bf16 bits wrongly: fp32 there (and in attend_tile)
        q = q.to(tl.float32)
    k_rows = K + b * s_kb + hk * s_kh
    v_rows = V + b * s_vb + hk * s_vh
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(start, whole_end, BLOCK_N):
        m, l_sum, acc = attend_tile(q, k_rows, v_rows, n0 + tl.arange(0, BLOCK_N), s_kt, s_vt, d, in_dim[None, :],
                                    in_rows, scale_log2, m, l_sum, acc, MASKED=False, GUARD=False,
                                    PRECISION=PRECISION, UPCAST=UPCAST)
    for n0 in range(whole_end, end, BLOCK_N):  # the causal edge and the span's end
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        m, l_sum, acc = attend_tile(q, k_rows, v_rows, n, s_kt, s_vt, d, valid[:, None] & in_dim[None, :],
                                    valid[None, :] & (n[None, :] <= seen[:, None]), scale_log2, m, l_sum, acc,
                                    MASKED=True, GUARD=True, PRECISION=PRECISION, UPCAST=UPCAST)
    # Record ((row * TQ + query) * HQ + query head) * NUM_SPLITS + span: the combine's rows are (row,
    # query) pairs and its heads the query heads.
    rec = ((b * TQ + t) * (H * GROUP) + hk * GROUP + g) * NUM_SPLITS + split
    tl.store(PART_O + rec[:, None] * BLOCK_D + d[None, :], acc, mask=in_rows[:, None])
    tl.store(PART_ML + rec * 2, m, mask=in_rows)
    tl.store(PART_ML + rec * 2 + 1, l_sum, mask=in_rows)


_spans_launch = Launcher(_short_query_spans_kernel)


def short_query_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention with bottom-right alignment, in fp32, -> q's dtype."""
    tq, tk, hq, h = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    keys = k.float().repeat_interleave(hq // h, dim=2)
    values = v.float().repeat_interleave(hq // h, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), keys) * scale
    seen = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    weights = scores.masked_fill(~seen, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, values).to(q.dtype)


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError / TypeError for inputs `short_query_attention` does not take."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q must be (B, TQ, HQ, D) and k, v one (B, TK, H, D) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, tq, hq, d = q.shape
    tk, h = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or hq % h:
        raise ValueError(f"k, v {tuple(k.shape)} do not fit q {tuple(q.shape)}: same rows and head dim, query "
                         "heads a multiple of KV heads")
    if not 0 < tq <= min(tk, MAX_QUERIES) or not 0 < d <= MAX_HEAD_DIM:
        raise ValueError(f"1 to {MAX_QUERIES} queries, no more than the keys, and head dims 1-{MAX_HEAD_DIM} are "
                         f"supported, got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one of {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k and v must have a unit last stride")
    check_device("short_query_attention", q.device)
    if any(t.device != q.device for t in (k, v)):
        raise ValueError("q, k and v must be on one device")


def spans(tk: int, programs_per_span: int, device: torch.device, split: int | None = None, block_n: int = BLOCK_N,
          programs_per_sm: int = PROGRAMS_PER_SM) -> tuple[int, int]:
    """(keys per span, spans) for `tk` keys and `programs_per_span` (row, KV head, tile) programs:
    about programs_per_sm programs per SM in all, each span whole tiles of block_n keys and at
    least MIN_SPLIT keys. `split` given (tests): that many keys per span, rounded up to whole tiles."""
    if split is None:
        sms = _sm_count(device.index) if device.type == "cuda" else 8
        count = max(1, -(-programs_per_sm * sms // programs_per_span))
        split = max(MIN_SPLIT, -(-tk // count))
    span = -(-split // block_n) * block_n
    return span, -(-tk // span)


def short_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          split: int | None = None, *, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
                          programs_per_sm: int | None = None, num_warps: int = NUM_WARPS,
                          num_stages: int = NUM_STAGES) -> torch.Tensor:
    """Causal attention of q (B, TQ, HQ, D), the last TQ positions, over k / v (B, TK, H, D) ->
    (B, TQ, HQ, D) (module docstring). split: keys per span (tests; default `spans`'s). The other
    keyword-only arguments are the launch's tuning (benchmarks; defaults: the module's constants, and
    programs_per_sm as PROGRAMS_PER_SM says)."""
    check(q, k, v)
    b, tq, hq, d = q.shape
    tk, h = k.shape[1], k.shape[2]
    group = hq // h
    rows = tq * group
    # On CUDA one tile size whatever the rows: one compiled kernel for every question. Under the
    # interpreter a tile no larger than the rows keeps the tests fast.
    if not q.is_cuda:
        block_m = max(16, min(block_m, triton.next_power_of_2(rows)))
    num_tiles = -(-rows // block_m)
    if programs_per_sm is None:
        programs_per_sm = min(PROGRAMS_PER_SM, num_tiles)
    span, num_splits = spans(tk, b * h * num_tiles, q.device, split, block_n, programs_per_sm)
    block_d = max(16, triton.next_power_of_2(d))
    part_o = torch.empty(b * tq * hq * num_splits, block_d, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(b * tq * hq * num_splits, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(b, tq, hq, d, dtype=q.dtype, device=q.device)
    upcast = interpreting() and q.dtype == torch.bfloat16
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"  # (the latter: unused for 16-bit inputs)
    _spans_launch[(b * h * num_tiles, num_splits)](
        q, k, v, part_o, part_ml, scale * LOG2E, tq, tk, h, num_tiles, span, num_splits,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), GROUP=group, BLOCK_M=block_m, D=d, BLOCK_D=block_d, BLOCK_N=block_n, PRECISION=precision,
        UPCAST=upcast, num_warps=num_warps, num_stages=num_stages,
    )
    # The combine's rows are the (row, query) pairs: out is contiguous, (row * TQ + query) * HQ * D apart.
    dims = min(COMBINE_DIMS, block_d)
    _combine_launch[(b * tq * hq, block_d // dims)](
        part_o, part_ml, out, hq, num_splits, out.stride(1), out.stride(2), D=d, BLOCK_D=block_d, BLOCK_DC=dims,
        BLOCK_S=COMBINE_SPANS, num_warps=4)
    return out
