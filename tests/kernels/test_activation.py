"""kernels.activation (Triton; the interpreter on CPU) against its PyTorch reference."""

import pytest
import torch
import torch.nn.functional as F

from kernels.activation import silu_mul, silu_mul_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU (conftest)
# One rounding step of the output dtype (the CPU interpreter rounds bf16 towards zero).
TOLERANCE = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def inputs(shape, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=g) * 4).to(dtype).to(device)
    up = torch.randn(shape, generator=g).to(dtype).to(device)
    return gate, up


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("shape", [(1,), (3, 100), (2, 5, 4099)], ids=str)
def test_silu_mul_matches_reference(shape, dtype):
    gate, up = inputs(shape, dtype)
    out = silu_mul(gate, up, block=1024)  # several programs and a ragged last one at 4099 * 10
    ref = silu_mul_reference(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=TOLERANCE[dtype], atol=1e-6)


def test_silu_mul_in_place_over_gate():
    gate, up = inputs((4, 300), torch.float32)
    ref = silu_mul_reference(gate, up)
    out = silu_mul(gate, up, out=gate)
    assert out.data_ptr() == gate.data_ptr()
    torch.testing.assert_close(gate, ref, rtol=1e-6, atol=1e-6)


def test_reference_is_the_gated_mlp_activation():
    """silu(g) * u as PyTorch's SiLU module and the formula give it in fp64, to the fp32 precision
    the reference computes in."""
    gate, up = inputs((50,), torch.float64, device="cpu")
    ref = silu_mul_reference(gate, up)
    torch.testing.assert_close(ref, torch.nn.SiLU()(gate) * up, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref, gate / (1 + torch.exp(-gate)) * up, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ref, F.gelu(gate) * up, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case", ["shape", "dtype", "int", "strided", "out-shape"])
def test_silu_mul_rejects_bad_input(case):
    gate, up = inputs((4, 8), torch.float32)
    out = None
    if case == "shape":
        up = up[:2]
    elif case == "dtype":
        up = up.to(torch.float16)
    elif case == "int":
        gate, up = gate.to(torch.int32), up.to(torch.int32)
    elif case == "strided":
        gate, up = gate.t(), up.t()
    elif case == "out-shape":
        out = torch.empty(4, 4, device=gate.device)
    with pytest.raises((ValueError, TypeError)):
        silu_mul(gate, up, out=out)
