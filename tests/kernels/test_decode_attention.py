"""kernels.decode_attention (Triton; the interpreter on CPU) against its PyTorch reference."""

import pytest
import torch

from kernels.decode_attention import (
    TABLE_COLUMNS,
    decode_attention,
    decode_attention_reference,
    fill_table,
    splits,
    write_kv,
    write_kv_reference,
)

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
    (1, 4, 2, 5000, 64, [4097], None),  # the length divided on the device (CPU): 16 spans of 320 keys, 13 busy
    (2, 4, 1, 3000, 32, [2999, 300], None),  # 12 spans of MIN_SPLIT keys, 10 past the second row's length
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


def test_spans_depend_on_the_gpu_and_heads_and_a_short_capacity():
    assert splits(131_072, 4, torch.device("cpu")) == (0, 8)  # 4 programs a "SM" (8 of them on CPU), 4 KV heads
    assert splits(None, 4, torch.device("cpu")) == (0, 8)  # any capacity: a table's cache
    assert splits(131_072, 1, torch.device("cpu")) == (0, 32)
    assert splits(1000, 1, torch.device("cpu")) == (0, 4)  # no more spans than MIN_SPLIT keys each fill
    assert splits(10, 4, torch.device("cpu")) == (0, 1)
    assert splits(1000, 4, torch.device("cpu"), split=100) == (128, 8)  # given: rounded up to whole tiles


def table_of(buffers):
    return fill_table(torch.empty(len(buffers), TABLE_COLUMNS, dtype=torch.int64, device=DEVICE), buffers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_a_cache_read_from_a_table(dtype):
    """With a table the launch reads the cache whose addresses it holds, not the k and v it is
    given (here other buffers holding NaN): what a graph captured over one answer's buffers does
    over the next answer's (on CUDA, of another capacity too:
    test_a_captured_graph_serves_the_buffers_of_a_refilled_table)."""
    layers = []
    for seed, cap in ((4, 700), (5, 700)):
        q, k, v = cache(1, 28, 4, cap, 64, dtype, seed=seed)
        layers.append((q, k.contiguous(), v.contiguous()))
    table = table_of([(k, v) for _, k, v in layers])
    stale = torch.full((1, 4, 700, 64), float("nan"), dtype=dtype, device=DEVICE)
    for layer, (q, k, v) in enumerate(layers):
        for n in (1, 300, 700, 5000):
            lengths = torch.tensor([n], device=DEVICE)
            out = decode_attention(q, stale, stale, lengths, 0.125, table=table, layer=layer)
            ref = decode_attention_reference(q, k, v, lengths, 0.125)
            torch.testing.assert_close(out.float(), ref.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_write_kv_writes_at_the_device_position_of_the_tables_layer():
    g = torch.Generator().manual_seed(6)
    buffers = [tuple(torch.randn(1, 2, 40, 16, generator=g).to(DEVICE) for _ in range(2)) for _ in range(3)]
    expected = [tuple(t.clone() for t in pair) for pair in buffers]
    before = buffers[1][0].clone()
    table = table_of(buffers)
    key, value = (torch.randn(1, 2, 1, 16, generator=g).to(DEVICE) for _ in range(2))
    for position in (0, 17, 39):
        index = torch.tensor([position], device=DEVICE)
        write_kv(key, value, index, table, 1)
        write_kv_reference(key, value, index, *expected[1])
        key, value = key + 1, value - 1
    write_kv(key, value, torch.tensor([40], device=DEVICE), table, 2)  # past the capacity: nothing written
    for pair, want in zip(buffers, expected):
        for t, w in zip(pair, want):
            assert torch.equal(t, w)
    assert not torch.equal(buffers[1][0], before)


def test_the_table_holds_contiguous_buffers_of_one_shape():
    k = torch.zeros(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError):
        table_of([(k, k.transpose(2, 3).contiguous().transpose(2, 3))])  # not contiguous
    with pytest.raises(ValueError):
        table_of([(k, k), (k[:, :1].contiguous(), k[:, :1].contiguous())])  # another shape
    with pytest.raises(ValueError):
        fill_table(torch.empty(2, 3, dtype=torch.int64, device=DEVICE), [(k, k), (k, k)])  # not TABLE_COLUMNS wide
    shifted = torch.zeros(1 + k.numel(), device=DEVICE)[1:].view(k.shape)  # contiguous, 4 bytes off alignment
    with pytest.raises(ValueError):
        table_of([(shifted, k)])
    assert table_of([(k, k)])[0].tolist() == [k.data_ptr(), k.data_ptr(), 8 * 16, 8]


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


@pytest.mark.cuda
def test_a_captured_graph_serves_the_buffers_of_a_refilled_table():
    """What models.decode relies on to keep a step's graph from one answer to the next: launches
    captured over one cache's table write into and attend over another cache, of another capacity,
    once the table holds it."""
    q = (torch.randn(1, 28, 128, device="cuda") * 2).bfloat16()
    key, value = torch.randn(2, 1, 4, 1, 128, device="cuda").bfloat16()
    index = torch.zeros(1, dtype=torch.long, device="cuda")
    table = torch.empty(1, TABLE_COLUMNS, dtype=torch.int64, device="cuda")
    first = [tuple(torch.randn(1, 4, 4096, 128, device="cuda").bfloat16() for _ in range(2))]
    fill_table(table, first)
    k, v = first[0]
    write_kv(key, value, index, table, 0)  # (compiled outside the capture)
    decode_attention(q, k, v, index + 1, 0.088, table=table, layer=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        write_kv(key, value, index, table, 0)
        out = decode_attention(q, k, v, index + 1, 0.088, table=table, layer=0)
    for cap, n in ((4096, 4000), (9000, 8999), (300, 1)):
        buffers = [tuple(torch.randn(1, 4, cap, 128, device="cuda").bfloat16() for _ in range(2))]
        fill_table(table, buffers)
        index.fill_(n - 1)
        graph.replay()
        keys, values = (t.clone() for t in buffers[0])
        write_kv_reference(key, value, index, keys, values)
        assert torch.equal(buffers[0][0], keys) and torch.equal(buffers[0][1], values)
        ref = decode_attention_reference(q, keys, values, index + 1, 0.088)
        torch.testing.assert_close(out.float(), ref.float(), rtol=1.6e-2, atol=1.6e-2)
