"""kernels.rms_norm (Triton; the interpreter on CPU) against its PyTorch reference."""

import pytest
import torch

from kernels.rms_norm import add_rms_norm, add_rms_norm_reference, supported

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU (conftest)
# One rounding step of the output dtype (the CPU interpreter rounds bf16 towards zero).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def inputs(rows, n, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g) * 3).to(dtype).to(device)
    y = torch.randn(rows, n, generator=g).to(dtype).to(device)
    weight = (torch.rand(n, generator=g) + 0.5).to(dtype).to(device)
    return x, y, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("rows,n", [(1, 1), (7, 80), (5, 1280), (3, 100)], ids=str)
def test_add_rms_norm_matches_reference(rows, n, dtype):
    x, y, weight = inputs(rows, n, dtype)
    total, normed = add_rms_norm(x, y, weight, 1e-6)
    ref_total, ref = add_rms_norm_reference(x, y, weight, 1e-6)
    assert total.shape == normed.shape == x.shape and total.dtype == normed.dtype == dtype
    torch.testing.assert_close(total, ref_total, rtol=TOLERANCE[dtype], atol=1e-6)
    # Two steps: the interpreter's bf16 sum may be one step off, and the norm rounds again.
    torch.testing.assert_close(normed, ref, rtol=2 * TOLERANCE[dtype], atol=2 * TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_bias_is_added_to_the_total_not_to_the_normed_sum(dtype):
    x, y, weight = inputs(5, 80, dtype, seed=1)
    bias = (torch.randn(80) * 2).to(dtype).to(DEVICE)
    total, normed = add_rms_norm(x, y, weight, 1e-6, bias=bias)
    ref_total, ref = add_rms_norm_reference(x, y, weight, 1e-6, bias=bias)
    _, without = add_rms_norm_reference(x, y, weight, 1e-6)
    torch.testing.assert_close(ref, without, rtol=0, atol=0)  # the norm is that of x + y
    # One step of the inputs' size (up to about 8) where the sum and the bias cancel.
    torch.testing.assert_close(total, ref_total, rtol=2 * TOLERANCE[dtype], atol=8 * TOLERANCE[dtype])
    torch.testing.assert_close(normed, ref, rtol=2 * TOLERANCE[dtype], atol=2 * TOLERANCE[dtype])
    assert not torch.allclose(total.float(), (x + y).float(), rtol=1e-2, atol=1e-2)


def test_sum_written_over_y():
    x, y, weight = inputs(4, 96, torch.float32)
    ref_total, ref = add_rms_norm_reference(x, y, weight, 1e-5)
    total, normed = add_rms_norm(x, y, weight, 1e-5, out=y)
    assert total.data_ptr() == y.data_ptr()
    torch.testing.assert_close(y, ref_total, rtol=0, atol=0)
    torch.testing.assert_close(normed, ref, rtol=1e-5, atol=1e-6)


def test_no_rows():
    x, y, weight = inputs(0, 64, torch.float32)
    total, normed = add_rms_norm(x, y, weight, 1e-6)
    assert total.shape == normed.shape == (0, 64)


def test_reference_is_the_modeling_files_rms_norm():
    """The reference's norm is transformers' RMSNorm on the sum, computed in fp64 here: weight *
    (x * rsqrt(mean(x^2) + eps)); a norm without the mean's rsqrt would differ."""
    x, y, weight = inputs(6, 40, torch.float64, device="cpu")
    total, normed = add_rms_norm_reference(x, y, weight, 1e-6)
    s = x + y
    torch.testing.assert_close(total, s, rtol=0, atol=0)
    torch.testing.assert_close(normed, weight * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)))
    assert not torch.allclose(normed, weight * s / s.abs().mean(-1, keepdim=True), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case", ["shape", "weight-shape", "dtype", "weight-dtype", "int", "strided", "3-d",
                                  "out-shape", "too-wide", "bias-shape", "bias-dtype"])
def test_add_rms_norm_rejects_bad_input(case):
    x, y, weight = inputs(4, 8, torch.float32)
    out = bias = None
    if case == "shape":
        y = y[:2]
    elif case == "weight-shape":
        weight = weight[:4]
    elif case == "dtype":
        y = y.to(torch.float16)
    elif case == "weight-dtype":
        weight = weight.to(torch.float16)
    elif case == "int":
        x, y, weight = x.to(torch.int32), y.to(torch.int32), weight.to(torch.int32)
    elif case == "strided":
        x, y = torch.cat([x, x], 1)[:, ::2], torch.cat([y, y], 1)[:, ::2]
    elif case == "3-d":
        x, y = x[None], y[None]
    elif case == "out-shape":
        out = torch.empty(4, 4, device=x.device)
    elif case == "too-wide":
        x, y, weight = inputs(1, 16385, torch.float32)
    elif case == "bias-shape":
        bias = weight[:4]
    elif case == "bias-dtype":
        bias = weight.to(torch.float16)
    assert not supported(x, y, weight, out, bias)
    with pytest.raises((ValueError, TypeError)):
        add_rms_norm(x, y, weight, 1e-6, out=out, bias=bias)
