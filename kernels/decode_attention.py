"""Attention of one query token over a KV cache whose valid length is read on the device.

A decoding step attends one new token to every cached key. `decode_attention` does it over a
cache reserved for the whole answer, with the number of valid positions in a device tensor, so
that the same launches serve every step and a CUDA graph can replay them (models.decode): nothing
about a step's length is known on the host.

q (B, HQ, D), k / v (B, H, CAP, D) (transformers' cache layout; any strides with a unit last
one), lengths (B,) integers on the same device: row b attends to its keys 0 .. lengths[b] - 1
(a length past CAP counts as CAP; a length of 0 gives NaN rows). HQ a multiple of H: the query
heads of a KV head (grouped-query attention) read its keys and values once, together. Returns
(B, HQ, D) in q's dtype. fp16 / bf16 / fp32; head dim up to 256.

Split-K ("flash decoding"): one program per (row, KV head, span) computes its group's scores
tile by tile (BLOCK_N keys) with an online softmax in fp32 and writes the span's unnormalised
output, maximum and sum; a second kernel combines the spans of each query head (COMBINE_DIMS of
its output dims a program, COMBINE_SPANS spans a load). The number of spans depends on the GPU and
the heads (`splits`); each row's length is divided between them on the device, so spans past a
short row's length end at once. The probabilities meet V in the inputs' dtype, as in flash
attention (in fp32 for bf16 under Triton's interpreter, which multiplies bf16 wrongly).
`decode_attention_reference` is the readable PyTorch form.

A cache table (`fill_table`: per layer the address, head stride and capacity of its reserved
keys and values, in a device tensor) lets launches read a cache that did not exist when they were
captured: `decode_attention(..., table=, layer=)` attends over it and `write_kv` writes a token's
key and value into it at a device position. models.decode captures a model's decoding step once
and replays it for the buffers of every later answer, refilling the table.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .runtime import Launcher, check_device, interpreting

LOG2E = 1.4426950408889634
# Launch settings: the fastest of 36 (tiles of 64 / 128 keys, 4 / 8 / 16 programs per SM, 4 / 8
# warps, 2-4 stages) on an H200 at 64K and 128K keys, within 0.6 us of it at 16K: 76.5 us at 128K
# keys (3.5 TB/s of K and V) against 85.2 us for SDPA's flash kernel over exactly the length, GPU
# time in CUDA graphs, 28 query / 4 KV heads (BENCHMARKS.md, twenty-eighth session).
BLOCK_N = 64  # keys per tile
MIN_SPLIT = 256  # keys per span, at least
PROGRAMS_PER_SM = 4  # spans are sized so that a launch has about this many programs per SM
NUM_WARPS, NUM_STAGES = 4, 2
# The combine: output dims per program, spans per load (fixed, so that no cache capacity compiles
# another variant). Against one program per query head reading 16 spans a load, the whole
# attention took 11.4 against 16.1 us at 16K keys and 69.5 against 79.0 us at 128K on an H200
# (BENCHMARKS.md, thirtieth session).
COMBINE_DIMS, COMBINE_SPANS = 32, 128
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A cache table's row per layer: its keys' and values' addresses, their head stride and capacity.
TABLE_COLUMNS = tl.constexpr(4)
TABLE_ALIGN = 64  # bytes: every address in a table, and a table-reading launch's k and v, a multiple of it
MAX_GROUP = 64  # query heads per KV head
MAX_HEAD_DIM = 256


# The span, capacity and layer are not specialised: a new cache capacity compiles nothing. The strides
# are (multiples of 16 in any reserved cache: the loads can be vectorised).
@triton.jit(do_not_specialize=["SPLIT", "CAP", "LAYER"])
def _decode_spans_kernel(Q, K, V, LENGTHS, TABLE, LAYER, PART_O, PART_ML, scale_log2, H, SPLIT, CAP, NUM_SPLITS,
                         s_qb, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr, MIN_SPAN: tl.constexpr, FROM_TABLE: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(0)  # row * H + KV head
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    hk = (bh % H).to(tl.int64)
    if FROM_TABLE:  # (batch 1) the cache's addresses, head stride and capacity from the table's row LAYER
        row = TABLE + LAYER * TABLE_COLUMNS
        head = hk * tl.multiple_of(tl.load(row + 2), 16)
        k_rows = K + _table_offset(row, K) + head
        v_rows = V + _table_offset(row + 1, V) + head
        cap = tl.load(row + 3).to(tl.int32)
    else:
        k_rows = K + b * s_kb + hk * s_kh
        v_rows = V + b * s_vb + hk * s_vh
        cap = CAP
    length = tl.minimum(tl.load(LENGTHS + b).to(tl.int32), cap)
    if SPLIT > 0:
        span = SPLIT
    else:  # the length over the spans, in whole tiles, at least MIN_SPAN keys
        span = tl.maximum(tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N, MIN_SPAN)
    start = split * span
    end = tl.minimum(start + span, length)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    in_group = g < GROUP
    in_dim = d < D
    q = tl.load(Q + b * s_qb + (hk * GROUP + g)[:, None] * s_qh + d[None, :],
                mask=in_group[:, None] & in_dim[None, :], other=0.0)
    if UPCAST:  # Triton's interpreter multiplies bf16 bits wrongly: fp32 there
        q = q.to(tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        m, l_sum, acc = attend_tile(q, k_rows, v_rows, n, s_kt, s_vt, d, valid[:, None] & in_dim[None, :],
                                    valid[None, :], scale_log2, m, l_sum, acc, MASKED=True, GUARD=False,
                                    PRECISION=PRECISION, UPCAST=UPCAST)
    # Row (b, query head) of the span records: (b * H + hk) * GROUP + g.
    rec = (bh.to(tl.int64) * GROUP + g) * NUM_SPLITS + split
    tl.store(PART_O + rec[:, None] * BLOCK_D + d[None, :], acc, mask=in_group[:, None])
    tl.store(PART_ML + rec * 2, m, mask=in_group)
    tl.store(PART_ML + rec * 2 + 1, l_sum, mask=in_group)


@triton.jit
def attend_tile(q, k_rows, v_rows, n, s_kt, s_vt, d, kv_mask, visible, scale_log2, m, l_sum, acc,
                MASKED: tl.constexpr, GUARD: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One tile of keys n (rows k_rows + n * s_kt + d, loaded where kv_mask) into the online softmax of
    the queries q: their running maximum m and sum l_sum (log2 units) and unnormalised output acc,
    returned updated. MASKED: scores only where `visible`. GUARD: a row that sees no key of the tile
    and none before it stays empty (a causal edge; without it its exponentials are NaN)."""
    k = tl.load(k_rows + n.to(tl.int64)[:, None] * s_kt + d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:  # Triton's interpreter multiplies bf16 bits wrongly: fp32 there
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    if GUARD:
        m_used = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_used = m_new
    p = tl.exp2(s - m_used[:, None])
    alpha = tl.exp2(m - m_used)
    l_sum = l_sum * alpha + tl.sum(p, axis=1)
    v = tl.load(v_rows + n.to(tl.int64)[:, None] * s_vt + d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_sum, acc


@triton.jit
def _table_offset(at, base):
    """The elements from pointer `base` to the address the table holds at `at`, said to be a
    multiple of 16: both addresses are multiples of TABLE_ALIGN bytes (`fill_table` and
    `decode_attention` check them). The loads from `base` plus it are vectorised and pipelined as
    from a given tensor; a pointer made from the address itself carries no alignment to the
    compiler: every load a single element, the attention 2-2.5x slower on an H200 (BENCHMARKS.md,
    thirty-first session)."""
    size: tl.constexpr = base.dtype.element_ty.primitive_bitwidth // 8
    return tl.multiple_of((tl.load(at) - base.to(tl.int64)) // size, 16)


@triton.jit(do_not_specialize=["LAYER"])
def _write_kv_kernel(KEY, VALUE, INDEX, TABLE, LAYER, s_kh, s_vh, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per KV head: its key and value at position INDEX[0] of the table's row LAYER."""
    h = tl.program_id(0).to(tl.int64)
    row = TABLE + LAYER * TABLE_COLUMNS
    position = tl.load(INDEX).to(tl.int64)
    offset = h * tl.load(row + 2) + position * D
    d = tl.arange(0, BLOCK_D)
    inside = (d < D) & (position < tl.load(row + 3))  # (a position past the capacity is not written)
    k_at = tl.load(row).to(tl.pointer_type(KEY.dtype.element_ty)) + offset  # (a few elements: no alignment needed)
    v_at = tl.load(row + 1).to(tl.pointer_type(VALUE.dtype.element_ty)) + offset
    tl.store(k_at + d, tl.load(KEY + h * s_kh + d, mask=d < D), mask=inside)
    tl.store(v_at + d, tl.load(VALUE + h * s_vh + d, mask=d < D), mask=inside)


@triton.jit(do_not_specialize=["NUM_SPLITS"])  # (one compiled kernel for every span count)
def _decode_combine_kernel(PART_O, PART_ML, OUT, HQ, NUM_SPLITS, s_ob, s_oh, D: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_DC: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per (row, query head) and BLOCK_DC of its output dims: BLOCK_S spans a load."""
    row = tl.program_id(0).to(tl.int64)  # b * HQ + query head
    d = tl.program_id(1) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    first = row * NUM_SPLITS
    top = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        top = tl.maximum(top, tl.load(PART_ML + (first + s) * 2, mask=s < NUM_SPLITS, other=float("-inf")))
    m = tl.max(top, axis=0)
    den = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_DC], tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        inside = s < NUM_SPLITS
        span_m = tl.load(PART_ML + (first + s) * 2, mask=inside, other=float("-inf"))
        w = tl.where(span_m > float("-inf"), tl.exp2(span_m - m), 0.0)  # (an empty span weighs nothing)
        den += w * tl.load(PART_ML + (first + s) * 2 + 1, mask=inside, other=0.0)
        o = tl.load(PART_O + (first + s)[:, None] * BLOCK_D + d[None, :], mask=inside[:, None], other=0.0)
        acc += tl.sum(w[:, None] * o, axis=0)
    out = acc / tl.sum(den, axis=0)
    b = row // HQ
    h = row % HQ
    tl.store(OUT + b * s_ob + h * s_oh + d, out.to(OUT.dtype.element_ty), mask=d < D)


_spans_launch = Launcher(_decode_spans_kernel)
_combine_launch = Launcher(_decode_combine_kernel)
_write_launch = Launcher(_write_kv_kernel)


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Softmax attention of each row's query heads over its first lengths[b] keys, in fp32."""
    b, hq, _ = q.shape
    group = hq // k.shape[1]
    out = torch.empty_like(q)
    for i, n in enumerate(lengths.tolist()):
        n = min(int(n), k.shape[2])
        keys = k[i, :, :n].float().repeat_interleave(group, dim=0)  # (HQ, n, D)
        values = v[i, :, :n].float().repeat_interleave(group, dim=0)
        weights = (torch.einsum("hd,hnd->hn", q[i].float(), keys) * scale).softmax(dim=-1)
        out[i] = torch.einsum("hn,hnd->hd", weights, values).to(q.dtype)
    return out


def fill_table(table: torch.Tensor, buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Write into `table` (an int64 (layers, TABLE_COLUMNS) tensor on the buffers' device) where
    each layer's reserved keys and values lie: their addresses, head stride and capacity. The
    buffers are contiguous (1, H, CAP, D), one shape and dtype in all layers, each starting at a
    multiple of TABLE_ALIGN bytes (a whole allocation does), CAP * D a multiple of 16. A launch given the
    table reads them from it on the device, so launches captured once in a CUDA graph serve the
    buffers of every later answer whose table is filled (models.decode); the buffers must live
    while a launch reads them."""
    shape, dtype = buffers[0][0].shape, buffers[0][0].dtype
    if table.dtype != torch.int64 or table.shape != (len(buffers), TABLE_COLUMNS):
        raise ValueError(f"the table must be an int64 ({len(buffers)}, {TABLE_COLUMNS}) tensor, got "
                         f"{table.dtype} {tuple(table.shape)}")
    for pair in buffers:
        for t in pair:
            if (t.shape != shape or t.dtype != dtype or t.shape[0] != 1 or not t.is_contiguous()
                    or t.device != table.device):
                raise ValueError(f"the cache buffers must be contiguous (1, H, CAP, D) tensors of one shape, dtype and "
                                 f"the table's device, got {tuple(t.shape)} {t.dtype} on {t.device}")
    rows = [[k.data_ptr(), v.data_ptr(), k.stride(1), k.shape[2]] for k, v in buffers]
    if any(row[0] % TABLE_ALIGN or row[1] % TABLE_ALIGN for row in rows) or rows[0][2] % 16:
        raise ValueError(f"the cache buffers must start at multiples of {TABLE_ALIGN} bytes and their head stride be "
                         f"a multiple of 16 (whole allocations of a capacity of a multiple of 16), got {rows[0][2]}")
    return table.copy_(torch.tensor(rows, dtype=torch.int64))


def _table_has(table: torch.Tensor, layer: int) -> bool:
    """Whether `table` is a 2-D int64 table (`fill_table`) with a row `layer`."""
    return table.dtype == torch.int64 and table.dim() == 2 and 0 <= layer < table.shape[0]


def write_kv(key: torch.Tensor, value: torch.Tensor, index: torch.Tensor, table: torch.Tensor, layer: int) -> None:
    """Write one token's key and value, (1, H, 1, D) each, at position index[0] (a (1,) device
    tensor) of layer `layer`'s buffers in `table` (`fill_table`; buffers of key's dtype); a
    position past their capacity writes nothing. What `write_kv_reference` does, with the buffers'
    addresses read on the device."""
    if key.dim() != 4 or key.shape[0] != 1 or key.shape[2] != 1 or value.shape != key.shape:
        raise ValueError(f"key and value must be (1, H, 1, D), got {tuple(key.shape)}, {tuple(value.shape)}")
    if key.dtype not in _DTYPES or value.dtype != key.dtype or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError(f"key and value must share one of {_DTYPES} with a unit last stride, got {key.dtype}, "
                         f"{value.dtype}")
    if index.shape != (1,) or not _table_has(table, layer):
        raise ValueError(f"index must be (1,) and layer a row of the (layers, {TABLE_COLUMNS}) table, got "
                         f"{tuple(index.shape)}, {layer}, {tuple(table.shape)}")
    check_device("write_kv", key.device)
    if any(t.device != key.device for t in (value, index, table)):
        raise ValueError("key, value, index and table must be on one device")
    d = key.shape[-1]
    _write_launch[(key.shape[1],)](key, value, index, table, layer, key.stride(1), value.stride(1), D=d,
                                   BLOCK_D=triton.next_power_of_2(d), num_warps=1)


def write_kv_reference(key: torch.Tensor, value: torch.Tensor, index: torch.Tensor, keys: torch.Tensor,
                       values: torch.Tensor) -> None:
    """`write_kv` over the buffers themselves: index_copy at position index[0]."""
    keys.index_copy_(2, index, key)
    values.index_copy_(2, index, value)


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> None:
    """Raise ValueError / TypeError for inputs `decode_attention` does not take."""
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q must be (B, HQ, D) and k, v one (B, H, CAP, D) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or hq % k.shape[1]:
        raise ValueError(f"k, v {tuple(k.shape)} do not fit q {tuple(q.shape)}: same rows and head dim, query "
                         "heads a multiple of KV heads")
    if hq // k.shape[1] > MAX_GROUP or not 0 < d <= MAX_HEAD_DIM or k.shape[2] == 0:
        raise ValueError(f"up to {MAX_GROUP} query heads per KV head, head dims 1-{MAX_HEAD_DIM} and a cache of at "
                         f"least one position are supported, got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one of {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if lengths.shape != (b,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be a ({b},) int32 or int64 tensor, got {tuple(lengths.shape)} {lengths.dtype}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k and v must have a unit last stride")
    check_device("decode_attention", q.device)
    if any(t.device != q.device for t in (k, v, lengths)):
        raise ValueError("q, k, v and lengths must be on one device")


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def splits(capacity: int | None, programs_per_span: int, device: torch.device, split: int | None = None,
           block_n: int = BLOCK_N, programs_per_sm: int = PROGRAMS_PER_SM) -> tuple[int, int]:
    """(keys per span, spans) for a cache of `capacity` positions (None: any capacity, a cache read
    from a table) and `programs_per_span` (row, KV head) pairs. Default: about programs_per_sm
    programs per SM in all, no more spans than the capacity fills with MIN_SPLIT keys each, and keys
    per span 0: the launch divides each row's length between the spans on the device, in whole
    tiles of block_n keys, at least MIN_SPLIT (so spans past a short row's length end at once).
    `split` given (tests): that many keys per span, rounded up to whole tiles, over the capacity."""
    if split is not None:
        split = -(-split // block_n) * block_n
        return split, -(-capacity // split)
    sms = _sm_count(device.index) if device.type == "cuda" else 8
    spans = max(1, -(-programs_per_sm * sms // programs_per_span))
    return 0, spans if capacity is None else min(spans, -(-capacity // MIN_SPLIT))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float,
                     split: int | None = None, *, table: torch.Tensor | None = None, layer: int = 0,
                     block_n: int = BLOCK_N, programs_per_sm: int = PROGRAMS_PER_SM, num_warps: int = NUM_WARPS,
                     num_stages: int = NUM_STAGES, combine_dims: int = COMBINE_DIMS,
                     combine_spans: int = COMBINE_SPANS) -> torch.Tensor:
    """Attention of q (B, HQ, D) over the first lengths[b] positions of k / v (B, H, CAP, D), ->
    (B, HQ, D) (module docstring). split: keys per span (tests; default `splits`'s).
    table: read the cache of layer `layer` from this table (`fill_table`) instead: k and v then give
    only its heads, head dim, dtype and position stride (buffers laid out as the table's, batch 1)
    and, off CUDA, a bound on the span count; their addresses and capacity are not read. The other
    keyword-only arguments are the launch's tuning (benchmarks; defaults: the module's constants)."""
    check(q, k, v, lengths)
    b, hq, d = q.shape
    h, cap = k.shape[1], k.shape[2]
    group = hq // h
    if table is not None:
        if b != 1 or not _table_has(table, layer):
            raise ValueError(f"a cache read from a table takes one row and a layer of the (layers, {TABLE_COLUMNS}) "
                             f"int64 table, got {b} rows, layer {layer}, {table.dtype} {tuple(table.shape)}")
        if table.device != q.device or k.stride(2) != d or v.stride(2) != d:
            raise ValueError("a table's cache is contiguous (1, H, CAP, D) buffers on q's device")
        if k.data_ptr() % TABLE_ALIGN or v.data_ptr() % TABLE_ALIGN:
            raise ValueError(f"with a table, k and v must start at multiples of {TABLE_ALIGN} bytes")
    # With a table on CUDA, the span count of any capacity, so that a captured launch serves every later
    # cache; elsewhere nothing replays it, and the given k's capacity bounds the count (Triton's
    # interpreter pays for every program).
    capacity = None if table is not None and q.is_cuda else cap
    span, num_splits = splits(capacity, b * h, q.device, split, block_n, programs_per_sm)
    block_d = max(16, triton.next_power_of_2(d))
    part_o = torch.empty(b * hq * num_splits, block_d, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(b * hq * num_splits, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    upcast = interpreting() and q.dtype == torch.bfloat16
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"  # (the latter: unused for 16-bit inputs)
    _spans_launch[(b * h, num_splits)](
        q, k, v, lengths, table if table is not None else lengths, layer, part_o, part_ml, scale * LOG2E, h, span,
        cap, num_splits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=d, BLOCK_D=block_d, BLOCK_N=block_n,
        MIN_SPAN=MIN_SPLIT, FROM_TABLE=table is not None, PRECISION=precision, UPCAST=upcast, num_warps=num_warps,
        num_stages=num_stages,
    )
    dims = min(combine_dims, block_d)
    _combine_launch[(b * hq, block_d // dims)](
        part_o, part_ml, out, hq, num_splits, out.stride(0), out.stride(1), D=d, BLOCK_D=block_d, BLOCK_DC=dims,
        BLOCK_S=combine_spans, num_warps=4)
    return out
