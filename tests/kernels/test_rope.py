"""kernels.rope (Triton; the interpreter on CPU) against its PyTorch reference."""

import math

import pytest
import torch

from kernels.rope import head_programs, rope, rope_reference, supported

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU (conftest)
# One rounding step of the output dtype: the kernel and the reference differ only in how the
# fp32 result is rounded (the CPU interpreter rounds bf16 towards zero).
TOLERANCE = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def inputs(s, h, d, dtype, device=DEVICE, seed=0):
    """q, k as strided views of one (S, 3, H, D) projection; cos / sin of (S, D) angles, as the
    vision towers build them (the half-width angles repeated)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(s, 3, h, d, generator=g).to(dtype)
    q, k, _ = qkv.to(device).unbind(1)
    angles = torch.randn(s, d // 2, generator=g) * 20
    angles = torch.cat([angles, angles], -1).to(device)
    return q, k, angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("s,h,d", [(1, 1, 64), (45, 3, 80), (100, 2, 128), (33, 1, 16)],
                         ids=lambda x: str(x))
def test_rope_matches_reference(s, h, d, dtype):
    q, k, cos, sin = inputs(s, h, d, dtype)
    assert s * h == 1 or not q.is_contiguous()
    qo, ko = rope(q, k, cos, sin)
    qr, kr = rope_reference(q, k, cos, sin)
    for out, ref in ((qo, qr), (ko, kr)):
        assert out.shape == (s, h, d) and out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out, ref, rtol=TOLERANCE[dtype], atol=1e-6)


@pytest.mark.parametrize("s", [70, 1], ids=["70-tokens", "one-token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_rope_grouped_kv_heads(dtype, s):
    """The language models' layout: q and k from separate projections, 7 query heads to 1 KV head
    (Qwen2.5-VL-7B has 28 to 4), cos / sin in the model's dtype; the heads split between programs
    (few tokens), q's more of them than k's."""
    g = torch.Generator().manual_seed(3)
    d = 64
    q = torch.randn(1, s, 7 * d, generator=g).to(dtype).to(DEVICE).view(s, 7, d)
    k = torch.randn(1, s, d, generator=g).to(dtype).to(DEVICE).view(s, 1, d)
    angles = torch.randn(s, d // 2, generator=g) * 20
    angles = torch.cat([angles, angles], -1).to(DEVICE)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    qo, ko = rope(q, k, cos, sin)
    qr, kr = rope_reference(q, k, cos, sin)
    assert qo.shape == (s, 7, d) and ko.shape == (s, 1, d)
    torch.testing.assert_close(qo, qr, rtol=TOLERANCE[dtype], atol=1e-6)
    torch.testing.assert_close(ko, kr, rtol=TOLERANCE[dtype], atol=1e-6)


def test_few_tokens_split_the_heads_between_programs():
    assert head_programs(1, 32) == 32 and head_programs(3, 7) == 7 and head_programs(64, 32) == 2
    assert head_programs(4096, 32) == 1 and head_programs(200, 8) == 1


def test_reference_is_a_rotation():
    """The reference rotates each pair (x_i, x_{i + D/2}) by its angle: norms kept, angle added
    (to fp32 precision, which it computes in)."""
    q, k, cos, sin = inputs(20, 2, 64, torch.float64, device="cpu")
    qo, _ = rope_reference(q, k, cos, sin)
    pair_in = torch.complex(q[..., :32], q[..., 32:])
    pair_out = torch.complex(qo[..., :32], qo[..., 32:])
    angle = torch.atan2(sin[:, :32], cos[:, :32])[:, None]
    torch.testing.assert_close(pair_out, pair_in * torch.exp(1j * angle), rtol=1e-6, atol=1e-6)
    assert math.isclose(qo.norm().item(), q.norm().item(), rel_tol=1e-6)


@pytest.mark.parametrize("case", ["odd-dim", "cos-shape", "k-shape", "k-dim", "int", "stride", "rank"])
def test_rope_rejects_bad_input(case):
    q, k, cos, sin = inputs(8, 2, 64, torch.float32)
    if case == "odd-dim":
        q, k, cos, sin = q[..., :63], k[..., :63], cos[:, :63], sin[:, :63]
    elif case == "cos-shape":
        cos = cos[:, :32]
    elif case == "k-shape":
        k = k[:4]
    elif case == "k-dim":
        k = k[..., :32]
    elif case == "int":
        q, k = q.to(torch.int32), k.to(torch.int32)
    elif case == "stride":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        q, k = q[None], k[None]
    with pytest.raises((ValueError, TypeError)):
        rope(q, k, cos, sin)


def test_supported_says_what_rope_takes():
    q, k, cos, sin = inputs(8, 2, 64, torch.float32)
    assert supported(q, k, cos, sin)
    assert not supported(q[..., :63], k[..., :63], cos[:, :63], sin[:, :63])
    assert not supported(q, k, cos[:, :32], sin)


def test_rope_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, cos, sin = inputs(8, 2, 64, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        rope(q, k, cos, sin)


@pytest.mark.cuda
@pytest.mark.parametrize("s", [1, 70001])
def test_rope_cuda_bf16(s):
    """Qwen2.5-VL's vision shape (16 heads of 80) on the GPU: at most one bf16 rounding step from
    the reference, and almost always none (both round to nearest there)."""
    q, k, cos, sin = inputs(s, 16, 80, torch.bfloat16, device="cuda")
    for out, ref in zip(rope(q, k, cos, sin), rope_reference(q, k, cos, sin)):
        torch.testing.assert_close(out, ref, rtol=2**-7, atol=1e-6)
        assert (out != ref).float().mean().item() < 0.01


@pytest.mark.cuda
def test_rope_cuda_bf16_language_model_shape():
    """Qwen2.5-VL-7B's language-model shape (28 query heads, 4 KV heads of 128) at 20,000 tokens."""
    q, _, cos, sin = inputs(20000, 28, 128, torch.bfloat16, device="cuda")
    k = torch.randn(20000, 4, 128, device="cuda").to(torch.bfloat16)
    for out, ref in zip(rope(q, k, cos, sin), rope_reference(q, k, cos, sin)):
        torch.testing.assert_close(out, ref, rtol=2**-7, atol=1e-6)
        assert (out != ref).float().mean().item() < 0.01
