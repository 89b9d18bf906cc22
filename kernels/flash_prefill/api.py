"""flash_prefill: validation, backend dispatch and the dense fallback.

Layout as flash-attn: q (B, Tq, HQ, D), k and v (B, Tk, H, D), HQ % H == 0, query head h reads
KV head h // (HQ // H). Tq <= Tk: the queries are the last Tq of the Tk key positions
(bottom-right causal alignment). Head dims 64, 80, 96, 128, 256; fp16 and bf16 on every
backend, fp32 on the reference backend. Strided views work without a copy on the Triton path.

Below `config.min_seq_len` attention is dense: on Hopper, where the Gluon kernel takes the call,
that kernel over every causal block (`DENSE_ON_HOPPER_KERNEL`; below `DENSE_FLASH_BELOW` keys, 0 by
default, one call of PyTorch's flash-attention kernel, `dense_flash`); elsewhere PyTorch SDPA
(`dense_attention`), but for queries shorter than their keys (a question over a cached prefix),
which run as one `dense_flash` call wherever that kernel takes them (`SHORT_QUERY_FLASH`).
A call that keeps every causal block by the rule of the last full blocks (a short question over a
cached prefix) runs as that dense attention too (`FULL_ROWS_DENSE`), at any length; a longer
question's queries in those blocks can run so apart from its earlier ones (`SPLIT_FULL_ROWS`, off).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..runtime import capability, flash_attention_takes
from ..runtime import interpreting as _interpreting
from .config import BlockSparsePattern, FlashPrefillConfig

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
BACKENDS = ("auto", "triton", "reference")
_TRITON_DTYPES = (torch.float16, torch.bfloat16)
_REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# SDPA backends for a query shorter than its keys (a decoding step, a question over a prompt's
# cached part): any but cuDNN. cuDNN builds an execution plan the first time it sees a shape, 53-65
# ms on an H200, and these calls come in new shapes (their key length grows), while they cost
# well under a millisecond on the other backends (BENCHMARKS.md, fourteenth session). A causal
# prefill (queries = keys) keeps SDPA's own choice: cuDNN is fastest there once its plan is built.
SHORT_QUERY_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# In `dense_attention`, a query shorter than its keys runs as one call of PyTorch's flash-attention
# kernel (`dense_flash`: grouped KV heads and bottom-right causal alignment as they are) wherever
# that kernel takes the call. Through SDPA it needs an explicit causal mask, which rules out the
# flash backend; on the H200 SDPA then ran it in fp32 matmuls and elementwise kernels. This is a
# question over a short video's cached prefix in the sparse mode (a prefix is mostly not a multiple
# of the block, so the Hopper kernel declines the call): its 28 layers went from 47 kernels a layer
# to 26, and a first question from a two-call prefill came 8-14 ms sooner (BENCHMARKS.md,
# twenty-second session, run 3). False: SDPA.
SHORT_QUERY_FLASH = True
# A call whose query blocks are all among the sequence's last `last_full_blocks` keeps every causal
# block (`FlashPrefillConfig.keeps_every_block`): a question of up to a block or two over a cached
# prefix, in the sparse mode. It runs as the dense attention it is, without the pattern stage; a
# query shorter than its keys as `dense_attention`'s one flash-attention call, whose work is split
# along the keys. Through the pattern stage and the sparse kernels, such a call is one work item
# per head walking every key block: 28 of the H200's 132 SMs for Qwen2.5-VL-7B. False: the
# pattern stage and the sparse kernels, as for any call.
FULL_ROWS_DENSE = True
# In `dense_attention`, a query of up to SPLIT_KV_MAX_QUERIES shorter than its keys runs as
# kernels.short_query_attention where its keys, counted once per 128 queries begun, reach
# SPLIT_KV_MIN_WORK: the query heads of a KV head read its keys and values together, split into
# spans that fill the GPU, where PyTorch's flash-attention kernel reads them once per query head
# (its GPU time grows with that count). On an H200 at the 7B shape (BENCHMARKS.md, thirty-fifth
# session) 16 queries over 131K keys take 96 us against 433, 256 queries 1.2 ms against 1.7. But it
# costs the host 30 us more a call (two launches), and a later question's prefill is host-bound
# below about 0.6 ms of GPU time a layer: there a later question's TTFT grew by 1-2.5 ms over 16K-64K
# prefixes (14 tokens) and 16K-32K (149 tokens), and fell by 3.6 ms over 64K (149 tokens) and
# 8.5 ms over 131K (149 tokens). False: `dense_flash` or SDPA, as below.
SPLIT_KV_SHORT_QUERIES = True
SPLIT_KV_MAX_QUERIES = 256
SPLIT_KV_MIN_WORK = 131072
# A call with queries both before and in the sequence's last full blocks (a question longer than a
# block or two, such as a multiple-choice prompt, over a cached prefix) can run in two parts: the
# earlier queries through the pattern stage and the sparse kernels over the keys before those
# blocks, the last ones as dense attention (`full_rows_apart`). The pattern and output are one
# call's. In one call the last full blocks' query blocks, one work item per head each walking every
# key block, take the sparse kernel's time, as a call all in them did before FULL_ROWS_DENSE (the
# dense call 1.75-6.8x faster there, BENCHMARKS.md thirty-third session). Off: on an H200 at the 7B
# shape, 150-300 queries over 131K keys, apart took 0.87-1.2 ms against 3.0 where the earlier
# queries keep few blocks, but 3.9-4.0 ms against 2.9 where they keep every block, and at 16K it
# was slower either way (BENCHMARKS.md, thirty-fifth session).
SPLIT_FULL_ROWS = False
# With SPLIT_FULL_ROWS on CUDA, the last queries' dense attention runs on a second stream beside the
# earlier queries' FlashPrefill, which may occupy few SMs: the call takes about the longer of the
# two, not their sum, where the earlier queries keep nearly every block. False: one after the other.
FULL_ROWS_ON_TWO_STREAMS = True

# The kernel modules, imported at their first use (each reads TRITON_INTERPRET when imported) and
# then looked up without an import statement's cost at every call.
@functools.cache
def _pattern_kernels():
    from . import pattern

    return pattern


@functools.cache
def _attention_kernels():
    from . import sparse_attention

    return sparse_attention


@functools.cache
def _short_query_kernels():
    from .. import short_query_attention

    return short_query_attention


@functools.cache
def _hopper_kernels():
    from . import sparse_attention_sm90

    return sparse_attention_sm90


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); got device {device}"
        )
    return backend


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> None:
    dtypes = _TRITON_DTYPES if backend == "triton" else _REFERENCE_DTYPES
    if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor):
        qs, ks = q.shape, k.shape  # (every check below at once, for a call that passes them all)
        if (len(qs) == 4 and len(ks) == 4 and ks == v.shape and 0 not in qs and 0 not in ks and qs[0] == ks[0]
                and qs[3] == ks[3] and qs[2] % ks[2] == 0 and qs[1] <= ks[1] and qs[3] in SUPPORTED_HEAD_DIMS
                and q.dtype in dtypes and k.dtype == q.dtype and v.dtype == q.dtype
                and q.device == k.device == v.device):
            return
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, tokens, heads, head_dim), got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch mismatch: q {tuple(q.shape)} vs k {tuple(k.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head dim mismatch: q {tuple(q.shape)} vs k {tuple(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]}): "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"Tq must not exceed Tk: q has {q.shape[1]} tokens, k has {k.shape[1]}")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[3]} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    if q.dtype not in dtypes:
        raise TypeError(f"dtype {q.dtype} is not supported by backend {backend!r}; supported: {dtypes}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense causal attention with bottom-right alignment through PyTorch SDPA, (B, Tq, HQ, D);
    a query shorter than its keys as kernels.short_query_attention (SPLIT_KV_SHORT_QUERIES),
    else as one flash-attention call where it fits (SHORT_QUERY_FLASH), else without SDPA's cuDNN
    backend (SHORT_QUERY_BACKENDS)."""
    tq, tk = q.shape[1], k.shape[1]
    if tq != tk and _split_kv_takes(q, k, v):
        return _short_query_kernels().short_query_attention(q, k, v, scale)
    if tq != tk and SHORT_QUERY_FLASH and _flash_call_fits(q, k, v):
        return dense_flash(q, k, v, scale)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    if tq == tk:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        with sdpa_kernel(SHORT_QUERY_BACKENDS):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def _split_kv_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `dense_attention` runs the call as kernels.short_query_attention: SPLIT_KV_SHORT_QUERIES,
    up to SPLIT_KV_MAX_QUERIES queries, keys x 128-query blocks at least SPLIT_KV_MIN_WORK, 16-bit floats
    on CUDA (or under Triton's interpreter), unit last strides, a head dim up to 256."""
    tq = q.shape[1]
    return (SPLIT_KV_SHORT_QUERIES and tq <= SPLIT_KV_MAX_QUERIES and k.shape[1] * -(-tq // 128) >= SPLIT_KV_MIN_WORK
            and q.dtype in _TRITON_DTYPES
            and (q.is_cuda or _interpreting()) and q.stride(3) == k.stride(3) == v.stride(3) == 1 and q.shape[3] <= 256)


def _causal_pattern(b: int, hq: int, tq: int, tk: int, bs: int, device: torch.device) -> BlockSparsePattern:
    nkb = math.ceil(tk / bs)
    first = (tk - tq) // bs
    nqb = nkb - first
    counts = (first + torch.arange(1, nqb + 1, device=device, dtype=torch.int32)).expand(b, hq, nqb).contiguous()
    ids = torch.arange(nkb, device=device, dtype=torch.int32).expand(b, hq, nqb, nkb).contiguous()
    return BlockSparsePattern(counts, ids, bs, tq, tk)


@functools.lru_cache(maxsize=1)
def _cached_causal_pattern(b: int, hq: int, tq: int, tk: int, bs: int, device: torch.device) -> BlockSparsePattern:
    # A forward's layers attend at one shape, so the dense fallback builds the pattern once per
    # forward, not once per layer. Only the kernel reads it; callers get their own copy.
    return _causal_pattern(b, hq, tq, tk, bs, device)


def _kernel_causal_pattern(b: int, hq: int, tq: int, tk: int, bs: int, device: torch.device) -> BlockSparsePattern:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # (memory of the graph's pool)
        return _causal_pattern(b, hq, tq, tk, bs, device)
    return _cached_causal_pattern(b, hq, tq, tk, bs, device)


@contextlib.contextmanager
def plain_pattern_launches():
    """Inside: the index build is a plain launch at every length, as past the pattern module's
    PDL_MAX_BLOCKS key blocks (its TRIGGER and PDL variants are other compiled kernels). A warm-up
    on a short prompt compiles the variants of long ones so. Not for concurrent requests: it sets
    a module flag."""
    pattern_kernels = _pattern_kernels()
    saved = pattern_kernels.PDL
    pattern_kernels.PDL = False
    try:
        yield
    finally:
        pattern_kernels.PDL = saved


@contextlib.contextmanager
def split_kv_at_every_length():
    """Inside: `dense_attention` runs every query it can as kernels.short_query_attention, whatever
    SPLIT_KV_MIN_WORK says (SPLIT_KV_SHORT_QUERIES on). A warm-up on a short prompt compiles the
    kernel a long prompt's question runs so. Not for concurrent requests: it sets a module flag."""
    global SPLIT_KV_MIN_WORK
    saved, SPLIT_KV_MIN_WORK = SPLIT_KV_MIN_WORK, 0
    try:
        yield
    finally:
        SPLIT_KV_MIN_WORK = saved


def _find_pattern_triton(
    q: torch.Tensor, k: torch.Tensor, config: FlashPrefillConfig, scale: float
) -> BlockSparsePattern:
    pattern_kernels = _pattern_kernels()
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    bs = config.block_size
    nkb = math.ceil(tk / bs)
    nqb = nkb - (tk - tq) // bs
    d_pad = triton_next_power_of_2(d)
    kv_indices = torch.empty(b, hq, nqb, nkb, dtype=torch.int32, device=q.device)
    kv_num_blocks = torch.empty(b, hq, nqb, dtype=torch.int32, device=q.device)
    upcast = _interpreting()
    dependent = pattern_kernels.dependent_launch(q.device, nkb)
    kbar = pattern_kernels.block_means(k, bs, d_pad, scale, torch.float32 if upcast else q.dtype, trigger=dependent)
    pattern_kernels.build_index(q, kbar, kv_indices, kv_num_blocks, config, tk, upcast, dependent=dependent)
    return BlockSparsePattern(kv_num_blocks, kv_indices, bs, tq, tk)


def triton_next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


# Hopper: the Gluon attention kernels (sparse_attention_sm90.py) where the call qualifies; 19-32%
# less time than the Triton one at 16K-128K tokens (BENCHMARKS.md). False forces the Triton kernel.
USE_HOPPER_KERNEL = True


# Below min_seq_len on Hopper: where the Gluon kernel takes the call, the dense attention runs as
# that kernel over every causal block, else through SDPA (dense_attention). SDPA's cuDNN backend,
# its choice there, builds an execution plan the first time it sees a length (40-80 ms on an
# H200), and a user's prompt length is mostly new. The 28 layers' attention at a new length took
# 2.6-35.9 ms this way against 40.5-78.4 ms through cuDNN at 1K-10K tokens; at a length cuDNN had
# planned, 0.70-0.85x its time at 1K-4K with the kernel's launches prepared (BENCHMARKS.md,
# twenty-first session, runs 7 and 9; `kernels.runtime.PREPARED_LAUNCHES`), where back-to-back
# calls were bound by host time before. False: SDPA, for a workload whose prompt lengths repeat
# (and no DENSE_FLASH_BELOW route either).
DENSE_ON_HOPPER_KERNEL = True


# Below this many key tokens, where the dense attention would run on the Hopper kernel, it runs as
# one call of PyTorch's flash-attention kernel instead (the kernel SDPA's flash backend runs, called
# directly; it takes grouped KV heads and bottom-right causal alignment as flash_prefill does). The
# flash call is bound by its GPU time: 58 us at 1K tokens, 80 at 1.3K, 106 at 1.5K, about twice
# the Hopper kernel's. It was 1152 while the Hopper kernel's calls were bound by host time (65-120
# us a call; twentieth session); with its launches prepared (39-71 us of host time a call by host)
# the Hopper kernel's 28 calls took 1.08-1.34 ms at 1040-1104 tokens against 1.72-1.73 ms for the
# flash call and 1.55 ms for cuDNN's planned call (BENCHMARKS.md, twenty-first session, run 7).
# 0: never.
DENSE_FLASH_BELOW = 0


def _flash_call_fits(q, k, v) -> bool:
    """Whether `dense_flash` takes the call: CUDA tensors of a 16-bit float type with a unit last
    stride, head dim a multiple of 8 up to 256, PyTorch's flash-attention kernel on the device."""
    return q.stride(3) == k.stride(3) == v.stride(3) == 1 and flash_attention_takes(q)


def _dense_on_flash_kernel(q, k, v) -> bool:
    """Whether the dense attention below min_seq_len runs as `dense_flash` (DENSE_FLASH_BELOW):
    Hopper and a call `dense_flash` takes."""
    return (DENSE_ON_HOPPER_KERNEL and k.shape[1] < DENSE_FLASH_BELOW and q.is_cuda
            and capability(q.device.index)[0] == 9 and _flash_call_fits(q, k, v))


def dense_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense causal attention with bottom-right alignment, (B, Tq, HQ, D), in one call of PyTorch's
    flash-attention kernel on (B, T, H, D) inputs as given (CUDA, 16-bit floats, unit last stride)."""
    return torch.ops.aten._flash_attention_forward(q, k, v, None, None, q.shape[1], k.shape[1], 0.0, True, False,
                                                   scale=scale)[0]


def _dense_on_hopper_kernel(q, k, v, block_size: int) -> bool:
    # (the kernel's checks include CUDA tensors: never under the interpreter)
    return DENSE_ON_HOPPER_KERNEL and USE_HOPPER_KERNEL and _hopper_kernels().supported(q, k, v, block_size)


def _sparse_attention_triton(
    q, k, v, pattern: BlockSparsePattern, scale: float, out: torch.Tensor | None = None,
    mean_correction: bool = False,
) -> torch.Tensor:
    attention_kernels, hopper_kernels = _attention_kernels(), _hopper_kernels()
    if USE_HOPPER_KERNEL and not _interpreting() and hopper_kernels.supported(q, k, v, pattern.block_size):
        return hopper_kernels.sparse_attention_sm90(
            q, k, v, pattern.kv_num_blocks, pattern.kv_indices, scale, out=out, mean_correction=mean_correction
        )
    return attention_kernels.sparse_attention(
        q, k, v, pattern.kv_num_blocks, pattern.kv_indices, pattern.block_size, scale,
        d_pad=triton_next_power_of_2(q.shape[3]), upcast=_interpreting(), out=out, mean_correction=mean_correction,
    )


def full_rows_dense(config: FlashPrefillConfig, q_len: int, kv_len: int) -> bool:
    """Whether `flash_prefill` runs a call of `q_len` queries over `kv_len` keys as dense attention
    because every query block of it keeps every causal block (`FULL_ROWS_DENSE`)."""
    return FULL_ROWS_DENSE and q_len < kv_len and config.keeps_every_block(q_len, kv_len)


def full_rows_apart(config: FlashPrefillConfig, q_len: int, kv_len: int) -> int:
    """How many of a call's last queries `flash_prefill` attends apart, as dense attention, because
    they lie in the last full blocks and the call's earlier queries do not (SPLIT_FULL_ROWS, a query
    shorter than its keys); 0 where it attends the call as one."""
    if not SPLIT_FULL_ROWS or q_len >= kv_len or config.runs_dense(kv_len):
        return 0
    rows = config.full_rows(q_len, kv_len)
    return rows if rows < q_len else 0


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _full_rows_apart(q, k, v, config: FlashPrefillConfig, scale: float, rows: int, return_pattern: bool):
    """`flash_prefill` (Triton backend) of a call whose last `rows` queries lie in the last full
    blocks and whose earlier ones do not. The earlier queries go through FlashPrefill over the keys
    before those blocks, which start on the block grid: their query blocks see the same key blocks
    whole and score them as in the whole call. Their own call has no last full blocks (the whole
    call's rule keeps none of theirs) and no `min_seq_len` (the whole call's length decided it). The
    last queries attend every causal key densely, on a second stream where FULL_ROWS_ON_TWO_STREAMS.
    The pattern is the two parts' together."""
    tq, tk = q.shape[1], k.shape[1]
    split = tq - rows
    early = dataclasses.replace(config, last_full_blocks=0, min_seq_len=0)
    two_streams = FULL_ROWS_ON_TWO_STREAMS and q.is_cuda and not torch.cuda.is_current_stream_capturing()
    if two_streams:
        main, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
        side.wait_stream(main)  # (q, k and v are written on the main stream)
    with torch.cuda.stream(side) if two_streams else contextlib.nullcontext():
        tail = dense_attention(q[:, split:], k, v, scale)
    head = flash_prefill(q[:, :split], k[:, : tk - rows], v[:, : tk - rows], config=early, scale=scale,
                         backend="triton", return_pattern=return_pattern)
    if two_streams:
        main.wait_stream(side)
        tail.record_stream(main)  # (made on the side stream, read and freed on the main one)
    if not return_pattern:
        return torch.cat([head, tail], dim=1)
    head, pattern = head
    b, hq, bs = q.shape[0], q.shape[2], config.block_size
    full = _causal_pattern(b, hq, rows, tk, bs, q.device)
    indices = F.pad(pattern.kv_indices, (0, full.kv_indices.shape[-1] - pattern.kv_indices.shape[-1]))
    merged = BlockSparsePattern(torch.cat([pattern.kv_num_blocks, full.kv_num_blocks], dim=2),
                                torch.cat([indices, full.kv_indices], dim=2), bs, tq, tk)
    return torch.cat([head, tail], dim=1), merged


def runs_dense(config: FlashPrefillConfig, q_len: int, kv_len: int) -> bool:
    """Whether `flash_prefill` attends such a call densely, over every causal block: below
    `min_seq_len`, or where `full_rows_dense`."""
    return config.runs_dense(kv_len) or full_rows_dense(config, q_len, kv_len)


def flash_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: FlashPrefillConfig | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_pattern: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, BlockSparsePattern]:
    """FlashPrefill block-sparse causal attention.

    q: (B, Tq, HQ, D); k, v: (B, Tk, H, D) with HQ % H == 0 (query head h uses KV head h // (HQ // H)).
    The queries are the last Tq of the Tk positions. Returns out (B, Tq, HQ, D) in q's dtype, and
    with return_pattern=True also the BlockSparsePattern used (all causal blocks where attention
    ran dense: below config.min_seq_len, or where every query block keeps them, `runs_dense`).
    On the Triton backend a call whose last queries lie in the last full blocks and whose earlier
    ones do not may run in two parts, to the same pattern and output (`full_rows_apart`).
    backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "reference" (PyTorch, any device),
    "auto" (triton on CUDA, reference elsewhere). An explicit backend never falls back.
    """
    config = config or FlashPrefillConfig()
    if not isinstance(config, FlashPrefillConfig):
        raise TypeError(f"config must be a FlashPrefillConfig, got {type(config).__name__}")
    backend = _resolve_backend(backend, q.device if isinstance(q, torch.Tensor) else torch.device("cpu"))
    _check(q, k, v, backend)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    b, tq, hq, _ = q.shape
    tk = k.shape[1]
    bs = config.block_size

    every_block = full_rows_dense(config, tq, tk)
    if config.runs_dense(tk) or every_block:
        pattern = None
        if backend == "reference":
            from . import reference

            pattern = reference.causal_pattern(b, hq, tq, tk, bs, q.device)
            out = reference.sparse_attention(q, k, v, pattern, scale)
        elif _dense_on_flash_kernel(q, k, v):
            out = dense_flash(q, k, v, scale)
        elif not every_block and _dense_on_hopper_kernel(q, k, v, bs):
            causal = _kernel_causal_pattern(b, hq, tq, tk, bs, q.device)
            out = _hopper_kernels().sparse_attention_sm90(q, k, v, causal.kv_num_blocks, causal.kv_indices, scale)
        else:
            out = dense_attention(q, k, v, scale)
        if not return_pattern:
            return out
        return out, pattern or _causal_pattern(b, hq, tq, tk, bs, q.device)  # (the caller's own copy)

    rows = full_rows_apart(config, tq, tk) if backend == "triton" else 0
    if rows:
        return _full_rows_apart(q, k, v, config, scale, rows, return_pattern)
    pattern = _find(q, k, config, scale, backend)
    out = _attend(q, k, v, pattern, scale, backend, config.mean_correction)
    return (out, pattern) if return_pattern else out


