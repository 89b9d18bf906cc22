"""FlashPrefill Triton kernels at realistic sizes on the GPU (skipped without CUDA)."""

from __future__ import annotations

import collections

import pytest
import torch

from kernels import FlashPrefillConfig, dense_attention, flash_prefill, runtime
from kernels.flash_prefill import api, reference
from kernels.testing import check_pattern_layout, max_abs_error, structured_qkv, unexplained_flips

pytestmark = pytest.mark.cuda

# (tokens, query heads, kv heads, head dim): Qwen2.5-VL-7B is 28/4 heads, head dim 128.
SHAPES = [(8192, 28, 4, 128), (16384, 28, 4, 128), (32768, 28, 4, 128), (16384, 28, 4, 80), (8192, 14, 2, 64)]


def shape_id(shape) -> str:
    t, hq, h, d = shape
    return f"T{t}-HQ{hq}-H{h}-D{d}-bf16"


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_triton_matches_reference_at_scale(shape):
    t, hq, h, d = shape
    cfg = FlashPrefillConfig(alpha=0.1, min_seq_len=0)
    q, k, v = structured_qkv(1, t, t, hq, h, d, cfg.block_size, dtype=torch.bfloat16, device="cuda")
    scale = d**-0.5
    out, pattern = flash_prefill(q, k, v, config=cfg, backend="triton", return_pattern=True)
    torch.cuda.synchronize()
    check_pattern_layout(pattern)

    kbar = reference.block_means(k, cfg.block_size, torch.float64)
    scores = reference.block_scores(q, kbar, cfg.block_size, t, scale)
    ref_pattern = reference.select_blocks(scores, cfg, t, t)
    flips, unexplained = unexplained_flips(pattern, ref_pattern, scores, cfg, log_tol=0.1)
    assert unexplained == 0, f"{unexplained} of {flips} flips are not near the threshold"
    assert flips <= 0.005 * ref_pattern.to_dense().sum().item()
    assert pattern.density() < 0.8, "the structured input should make the pattern sparse"

    # Same pattern: the attention kernel against fp32 and against the bf16 computation.
    exact = reference.sparse_attention(q.float(), k.float(), v.float(), pattern, scale, torch.float32)
    low = reference.sparse_attention(q, k, v, pattern, scale, compute_dtype=None)
    assert max_abs_error(out, exact) <= 2 * max_abs_error(low, exact) + 1e-3


