"""kernels.decode_attention (Triton; the interpreter on CPU) against its PyTorch reference."""

import pytest
import torch

from kernels.decode_attention import decode_attention, decode_attention_reference, splits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU (conftest)
# Against the fp32 reference: the probabilities meet V in the inputs' dtype (one rounding of P).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def cache(b, hq, h, cap, d, dtype, seed=0, held=None):
    """q (B, HQ, D) and k, v (B, H, CAP, D) as views of buffers `held` positions long (a cache
    reserved further than it is read), keys scaled so that the softmax is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    held = held or cap
    q = (torch.randn(b, hq, d, generator=g) * 2).to(dtype).to(DEVICE)
    k = (torch.randn(b, h, held, d, generator=g)).to(dtype).to(DEVICE)[:, :, :cap]
    v = torch.randn(b, h, held, d, generator=g).to(dtype).to(DEVICE)[:, :, :cap]
    return q, k, v


# (batch, query heads, KV heads, capacity, head dim, lengths, keys per span)
CASES = [
    (1, 7, 1, 300, 64, [300], 64),  # every position, 5 spans, the last one partial
    (1, 28, 4, 700, 128, [513], None),  # the 7B shape, spans past the length
    (2, 4, 2, 200, 80, [1, 137], 64),  # a padded head dim, one key, a span past the length
    (1, 2, 2, 90, 32, [90], 512),  # one query head per KV head, one span
    (1, 2, 1, 9000, 64, [8990], 64),  # 141 spans: more than the combine reads in one load
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_decode_attention_matches_reference(case, dtype):
    b, hq, h, cap, d, lengths, split = case
    q, k, v = cache(b, hq, h, cap, d, dtype, held=cap + 37)
    lengths = torch.tensor(lengths, device=DEVICE)
    out = decode_attention(q, k, v, lengths, d**-0.5, split=split)
    ref = decode_attention_reference(q, k, v, lengths, d**-0.5)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_positions_past_the_length_are_never_read():
    """Whatever the reserved positions past a row's length hold (here inf and NaN), the output is
    that of the first `length` positions; and a shorter length gives another output."""
    q, k, v = cache(2, 8, 2, 256, 64, torch.float32, seed=1)
    lengths = torch.tensor([100, 256], device=DEVICE)
    clean = decode_attention(q, k, v, lengths, 0.125, split=64)
    k[0, :, 100:], v[0, :, 100:] = float("inf"), float("nan")
    torch.testing.assert_close(decode_attention(q, k, v, lengths, 0.125, split=64), clean, rtol=0, atol=0)
    shorter = decode_attention(q, k, v, torch.tensor([99, 256], device=DEVICE), 0.125, split=64)
    assert not torch.allclose(shorter[0], clean[0]) and torch.equal(shorter[1], clean[1])


def test_a_length_past_the_capacity_reads_the_whole_cache():
    q, k, v = cache(1, 4, 1, 130, 32, torch.float32, seed=2)
    whole = decode_attention(q, k, v, torch.tensor([130], device=DEVICE), 0.2)
    torch.testing.assert_close(decode_attention(q, k, v, torch.tensor([10_000], device=DEVICE), 0.2), whole)


def test_spans_depend_on_the_capacity_only():
    span, count = splits(131_072, 4, torch.device("cpu"))
    assert span % 64 == 0 and span * count >= 131_072 and span * (count - 1) < 131_072
    assert splits(10, 4, torch.device("cpu")) == (256, 1)  # at least MIN_SPLIT keys a span
    assert splits(1000, 4, torch.device("cpu"), split=100) == (128, 8)  # rounded up to whole tiles


@pytest.mark.parametrize("bad,error", [
    (lambda q, k, v, n: (q[:, :, None], k, v, n), ValueError),  # q not (B, HQ, D)
    (lambda q, k, v, n: (q[:, :3], k, v, n), ValueError),  # query heads not a multiple of KV heads
    (lambda q, k, v, n: (q, k, v.half(), n), TypeError),  # mixed dtypes
    (lambda q, k, v, n: (q, k, v, n.float()), ValueError),  # lengths not integers
    (lambda q, k, v, n: (q, k, v, n[:0]), ValueError),  # a length per row
    (lambda q, k, v, n: (q, k.transpose(2, 3), v.transpose(2, 3), n), ValueError),  # no unit last stride
])
def test_bad_inputs_are_rejected(bad, error):
    q, k, v = cache(1, 4, 2, 64, 64, torch.float32)
    with pytest.raises(error):
        decode_attention(*bad(q, k, v, torch.tensor([64], device=DEVICE)), 0.125)


@pytest.mark.cuda
def test_one_captured_graph_serves_every_length():
    """What models.decode relies on: launches captured once read the length on the device, so a
    replay after the length tensor changes attends over the new length."""
    q, k, v = cache(1, 28, 4, 4096, 128, torch.bfloat16, seed=3)
    lengths = torch.tensor([1], device="cuda")
    decode_attention(q, k, v, lengths, 0.088)  # (compiled outside the capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, lengths, 0.088)
    for n in (1, 77, 2048, 4096):
        lengths.fill_(n)
        graph.replay()
        ref = decode_attention_reference(q, k, v, lengths, 0.088)
        torch.testing.assert_close(out.float(), ref.float(), rtol=1.6e-2, atol=1.6e-2)