def _find(q, k, config: FlashPrefillConfig, scale: float, backend: str) -> BlockSparsePattern:
    if backend == "reference":
        from . import reference

        return reference.find_pattern(q, k, config, scale)
    return _find_pattern_triton(q, k, config, scale)


def _attend(q, k, v, pattern: BlockSparsePattern, scale: float, backend: str,
            mean_correction: bool = False) -> torch.Tensor:
    if backend == "reference":
        from . import reference

        return reference.sparse_attention(q, k, v, pattern, scale, mean_correction=mean_correction)
    return _sparse_attention_triton(q, k, v, pattern, scale, mean_correction=mean_correction)


def find_pattern(
    q: torch.Tensor, k: torch.Tensor, config: FlashPrefillConfig | None = None, scale: float | None = None,
    backend: str = "auto",
) -> BlockSparsePattern:
    """Pattern discovery and selection alone (DESIGN.md steps 1-3), whatever the key length."""
    backend = _resolve_backend(backend, q.device)
    _check(q, k, k, backend)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _find(q, k, config or FlashPrefillConfig(), scale, backend)


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern, scale: float | None = None,
    backend: str = "auto", mean_correction: bool = False,
) -> torch.Tensor:
    """Attention over the blocks of a given pattern (DESIGN.md step 4), token-causal; (B, Tq, HQ, D).
    mean_correction: also the pruned blocks as mean tokens (FlashPrefillConfig.mean_correction)."""
    backend = _resolve_backend(backend, q.device)
    _check(q, k, v, backend)
    b, tq, hq, _ = q.shape
    nkb = math.ceil(k.shape[1] / pattern.block_size)
    want = (b, hq, nkb - (k.shape[1] - tq) // pattern.block_size, nkb)
    if tuple(pattern.kv_indices.shape) != want or (pattern.q_len, pattern.kv_len) != (tq, k.shape[1]):
        raise ValueError(f"pattern {pattern!r} does not fit q {tuple(q.shape)} and k {tuple(k.shape)}: "
                         f"expected indices of shape {want}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attend(q, k, v, pattern, scale, backend, mean_correction)


def flash_prefill_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    config: FlashPrefillConfig | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_pattern: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[BlockSparsePattern]]:
    """Packed variable-length FlashPrefill: q (total_q, HQ, D), k/v (total_k, H, D).

    Sequence i holds rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and cu_seqlens_k[i]:cu_seqlens_k[i+1]
    of k/v, with its queries the last positions of its keys. Each sequence runs as its own
    flash_prefill call (the offsets are read on the host once). Returns (total_q, HQ, D) and,
    with return_pattern=True, one pattern per sequence.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"varlen {name} must be 3-D (total_tokens, heads, head_dim), got {shape}")
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    if len(cq) != len(ck) or len(cq) < 2:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length >= 2, got {len(cq)} and {len(ck)}")
    if cq[0] != 0 or ck[0] != 0 or cq[-1] != q.shape[0] or ck[-1] != k.shape[0]:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the token counts: q {cq[0]}..{cq[-1]} vs {q.shape[0]}, "
            f"k {ck[0]}..{ck[-1]} vs {k.shape[0]}"
        )
    lens_q = [b - a for a, b in zip(cq, cq[1:])]
    lens_k = [b - a for a, b in zip(ck, ck[1:])]
    if max(lens_q) > max_seqlen_q or max(lens_k) > max_seqlen_k:
        raise ValueError(
            f"max_seqlen_q/k ({max_seqlen_q}, {max_seqlen_k}) below the longest sequence ({max(lens_q)}, {max(lens_k)})"
        )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    patterns = []
    for i in range(len(cq) - 1):
        if lens_q[i] == 0:
            continue
        o = flash_prefill(
            q[None, cq[i] : cq[i + 1]], k[None, ck[i] : ck[i + 1]], v[None, ck[i] : ck[i + 1]],
            config=config, scale=scale, backend=backend, return_pattern=return_pattern,
        )
        if return_pattern:
            o, pattern = o
            patterns.append(pattern)
        out[cq[i] : cq[i + 1]] = o[0]
    return (out, patterns) if return_pattern else out