@pytest.mark.parametrize("t", [4096, 20000])
def test_alpha_zero_equals_sdpa_on_gpu(t):
    cfg = FlashPrefillConfig(alpha=0.0, min_seq_len=0)
    q, k, v = structured_qkv(1, t, t, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    out = flash_prefill(q, k, v, config=cfg, backend="triton")
    exact = dense_attention(q.float(), k.float(), v.float(), 128**-0.5)
    low = dense_attention(q, k, v, 128**-0.5)
    assert max_abs_error(out, exact) <= 2 * max_abs_error(low, exact) + 1e-3


def test_chunk_with_cached_prefix_on_gpu():
    cfg = FlashPrefillConfig(alpha=0.1, min_seq_len=0)
    q, k, v = structured_qkv(1, 12288, 12288, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    full, full_pattern = flash_prefill(q, k, v, config=cfg, return_pattern=True)
    prefix = 8192
    chunk, chunk_pattern = flash_prefill(q[:, prefix:], k, v, config=cfg, return_pattern=True)
    assert torch.equal(chunk_pattern.to_dense(), full_pattern.to_dense()[:, :, prefix // 128 :])
    torch.testing.assert_close(chunk, full[:, prefix:], atol=0, rtol=0)


def test_transformers_layout_without_copy_on_gpu():
    q, k, v = structured_qkv(2, 9000, 9000, 28, 4, 128, 128, dtype=torch.float16, device="cuda")
    cfg = FlashPrefillConfig(min_seq_len=0)
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    torch.testing.assert_close(flash_prefill(*views, config=cfg), flash_prefill(q, k, v, config=cfg), atol=0, rtol=0)


@pytest.mark.parametrize("q_len", [12288, 200])  # a prefill; a question over a cached prefix
def test_keys_and_values_leading_longer_buffers_on_gpu(q_len):
    """K and V as the leading positions of (B, H, capacity, D) buffers, as a KV cache with room holds
    them (models.cache), transposed as transformers passes them: the output and the blocks of the
    same tensors given contiguous, on the default route (the Hopper kernel on an H200) and the
    dense flash-attention call."""
    cfg = FlashPrefillConfig(alpha=0.1, min_seq_len=0)
    t = 12288
    q, k, v = structured_qkv(1, q_len, t, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    held = []
    for x in (k, v):
        buffer = torch.full((1, 4, t + 576, 128), float("nan"), dtype=x.dtype, device="cuda")
        buffer[:, :, :t] = x.transpose(1, 2)
        held.append(buffer[:, :, :t].transpose(1, 2))
    assert held[0].stride(2) == (t + 576) * 128
    out, pattern = flash_prefill(q, *held, config=cfg, return_pattern=True)
    expected, expected_pattern = flash_prefill(q, k, v, config=cfg, return_pattern=True)
    assert torch.equal(pattern.to_dense(), expected_pattern.to_dense())
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(dense_attention(q, *held, 128**-0.5), dense_attention(q, k, v, 128**-0.5), atol=0,
                               rtol=0)


def test_no_host_sync_in_sparse_path():
    """Pattern discovery, selection and attention launch without waiting for the GPU."""
    q, k, v = structured_qkv(1, 16384, 16384, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    cfg = FlashPrefillConfig(min_seq_len=0)
    flash_prefill(q, k, v, config=cfg)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pattern = api._find_pattern_triton(q, k, cfg, 128**-0.5)
        api._sparse_attention_triton(q, k, v, pattern, 128**-0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("tma", [0, 1, 2], ids=["pointers", "kv-descriptors", "qkvo-descriptors"])
@pytest.mark.parametrize("q_len", [9000, 5000, 4904], ids=["Tq=Tk", "prefix-4000", "prefix-4096"])
@pytest.mark.parametrize("head_dim", [128, 80])
def test_every_load_path_matches_reference(tma, q_len, head_dim):
    """K = 9000 keys; a prefix of 4000 keys starts the first query tile before row 0."""
    from kernels.flash_prefill import sparse_attention as attention_kernels

    tk = 9000
    cfg = FlashPrefillConfig(alpha=0.1, min_seq_len=0)
    q, k, v = structured_qkv(1, q_len, tk, 28, 4, head_dim, 128, dtype=torch.bfloat16, device="cuda")
    scale = head_dim**-0.5
    pattern = api._find_pattern_triton(q, k, cfg, scale)
    exact = reference.sparse_attention(q.float(), k.float(), v.float(), pattern, scale, torch.float32)
    low = reference.sparse_attention(q, k, v, pattern, scale, compute_dtype=None)
    for group_order in (False, True):
        out = torch.full(q.shape, float("nan"), dtype=q.dtype, device="cuda")
        attention_kernels.sparse_attention(
            q, k, v, pattern.kv_num_blocks, pattern.kv_indices, 128, scale, d_pad=128, upcast=False, out=out,
            tma=tma, group_order=group_order,
        )
        assert not torch.isnan(out).any(), "some output rows were never written"
        assert max_abs_error(out, exact) <= 2 * max_abs_error(low, exact) + 1e-3


def test_flash_prefill_replays_in_a_cuda_graph():
    """The whole sparse path (pattern, selection, attention) captures into one CUDA graph."""
    cfg = FlashPrefillConfig(min_seq_len=0)
    q, k, v = structured_qkv(1, 16384, 16384, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    static = [x.clone() for x in (q, k, v)]
    flash_prefill(*static, config=cfg)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = flash_prefill(*static, config=cfg)
    q2, k2, v2 = structured_qkv(1, 16384, 16384, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda", seed=3)
    for dst, src in zip(static, (q2, k2, v2)):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, flash_prefill(q2, k2, v2, config=cfg), atol=0, rtol=0)


def test_per_kv_head_pattern_at_scale():
    """One pattern per KV head on the GPU: same blocks for a group, flips only near the threshold."""
    t = 16384
    cfg = FlashPrefillConfig(alpha=0.1, min_seq_len=0, pattern_per_kv_head=True)
    q, k, v = structured_qkv(1, t, t, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    out, pattern = flash_prefill(q, k, v, config=cfg, return_pattern=True)
    check_pattern_layout(pattern)
    kbar = reference.block_means(k, cfg.block_size, torch.float64)
    scores = reference.group_scores(reference.block_scores(q, kbar, cfg.block_size, t, 128**-0.5), 4)
    ref_pattern = reference.select_blocks(scores, cfg, t, t)
    flips, unexplained = unexplained_flips(pattern, ref_pattern, scores, cfg, log_tol=0.1)
    assert unexplained == 0, f"{unexplained} of {flips} flips are not near the threshold"
    keep = pattern.to_dense().view(1, 4, 7, *pattern.kv_indices.shape[2:])
    assert torch.equal(keep, keep[:, :, :1].expand_as(keep))
    exact = reference.sparse_attention(q.float(), k.float(), v.float(), pattern, 128**-0.5, torch.float32)
    low = reference.sparse_attention(q, k, v, pattern, 128**-0.5, compute_dtype=None)
    assert max_abs_error(out, exact) <= 2 * max_abs_error(low, exact) + 1e-3


def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


requires_hopper = pytest.mark.skipif(not _is_hopper(), reason="the Gluon attention kernel targets Hopper (sm_90)")


@requires_hopper
@pytest.mark.parametrize(
    "stages,warp_specialized,dynamic", [(3, True, True), (2, True, True), (3, True, False), (3, False, True)],
    ids=["ws-3-slots", "ws-2-slots", "ws-round-robin", "per-tile-3-slots"],
)
@pytest.mark.parametrize("q_len", [9000, 4904], ids=["Tq=Tk", "prefix-4096"])
@pytest.mark.parametrize("head_dim,dtype", [(128, torch.bfloat16), (80, torch.bfloat16), (64, torch.float16)])
def test_hopper_kernel_matches_reference(stages, warp_specialized, dynamic, q_len, head_dim, dtype):
    """The Gluon kernels on selected patterns (rows keeping one block up to most of them), both
    launch orders, against fp32 and the same computation in 16-bit floats."""
    from kernels.flash_prefill import sparse_attention_sm90 as hopper_kernels

    tk = 9000
    cfg = FlashPrefillConfig(alpha=0.1, min_seq_len=0)
    q, k, v = structured_qkv(2, q_len, tk, 28, 4, head_dim, 128, dtype=dtype, device="cuda")
    scale = head_dim**-0.5
    assert hopper_kernels.supported(q, k, v, 128)
    pattern = api._find_pattern_triton(q, k, cfg, scale)
    if q_len == tk:
        assert pattern.kv_num_blocks.min().item() == 1, "the first row keeps only its diagonal block"
    exact = reference.sparse_attention(q.float(), k.float(), v.float(), pattern, scale, torch.float32)
    low = reference.sparse_attention(q, k, v, pattern, scale, compute_dtype=None)
    for group_order in (False, True):
        out = torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")
        hopper_kernels.sparse_attention_sm90(
            q, k, v, pattern.kv_num_blocks, pattern.kv_indices, scale, out=out, group_order=group_order,
            stages=stages, warp_specialized=warp_specialized, dynamic=dynamic,
        )
        assert not torch.isnan(out).any(), "some output rows were never written"
        assert max_abs_error(out, exact) <= 2 * max_abs_error(low, exact) + 1e-3


@requires_hopper
@pytest.mark.parametrize("q_len", [4000, 2848], ids=["Tq=Tk", "prefix-1152"])
def test_hopper_kernel_with_and_without_the_diagonal_block(q_len):
    """Rows whose last kept block is their own (the one the kernel masks) and rows that leave it
    out (nothing to mask), keeping one block or several, against the reference."""
    from kernels.flash_prefill import sparse_attention_sm90 as hopper_kernels
    from kernels.flash_prefill.config import BlockSparsePattern

    tk, hq, bs = 4000, 28, 128
    q, k, v = structured_qkv(1, q_len, tk, hq, 4, 128, bs, dtype=torch.bfloat16, device="cuda")
    nkb = -(-tk // bs)
    first = (tk - q_len) // bs
    g = torch.Generator(device="cuda").manual_seed(3)
    query_block = first + torch.arange(nkb - first, device="cuda")[:, None]
    key_block = torch.arange(nkb, device="cuda")[None, :]
    keep = (torch.rand(1, hq, nkb - first, nkb, generator=g, device="cuda") < 0.1) & (key_block < query_block)
    kind = torch.arange(hq * (nkb - first), device="cuda").view(1, hq, -1) % 4
    diagonal = key_block == query_block
    keep = torch.where((kind == 0)[..., None], keep | diagonal, keep)  # several blocks, the diagonal last
    keep = torch.where((kind == 1)[..., None], diagonal.expand_as(keep), keep)  # the diagonal alone
    lone = torch.zeros_like(keep)
    lone[..., 0] = True
    keep = torch.where((kind == 2)[..., None], lone, keep)  # block 0 alone (the diagonal in row 0)
    keep = torch.where((kind == 3)[..., None] & ~keep.any(-1, keepdim=True), lone, keep)  # without the diagonal
    pattern = BlockSparsePattern.from_dense(keep, bs, q_len, tk)
    without = (pattern.kv_indices.gather(-1, (pattern.kv_num_blocks - 1).long()[..., None])[..., 0]
               != query_block[:, 0])
    assert without.any() and (~without).any() and (pattern.kv_num_blocks == 1).any()
    scale = 128**-0.5
    exact = reference.sparse_attention(q.float(), k.float(), v.float(), pattern, scale, torch.float32)
    low = reference.sparse_attention(q, k, v, pattern, scale, compute_dtype=None)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device="cuda")
    hopper_kernels.sparse_attention_sm90(q, k, v, pattern.kv_num_blocks, pattern.kv_indices, scale, out=out)
    assert not torch.isnan(out).any(), "some output rows were never written"
    assert max_abs_error(out, exact) <= 2 * max_abs_error(low, exact) + 1e-3


@requires_hopper
def test_hopper_kernel_declines_what_it_cannot_run():
    """Calls outside the Gluon kernel's cases are reported unsupported (api then runs the Triton kernel)."""
    from kernels.flash_prefill import sparse_attention_sm90 as hopper_kernels

    q, k, v = structured_qkv(1, 4096, 4096, 8, 2, 128, 128, dtype=torch.bfloat16, device="cuda")
    assert hopper_kernels.supported(q, k, v, 128)
    assert not hopper_kernels.supported(q[:, 100:], k, v, 128), "prefix of 100 keys: first tile off row 0"
    assert not hopper_kernels.supported(q, k, v, 64), "block size 64"
    assert not hopper_kernels.supported(q.float(), k.float(), v.float(), 128), "fp32"
    q256, k256, v256 = structured_qkv(1, 4096, 4096, 8, 2, 256, 128, dtype=torch.bfloat16, device="cuda")
    assert not hopper_kernels.supported(q256, k256, v256, 128), "head dim 256"
    assert not hopper_kernels.supported(q.cpu(), k.cpu(), v.cpu(), 128), "CPU tensors"


@requires_hopper
@pytest.mark.parametrize("route", ["default", "hopper-kernel", "flash-call"])
@pytest.mark.parametrize("t", [1000, 4096, 9001])
def test_dense_fallback_matches_sdpa(monkeypatch, route, t):
    """Below min_seq_len (the default), the dense attention without SDPA, on the route
    api.DENSE_FLASH_BELOW picks (the flash-attention call below it, the Hopper kernel over every
    causal block from it) and on each route forced, is as close to fp32 attention as SDPA's bf16
    result, at lengths on and off the block grid."""
    from kernels.flash_prefill import sparse_attention_sm90 as hopper_kernels

    q, k, v = structured_qkv(1, t, t, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    exact = dense_attention(q.float(), k.float(), v.float(), 128**-0.5)
    low = dense_attention(q, k, v, 128**-0.5)
    if route != "default":
        monkeypatch.setattr(api, "DENSE_FLASH_BELOW", 0 if route == "hopper-kernel" else 2**30)
    flash = t < api.DENSE_FLASH_BELOW
    ran = []

    def recorded(name, fn):
        return lambda *args, **kwargs: (ran.append(name), fn(*args, **kwargs))[1]

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA ran below min_seq_len on Hopper")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    monkeypatch.setattr(api, "dense_flash", recorded("flash", api.dense_flash))
    kernel = hopper_kernels.sparse_attention_sm90
    monkeypatch.setattr(hopper_kernels, "sparse_attention_sm90", recorded("hopper", kernel))
    out, pattern = flash_prefill(q, k, v, config=FlashPrefillConfig(), return_pattern=True)
    assert t < FlashPrefillConfig().min_seq_len and pattern.density() == 1.0
    assert ran == ["flash" if flash else "hopper"]
    assert max_abs_error(out, exact) <= 2 * max_abs_error(low, exact) + 1e-3


@requires_hopper
@pytest.mark.parametrize("head_dim,dtype", [(128, torch.bfloat16), (80, torch.bfloat16), (64, torch.float16),
                                            (256, torch.bfloat16)])
@pytest.mark.parametrize("q_len", [1200, 700, 1], ids=["Tq=Tk", "prefix-500", "one-query"])
def test_dense_flash_call_matches_reference(monkeypatch, head_dim, dtype, q_len):
    """The flash-attention call on grouped KV heads, queries the last of the keys (bottom-right
    causal), inputs in the (B, H, T, D) memory order transformers hands over, against fp32; the
    route takes such inputs (its length threshold lifted here)."""
    tk = 1200
    q, k, v = structured_qkv(2, q_len, tk, 28, 4, head_dim, 128, dtype=dtype, device="cuda")
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    monkeypatch.setattr(api, "DENSE_FLASH_BELOW", 2**30)
    assert api._dense_on_flash_kernel(q, k, v)
    causal, scale = reference.causal_pattern(2, 28, q_len, tk, 128, q.device), head_dim**-0.5
    exact = reference.sparse_attention(q.float(), k.float(), v.float(), causal, scale, torch.float32)
    low = reference.sparse_attention(q, k, v, causal, scale, compute_dtype=None)  # (the same in 16-bit floats)
    out = api.dense_flash(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert max_abs_error(out, exact) <= 2 * max_abs_error(low, exact) + 1e-3


@pytest.mark.skipif(not (torch.cuda.is_available() and runtime.flash_attention_available(torch.device("cuda", 0))),
                    reason="PyTorch's flash-attention kernel needs an NVIDIA GPU of sm_80 or later")
@pytest.mark.parametrize("q_len,tk", [(37, 2100), (1, 4126), (300, 1000)])
@pytest.mark.parametrize("short_query_flash", [True, False], ids=["flash-call", "sdpa"])
def test_question_over_a_prefix_below_min_seq_len(monkeypatch, q_len, tk, short_query_flash):
    """Below min_seq_len, a query shorter than its keys at an offset off the block grid (a question
    over a cached prefix, which the Hopper kernel declines) is one flash-attention call and no SDPA
    call, as close to fp32 attention as the bf16 computation; with SHORT_QUERY_FLASH off, SDPA's."""
    q, k, v = structured_qkv(1, q_len, tk, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))  # as transformers hands them
    causal, scale = reference.causal_pattern(1, 28, q_len, tk, 128, q.device), 128**-0.5
    exact = reference.sparse_attention(q.float(), k.float(), v.float(), causal, scale, torch.float32)
    low = reference.sparse_attention(q, k, v, causal, scale, compute_dtype=None)
    calls = collections.Counter()

    def counted(name, fn):
        return lambda *args, **kwargs: (calls.update([name]), fn(*args, **kwargs))[1]

    monkeypatch.setattr(api, "SHORT_QUERY_FLASH", short_query_flash)
    monkeypatch.setattr(api, "dense_flash", counted("flash", api.dense_flash))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        counted("sdpa", torch.nn.functional.scaled_dot_product_attention))
    out = flash_prefill(q, k, v, config=FlashPrefillConfig())
    assert tk < FlashPrefillConfig().min_seq_len
    assert calls == ({"flash": 1} if short_query_flash else {"sdpa": 1})
    assert out.shape == q.shape and out.dtype == q.dtype
    assert max_abs_error(out, exact) <= 2 * max_abs_error(low, exact) + 1e-3


@requires_hopper
def test_hopper_work_counter_is_left_at_zero_on_every_stream():
    """The dynamic schedule's counter is not zeroed per call: each launch must leave it at zero,
    so back-to-back launches on one stream and launches on another stream all cover every item."""
    from kernels.flash_prefill import sparse_attention_sm90 as hopper_kernels

    q, k, v = structured_qkv(1, 8192, 8192, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    pattern = api._find_pattern_triton(q, k, FlashPrefillConfig(min_seq_len=0), 128**-0.5)
    exact = reference.sparse_attention(q.float(), k.float(), v.float(), pattern, 128**-0.5, torch.float32)
    bound = 2 * max_abs_error(reference.sparse_attention(q, k, v, pattern, 128**-0.5, compute_dtype=None), exact)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()  # inputs and pattern ready before the side stream reads them
    for stream in (torch.cuda.current_stream(), side, torch.cuda.current_stream()):
        with torch.cuda.stream(stream):
            for _ in range(3):
                out = torch.full_like(q, float("nan"))
                hopper_kernels.sparse_attention_sm90(q, k, v, pattern.kv_num_blocks, pattern.kv_indices,
                                                     128**-0.5, out=out)
                counter = hopper_kernels._work_counter(q.device)
                stream.synchronize()
                assert counter.tolist() == [0, 0]
                assert not torch.isnan(out).any(), "some work items were never run"
                assert max_abs_error(out, exact) <= bound + 1e-3


@requires_hopper
def test_hopper_trace_records_ordered_stamps_without_changing_the_output():
    """The profiling hook (scripts/gpu_trace_sm90.py) stamps each traced item's phases in order,
    records its kept count and leaves the output as the untraced kernel writes it."""
    from kernels.flash_prefill import sparse_attention_sm90 as hopper_kernels

    q, k, v = structured_qkv(1, 4096, 4096, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    pattern = api._find_pattern_triton(q, k, FlashPrefillConfig(min_seq_len=0), 128**-0.5)
    args = (q, k, v, pattern.kv_num_blocks, pattern.kv_indices, 128**-0.5)
    plain = hopper_kernels.sparse_attention_sm90(*args)
    programs = min(pattern.kv_num_blocks.numel(), torch.cuda.get_device_properties(0).multi_processor_count)
    trace = torch.zeros(programs, 8, 16, dtype=torch.int64, device="cuda")
    traced = hopper_kernels.sparse_attention_sm90(*args, trace=trace)
    assert torch.equal(traced, plain)
    trace = trace.cpu()
    items = trace[:, :, 0] > 0
    assert items[:, 0].all(), "every program runs at least one item"
    stamps = trace[items][:, [0, 1, 2, 3, 4, 5, 6]]
    assert (stamps.diff(dim=1) >= 0).all(), "consumer phases out of order"
    producer = trace[items][:, [8, 9, 10]]
    assert (producer.diff(dim=1) >= 0).all(), "producer phases out of order"
    kept = trace[items][:, 7]
    assert kept.min() >= 1 and kept.max() <= pattern.kv_num_blocks.max().item()
    with pytest.raises(ValueError, match="trace must be"):
        hopper_kernels.sparse_attention_sm90(*args, trace=torch.zeros(programs, 8, 15, dtype=torch.int64,
                                                                      device="cuda"))
    with pytest.raises(ValueError, match="warp-specialised kernel only"):
        hopper_kernels.sparse_attention_sm90(*args, trace=trace.cuda(), warp_specialized=False)
    with pytest.raises(ValueError, match="warp-specialised kernel only"):
        hopper_kernels.sparse_attention_sm90(*args, mean_correction=True, warp_specialized=False)


class _CountingKernel:
    """Stands in for a jit kernel inside a Launcher, counting Triton's launches."""

    def __init__(self, kernel):
        self.kernel, self.arg_names, self.launches = kernel, kernel.arg_names, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@requires_hopper
def test_direct_launches_match_tritons_launch(monkeypatch):
    """After its first call at a shape, flash_prefill's kernels (block means, index build, Hopper
    attention) launch without Triton's launch path, with the same results as through it."""
    from kernels.flash_prefill import pattern as pattern_kernels
    from kernels.flash_prefill import sparse_attention_sm90 as hopper_kernels

    config = FlashPrefillConfig(min_seq_len=0)
    q, k, v = structured_qkv(1, 8192, 8192, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    flash_prefill(q, k, v, config=config)  # compiled, and seen once by each launcher
    launchers = [pattern_kernels._block_means_launch, pattern_kernels._index_launch,
                 hopper_kernels._sparse_attention_sm90_ws_launch]
    counting = [_CountingKernel(launcher.kernel) for launcher in launchers]
    for launcher, kernel in zip(launchers, counting):
        monkeypatch.setattr(launcher, "kernel", kernel)
    q2, k2, v2 = (x.clone() for x in (q, k, v))  # other tensors, the same specialisation
    direct, direct_pattern = flash_prefill(q2, k2, v2, config=config, return_pattern=True)
    assert [kernel.launches for kernel in counting] == [0, 0, 0]
    monkeypatch.setattr(runtime, "DIRECT_LAUNCH", False)
    through, through_pattern = flash_prefill(q2, k2, v2, config=config, return_pattern=True)
    assert [kernel.launches for kernel in counting] == [1, 1, 1]
    counts = direct_pattern.kv_num_blocks
    assert torch.equal(counts, through_pattern.kv_num_blocks)
    listed = torch.arange(counts.shape[-1], device="cuda") < counts[..., None]  # (entries past a count are unset)
    assert torch.equal(direct_pattern.kv_indices[listed], through_pattern.kv_indices[listed])
    assert torch.equal(direct, through)


@requires_hopper
def test_hopper_kernel_with_misaligned_block_lists():
    """Block lists that start off a 16-byte boundary are a specialisation of their own (Triton
    compiles the kernel without the alignment): launched directly after, results unchanged."""
    from kernels.flash_prefill import sparse_attention_sm90 as hopper_kernels

    q, k, v = structured_qkv(1, 4096, 4096, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    pattern = api._find_pattern_triton(q, k, FlashPrefillConfig(min_seq_len=0), 128**-0.5)
    aligned = hopper_kernels.sparse_attention_sm90(q, k, v, pattern.kv_num_blocks, pattern.kv_indices, 128**-0.5)
    counts = torch.empty(pattern.kv_num_blocks.numel() + 1, dtype=torch.int32, device="cuda")
    counts[1:] = pattern.kv_num_blocks.flatten()
    indices = torch.empty(pattern.kv_indices.numel() + 1, dtype=torch.int32, device="cuda")
    indices[1:] = pattern.kv_indices.flatten()
    counts, indices = counts[1:].view_as(pattern.kv_num_blocks), indices[1:].view_as(pattern.kv_indices)
    assert counts.data_ptr() % 16 and indices.data_ptr() % 16
    launcher = hopper_kernels._sparse_attention_sm90_ws_launch
    for _ in range(2):  # through Triton, then directly
        out = hopper_kernels.sparse_attention_sm90(q, k, v, counts, indices, 128**-0.5)
        assert torch.equal(out, aligned)
    assert any(key[1][8] == (torch.int32, False) for key in launcher.compiled), "a misaligned kernel was kept"


@requires_hopper
@pytest.mark.parametrize("t", [4096, 20000])
@pytest.mark.parametrize("options", [{}, {"alpha": 0.0}, {"pattern_per_kv_head": True}],
                         ids=["per-query-head", "keep-all", "per-kv-head"])
def test_dependent_index_launch_selects_the_same_blocks(monkeypatch, t, options):
    """The index build launched as a programmatic dependent of the block means (Hopper, up to
    PDL_MAX_BLOCKS key blocks) selects what two plain launches select."""
    from kernels.flash_prefill import pattern as pattern_kernels

    q, k, _ = structured_qkv(1, t, t, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    config = FlashPrefillConfig(min_seq_len=0, **options)
    assert pattern_kernels.dependent_launch(q.device, -(-t // 128))
    dependent = api._find_pattern_triton(q, k, config, 128**-0.5)
    monkeypatch.setattr(pattern_kernels, "PDL", False)
    assert not pattern_kernels.dependent_launch(q.device, -(-t // 128))
    plain = api._find_pattern_triton(q, k, config, 128**-0.5)
    assert torch.equal(dependent.kv_num_blocks, plain.kv_num_blocks)
    listed = torch.arange(plain.kv_indices.shape[-1], device="cuda") < plain.kv_num_blocks[..., None]
    assert torch.equal(dependent.kv_indices[listed], plain.kv_indices[listed])


@requires_hopper
def test_prepared_launches_equal_launches_built_in_full(monkeypatch):
    """The Hopper kernel's prepared launches (arguments converted once, made again with other
    inputs, outputs and block lists of the same shapes) give what launches built in full give:
    calls repeated into one output, new contents at the same addresses, other tensors, another
    scale, another stream; and a call whose launch was prepared before builds none."""
    from kernels.flash_prefill import sparse_attention_sm90 as hopper_kernels

    q, k, v = structured_qkv(1, 4096, 4096, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    first = api._find_pattern_triton(q, k, FlashPrefillConfig(min_seq_len=0), 128**-0.5)
    other = api._find_pattern_triton(q, k, FlashPrefillConfig(alpha=0.3, min_seq_len=0), 128**-0.5)
    counts, ids = first.kv_num_blocks.clone(), first.kv_indices.clone()
    launcher = hopper_kernels._sparse_attention_sm90_ws_launch
    built = []
    plain_launch = launcher.launch
    monkeypatch.setattr(launcher, "launch", lambda *a: built.append(1) or plain_launch(*a))

    def full(scale, inputs=None, pattern=None):
        monkeypatch.setattr(runtime, "PREPARED_LAUNCHES", 0)
        expected = hopper_kernels.sparse_attention_sm90(*(inputs or (q, k, v)), *(pattern or (counts, ids)), scale)
        monkeypatch.setattr(runtime, "PREPARED_LAUNCHES", 32)
        return expected

    def prepared(scale, inputs=None, pattern=None, out=None):
        out = torch.full_like(q, float("nan")) if out is None else out.fill_(float("nan"))
        return hopper_kernels.sparse_attention_sm90(*(inputs or (q, k, v)), *(pattern or (counts, ids)), scale,
                                                    out=out)

    hopper_kernels._ws_prepared.launches.clear()
    out = torch.empty_like(q)
    expected = full(128**-0.5)
    for _ in range(3):
        assert torch.equal(prepared(128**-0.5, out=out), expected)
    assert len(hopper_kernels._ws_prepared.launches) == 1
    built.clear()
    assert torch.equal(prepared(128**-0.5, out=out), expected) and not built, "a prepared launch was built again"
    q.mul_(-0.5)  # new contents at the same addresses
    counts.copy_(other.kv_num_blocks)
    ids.copy_(other.kv_indices)
    expected = full(128**-0.5)
    assert torch.equal(prepared(128**-0.5, out=out), expected)
    inputs = tuple(torch.randn_like(x) for x in (q, k, v))  # other tensors of the same shapes
    pattern = (first.kv_num_blocks.clone(), first.kv_indices.clone())
    built.clear()
    assert torch.equal(prepared(128**-0.5, inputs, pattern), full(128**-0.5, inputs, pattern))
    assert len(built) == 1, "the launch with other tensors should be the prepared one (one built: the check's)"
    assert not torch.equal(prepared(128**-0.5), full(0.05)), "the scale should change the output"
    for _ in range(2):
        assert torch.equal(prepared(0.05), full(0.05))
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        for _ in range(2):
            result = prepared(128**-0.5, out=out)
        side.synchronize()
    assert torch.equal(result, expected)
    assert len(hopper_kernels._ws_prepared.launches) == 3


@requires_hopper
@pytest.mark.parametrize("t", [8192, 40000], ids=["index-build-dependent", "index-build-plain"])
def test_prepared_pattern_and_attention_launches_equal_launches_built_in_full(monkeypatch, t):
    """flash_prefill's three launches (block means, index build, attention) made again from their
    prepared launches with other tensors of the same shapes select the same blocks and give the
    same output as launches built in full."""
    from kernels.flash_prefill import pattern as pattern_kernels
    from kernels.flash_prefill import sparse_attention_sm90 as hopper_kernels

    config = FlashPrefillConfig(min_seq_len=0)
    first = structured_qkv(1, t, t, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    flash_prefill(*first, config=config)
    flash_prefill(*first, config=config)  # (prepared at the second call)
    sites = (pattern_kernels._block_means_prepared, pattern_kernels._index_prepared, hopper_kernels._ws_prepared)
    assert all(site.launches for site in sites)
    q, k, v = (x.flip(1).contiguous() for x in first)  # other tensors, other contents
    found, built = [], []

    class Counting(collections.OrderedDict):
        def get(self, key, default=None):
            value = super().get(key, default)
            found.append(value is not None)
            return value

    for site in sites:
        monkeypatch.setattr(site, "launches", Counting(site.launches))
        plain_launch = site.launcher.launch
        monkeypatch.setattr(site.launcher, "launch", lambda *a, plain_launch=plain_launch: built.append(1)
                            or plain_launch(*a))
    prepared, prepared_pattern = flash_prefill(q, k, v, config=config, return_pattern=True)
    assert found == [True, True, True] and not built, "each launch should be the prepared one"
    monkeypatch.setattr(runtime, "PREPARED_LAUNCHES", 0)
    full, full_pattern = flash_prefill(q, k, v, config=config, return_pattern=True)
    assert len(built) == 3
    counts = prepared_pattern.kv_num_blocks
    assert torch.equal(counts, full_pattern.kv_num_blocks)
    listed = torch.arange(counts.shape[-1], device="cuda") < counts[..., None]
    assert torch.equal(prepared_pattern.kv_indices[listed], full_pattern.kv_indices[listed])
    assert torch.equal(prepared, full)


@pytest.mark.parametrize("streams", [True, False], ids=["two-streams", "one-stream"])
def test_last_full_blocks_apart_on_gpu(monkeypatch, streams):
    """SPLIT_FULL_ROWS at the 7B shape, 150 queries after a prefix off the block grid: the pattern of
    the one call, the output within bf16 rounding of it, on two streams or one, with the split-KV
    kernel for the last rows or without."""
    cfg = FlashPrefillConfig.for_model("qwen2.5-vl")
    q, k, v = structured_qkv(1, 150, 16_518, 28, 4, 128, cfg.block_size, dtype=torch.bfloat16, device="cuda")
    one, one_pattern = flash_prefill(q, k, v, config=cfg, backend="triton", return_pattern=True)
    assert one_pattern.density() < 1.0
    monkeypatch.setattr(api, "SPLIT_FULL_ROWS", True)
    monkeypatch.setattr(api, "FULL_ROWS_ON_TWO_STREAMS", streams)
    assert api.full_rows_apart(cfg, 150, 16_518) == 134  # from position 16,384, the last full blocks 128 and 129
    for split_kv in (False, True):
        monkeypatch.setattr(api, "SPLIT_KV_SHORT_QUERIES", split_kv)
        out, pattern = flash_prefill(q, k, v, config=cfg, backend="triton", return_pattern=True)
        assert torch.equal(pattern.to_dense(), one_pattern.to_dense())
        assert max_abs_error(out, one) < 2e-2
