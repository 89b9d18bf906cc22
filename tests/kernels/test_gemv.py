"""kernels.gemv (Triton; the interpreter on CPU) against its PyTorch references."""

import pytest
import torch
import torch.nn.functional as F

from kernels.gemv import gated_gemv, gated_gemv_reference, gemv, gemv_reference, supported

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU (conftest)
# One rounding step of the output dtype (the CPU interpreter rounds bf16 towards zero).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tensors(shapes, dtype, seed=0, device=DEVICE, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * scale).to(dtype).to(device) for shape in shapes]


def weights(rows, k, dtype, bias=True, seed=1):
    parts = []
    for i, n in enumerate(rows):
        w, b = tensors([(n, k), (n,)], dtype, seed=seed + i)
        parts.append((w, b if bias else None))
    return parts


def assert_close(got, expected, dtype):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("rows", [(37,), (37, 9), (40, 9, 9)], ids=str)
@pytest.mark.parametrize("k", [200, 1100])  # one masked K block; several, the last ragged
def test_gemv_parts_match_reference(rows, k, dtype):
    """One launch for 1-3 weight matrices (the q, k, v projections' form), biased or not: each
    part's rows, a ragged last block among them, as the fp32 reference rounds them."""
    x = tensors([(1, 1, k)], dtype, scale=1.0)[0]
    for bias in (True, False):
        parts = weights(rows, k, dtype, bias)
        got = gemv(x, parts)
        expected = gemv_reference(x, parts)
        assert len(got) == len(rows)
        for ours, theirs in zip(got, expected, strict=True):
            assert_close(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_gemv_adds_into_out(dtype):
    """add=True: out + W x written over out (the down projection adding into the residual)."""
    x, residual = tensors([(1, 300), (1, 70)], dtype, scale=1.0)
    parts = weights((70,), 300, dtype, bias=False)
    expected = gemv_reference(x, parts, add=True, out=[residual])[0]
    out = residual.clone()
    (got,) = gemv(x, parts, add=True, out=[out])
    assert got is out
    assert_close(out, expected, dtype)
    assert not torch.equal(out, residual)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("bias", [True, False])
def test_gated_gemv_matches_reference(dtype, bias):
    x = tensors([(1, 1, 520)], dtype, scale=1.0)[0]
    gate, up = weights((75, 75), 520, dtype, bias)
    assert_close(gated_gemv(x, gate, up), gated_gemv_reference(x, gate, up), dtype)


def test_references_are_the_projections():
    """The references are F.linear's products, and the gated one the SiLU-gated MLP's first half."""
    x, w, b, w2, b2 = tensors([(1, 1, 64), (30, 64), (30,), (30, 64), (30,)], torch.float64, device="cpu")
    torch.testing.assert_close(gemv_reference(x, [(w, b)])[0], F.linear(x, w, b))
    torch.testing.assert_close(gated_gemv_reference(x, (w, b), (w2, b2)),
                               F.silu(F.linear(x, w, b)) * F.linear(x, w2, b2))
    out = torch.ones(1, 1, 30, dtype=torch.float64)
    torch.testing.assert_close(gemv_reference(x, [(w, None)], add=True, out=[out])[0], out + F.linear(x, w))


@pytest.mark.parametrize("case", ["two rows", "strided", "int", "dtype", "width", "bias some", "four parts"])
def test_gemv_rejects_what_it_does_not_take(case):
    x = tensors([(1, 64)], torch.float32)[0]
    parts = weights((8, 8), 64, torch.float32)
    if case == "two rows":
        x = tensors([(2, 64)], torch.float32)[0]
    elif case == "strided":
        x = tensors([(64, 2)], torch.float32)[0][:, 0]
    elif case == "int":
        x = x.to(torch.int32)
    elif case == "dtype":
        parts[1] = (parts[1][0].half(), parts[1][1].half())
    elif case == "width":
        parts[1] = weights((8,), 32, torch.float32)[0]
    elif case == "bias some":
        parts[1] = (parts[1][0], None)
    elif case == "four parts":
        parts = parts * 2
    assert not supported(x, parts)
    with pytest.raises(ValueError, match="gemv takes one contiguous row"):
        gemv(x, parts)


def test_gemv_needs_out_to_add_into():
    x = tensors([(1, 64)], torch.float32)[0]
    with pytest.raises(ValueError, match="add=True needs"):
        gemv(x, weights((8,), 64, torch.float32), add=True)
    with pytest.raises(ValueError, match="one contiguous tensor of N_i elements"):
        gemv(x, weights((8,), 64, torch.float32), out=[torch.empty(7, device=DEVICE)])


@pytest.mark.cuda
@pytest.mark.parametrize("rows, k", [((3584, 512, 512), 3584), ((3584,), 3584), ((3584,), 18944),
                                     ((152064,), 3584)], ids=str)
def test_gemv_at_the_7b_shapes_cuda(rows, k):
    """The Qwen2.5-VL-7B decoding step's projections in bf16: q, k, v in one launch, o, down, the
    head; and gate, up with the activation."""
    x = tensors([(1, 1, k)], torch.bfloat16, scale=1.0)[0]
    parts = weights(rows, k, torch.bfloat16, bias=len(rows) == 3)
    for ours, theirs in zip(gemv(x, parts), gemv_reference(x, parts), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=2**-7)
    if rows == (3584,) and k == 3584:
        gate, up = weights((18944, 18944), k, torch.bfloat16, bias=False)
        torch.testing.assert_close(gated_gemv(x, gate, up), gated_gemv_reference(x, gate, up), rtol=2**-7,
                                   atol=2**-7)


def norm_of(k, dtype, seed=5):
    return (tensors([(k,)], dtype, seed=seed, scale=0.5)[0] + torch.ones(k, device=DEVICE).to(dtype), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("k", [200, 1100])
def test_gemv_with_the_norm_before_it(k, dtype):
    """norm=(weight, eps): the projections of x's RMS norm (the norm's sums over every K block, the
    last ragged), one launch for three parts, as the fp32 reference; a gated launch too."""
    x = tensors([(1, 1, k)], dtype, scale=3.0)[0]
    norm = norm_of(k, dtype)
    parts = weights((37, 9, 9), k, dtype)
    for ours, theirs in zip(gemv(x, parts, norm=norm), gemv_reference(x, parts, norm=norm), strict=True):
        assert_close(ours, theirs, dtype)
    gate, up = weights((75, 75), k, dtype, bias=False)
    assert_close(gated_gemv(x, gate, up, norm=norm), gated_gemv_reference(x, gate, up, norm=norm), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_gemv_adds_a_residual_into_new_outputs(dtype):
    """residual: r + W x + b written to a new tensor (or a given out), the residual left as it was."""
    x, residual = tensors([(1, 1, 300), (1, 1, 70)], dtype, scale=1.0)
    kept = residual.clone()
    parts = weights((70,), 300, dtype)
    expected = gemv_reference(x, parts, residual=[residual])[0]
    (got,) = gemv(x, parts, residual=[residual])
    assert got.data_ptr() != residual.data_ptr() and torch.equal(residual, kept)
    assert_close(got, expected, dtype)
    out = torch.empty_like(residual)
    assert gemv(x, parts, residual=[residual], out=[out])[0] is out
    assert_close(out, expected, dtype)


def test_norm_references_are_the_norm_then_the_projections():
    x, w, b, w2, g = tensors([(1, 1, 64), (30, 64), (30,), (30, 64), (64,)], torch.float64, device="cpu", scale=2.0)
    normed = F.rms_norm(x, (64,), g, 1e-5)
    fp32 = dict(rtol=1e-5, atol=1e-5)  # (the references compute in fp32)
    torch.testing.assert_close(gemv_reference(x, [(w, b)], norm=(g, 1e-5))[0], F.linear(normed, w, b), **fp32)
    torch.testing.assert_close(gated_gemv_reference(x, (w, None), (w2, None), norm=(g, 1e-5)),
                               F.silu(F.linear(normed, w)) * F.linear(normed, w2), **fp32)
    r = torch.ones(1, 1, 30, dtype=torch.float64)
    torch.testing.assert_close(gemv_reference(x, [(w, None)], residual=[r])[0], r + F.linear(x, w), **fp32)


@pytest.mark.parametrize("case", ["width", "dtype", "eps"])
def test_gemv_rejects_a_norm_it_does_not_take(case):
    x = tensors([(1, 64)], torch.float32)[0]
    parts = weights((8,), 64, torch.float32)
    weight, eps = norm_of(64, torch.float32)
    norm = {"width": (weight[:32], eps), "dtype": (weight.half(), eps), "eps": (weight, 1)}[case]
    assert supported(x, parts) and not supported(x, parts, norm)
    with pytest.raises(ValueError, match="RMSNorm weight"):
        gemv(x, parts, norm=norm)
    with pytest.raises(ValueError, match="RMSNorm weight"):
        gated_gemv(x, parts[0], parts[0], norm=norm)


def test_gemv_takes_add_or_a_residual():
    x = tensors([(1, 64)], torch.float32)[0]
    parts = weights((8,), 64, torch.float32)
    out = torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match="either add or residual"):
        gemv(x, parts, add=True, out=[out], residual=[out])
    with pytest.raises(ValueError, match="residual must hold"):
        gemv(x, parts, residual=[torch.zeros(7, device=DEVICE)])
