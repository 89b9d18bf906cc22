"""kernels.short_query_attention (Triton; the interpreter on CPU) against its PyTorch reference."""

import pytest
import torch
import torch.nn.functional as F

from kernels import short_query_attention as sqa
from kernels.short_query_attention import short_query_attention, short_query_attention_reference, spans

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU (conftest)
# Against the fp32 reference: the probabilities meet V in the inputs' dtype (one rounding of P).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def inputs(b, tq, tk, hq, h, d, dtype, seed=0):
    """q (B, TQ, HQ, D), k, v (B, TK, H, D), keys scaled so that the softmax is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, tq, hq, d, generator=g) * 2).to(dtype).to(DEVICE)
    k = torch.randn(b, tk, h, d, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(b, tk, h, d, generator=g).to(dtype).to(DEVICE)
    return q, k, v


# (batch, queries, keys, query heads, KV heads, head dim, keys per span)
CASES = [
    (1, 5, 300, 4, 2, 32, 64),  # one tile of 10 rows, 5 spans, the last partial and holding the queries
    (2, 17, 200, 6, 3, 80, 64),  # a padded head dim, two rows, queries across two spans
    (1, 50, 50, 4, 1, 64, None),  # as many queries as keys: plain causal attention
    (1, 1, 700, 7, 1, 64, 128),  # one query: a decoding step
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_short_query_attention_matches_reference(case, dtype):
    b, tq, tk, hq, h, d, split = case
    q, k, v = inputs(b, tq, tk, hq, h, d, dtype)
    out = short_query_attention(q, k, v, d**-0.5, split=split)
    ref = short_query_attention_reference(q, k, v, d**-0.5)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_the_7b_heads():
    """28 query / 4 KV heads, head dim 128, in bf16: 2 tiles of 128 (query, query head) rows, the
    second partial, and 2 spans of the keys (`spans`: MIN_SPLIT keys at least)."""
    q, k, v = inputs(1, 20, 330, 28, 4, 128, torch.bfloat16, seed=2)
    out = short_query_attention(q, k, v, 128**-0.5)
    ref = short_query_attention_reference(q, k, v, 128**-0.5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOLERANCE[torch.bfloat16], atol=TOLERANCE[torch.bfloat16])


def test_the_reference_is_sdpa_with_bottom_right_alignment():
    q, k, v = inputs(1, 6, 40, 4, 2, 16, torch.float32, seed=3)
    seen = torch.ones(6, 40, dtype=torch.bool, device=DEVICE).tril(diagonal=34)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=seen,
                                          scale=0.25, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(short_query_attention_reference(q, k, v, 0.25), sdpa)


def test_each_query_sees_only_its_past():
    """A key and value that only the last query sees (here huge ones) change nothing for the
    others, and the last query's output does depend on them."""
    q, k, v = inputs(1, 8, 500, 4, 2, 32, torch.float32, seed=1)
    clean = short_query_attention(q, k, v, 0.2, split=64)
    k2, v2 = k.clone(), v.clone()
    k2[:, -1], v2[:, -1] = 100.0, 1e4
    changed = short_query_attention(q, k2, v2, 0.2, split=64)
    torch.testing.assert_close(changed[:, :-1], clean[:, :-1], rtol=0, atol=0)
    assert not torch.allclose(changed[:, -1], clean[:, -1])


def test_strided_inputs():
    """Views as a model makes them: q from a fused projection, k and v from one packed tensor."""
    b, tq, tk, hq, h, d = 1, 9, 260, 4, 2, 32
    g = torch.Generator().manual_seed(4)
    proj = torch.randn(b, tq, hq * d + 16, generator=g).to(DEVICE)
    q = proj[..., :hq * d].view(b, tq, hq, d)
    kv = torch.randn(b, tk, 2, h, d, generator=g).to(DEVICE)
    k, v = kv[:, :, 0], kv[:, :, 1]
    ref = short_query_attention_reference(q, k, v, d**-0.5)
    torch.testing.assert_close(short_query_attention(q, k, v, d**-0.5, split=64), ref, rtol=1e-5, atol=1e-5)


def test_spans_fill_the_gpu_in_whole_tiles():
    cpu = torch.device("cpu")  # 8 "SMs" off CUDA, here 2 programs each
    assert spans(131_072, 4, cpu, programs_per_sm=2) == (32_768, 4)
    assert spans(131_072, 1, cpu, programs_per_sm=2) == (8192, 16)
    assert spans(131_072, 1, cpu) == (4096, 32)  # PROGRAMS_PER_SM, 4
    assert spans(1000, 4, cpu, programs_per_sm=2) == (256, 4)  # at least MIN_SPLIT keys a span
    assert spans(300, 4, cpu, split=100) == (128, 3)  # given: rounded up to whole tiles


@pytest.mark.parametrize("block_m, tiles, programs_per_sm", [(128, 1, 1), (32, 3, 3), (16, 5, 4)])
def test_a_launch_has_a_program_per_sm_for_each_tile_up_to_four(monkeypatch, block_m, tiles, programs_per_sm):
    """By default the spans give a launch min(PROGRAMS_PER_SM, tiles of a KV head) programs per SM."""
    seen = []
    real = sqa.spans
    monkeypatch.setattr(sqa, "spans", lambda tk, per_span, *a: seen.append((per_span, a[-1])) or real(tk, per_span, *a))
    q, k, v = (torch.randn(1, n, h, 32) for n, h in ((40, 4), (300, 2), (300, 2)))  # 80 rows a KV head
    out = short_query_attention(q, k, v, 32**-0.5, block_m=block_m)
    torch.testing.assert_close(out, short_query_attention_reference(q, k, v, 32**-0.5), rtol=1e-5, atol=1e-5)
    assert seen == [(2 * tiles, programs_per_sm)]


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v: (q[0], k, v), "must be"),
    (lambda q, k, v: (q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1)), "do not fit"),
    (lambda q, k, v: (torch.cat([q] * 4, dim=1), k[:, :7], v[:, :7]), "no more than the keys"),
    (lambda q, k, v: (q.half(), k, v), "share one of"),
    (lambda q, k, v: (q.transpose(1, 3).contiguous().transpose(1, 3), k, v), "unit last stride"),
])
def test_bad_inputs_raise(bad, match):
    q, k, v = inputs(1, 2, 20, 4, 2, 8, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        short_query_attention(*bad(q, k, v), 0.3)


@pytest.mark.cuda
@pytest.mark.parametrize("tq", [1, 16, 112, 200, 256])
def test_the_7b_shape_on_the_gpu_matches_flash_attention(tq):
    """Over 16K keys and more (off the tile grid), the 7B heads in bf16 with the spans `spans`
    chooses on this GPU: as PyTorch's flash-attention kernel (`dense_flash`, the path it would
    replace), and as the fp32 reference for the last queries."""
    from kernels.flash_prefill.api import dense_flash

    q, k, v = inputs(1, tq, 16_421, 28, 4, 128, torch.bfloat16, seed=5)
    out = short_query_attention(q, k, v, 128**-0.5)
    torch.testing.assert_close(out.float(), dense_flash(q, k, v, 128**-0.5).float(), rtol=1.6e-2, atol=1.6e-2)
    last = short_query_attention_reference(q[:, -1:], k, v, 128**-0.5)
    torch.testing.assert_close(out[:, -1:].float(), last.float(), rtol=1.6e-2, atol=1.6e-2)
