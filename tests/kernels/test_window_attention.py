"""kernels.window_attention (Triton; the interpreter on CPU) against its PyTorch reference."""

import pytest
import torch

from kernels.window_attention import MAX_CHUNK, supported, window_attention, window_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU (conftest)
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


def inputs(lengths, h, d, dtype, seed=0):
    """q, k, v as strided views of one (S, 3, H, D) projection (the vision tower's), cos / sin of
    (S, D) fp32 angles (the half-width angles repeated), the chunks' int32 offsets."""
    g = torch.Generator().manual_seed(seed)
    s = sum(lengths)
    qkv = torch.randn(s, 3, h, d, generator=g).to(dtype).to(DEVICE)
    angles = torch.randn(s, d // 2, generator=g) * 20
    angles = torch.cat([angles, angles], -1).to(DEVICE)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return *qkv.unbind(1), angles.cos(), angles.sin(), offsets


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("lengths,h,d", [([64, 64, 16, 64], 2, 80), ([5, 64, 1, 33], 3, 72), ([64] * 3, 1, 128),
                                         ([17], 2, 32)], ids=lambda x: str(x))
def test_window_attention_matches_reference(lengths, h, d, dtype):
    q, k, v, cos, sin, offsets = inputs(lengths, h, d, dtype)
    assert not q.is_contiguous()
    scale = d**-0.5
    out = window_attention(q, k, v, offsets, scale, cos, sin)
    ref = window_attention_reference(q.float(), k.float(), v.float(), offsets, scale, cos, sin)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), ref, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    plain = window_attention(q, k, v, offsets, scale)  # no rotary embedding
    plain_ref = window_attention_reference(q.float(), k.float(), v.float(), offsets, scale)
    torch.testing.assert_close(plain.float(), plain_ref, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    assert not torch.allclose(plain.float(), ref, atol=1e-2)  # the rotary embedding changed something


def test_attention_stays_inside_each_chunk():
    """A change to one chunk's keys leaves every other chunk's rows alone, bit for bit."""
    q, k, v, cos, sin, offsets = inputs([16, 64, 9, 40], 2, 32, torch.float16, seed=1)
    out = window_attention(q, k, v, offsets, 0.2, cos, sin)
    k2 = k.clone()
    k2[20] += 1.0  # a key of the second chunk, [16, 80)
    out2 = window_attention(q, k2, v, offsets, 0.2, cos, sin)
    assert torch.equal(out2[:16], out[:16]) and torch.equal(out2[80:], out[80:])
    assert not torch.allclose(out2[16:80], out[16:80])


def test_reference_is_per_chunk_softmax_attention():
    """The reference written out by hand for one chunk without a rotary embedding."""
    q, k, v, _, _, offsets = inputs([7, 5], 1, 16, torch.float64)
    out = window_attention_reference(q, k, v, offsets, 0.3)
    a, b = 7, 12
    weights = torch.softmax(q[a:b, 0] @ k[a:b, 0].T * 0.3, dim=-1)
    torch.testing.assert_close(out[a:b, 0], weights @ v[a:b, 0])


@pytest.mark.parametrize("change", ["odd-dim", "fp32", "mixed-dtypes", "shape", "offsets-dtype", "one-of-cos-sin",
                                    "cos-shape"])
def test_unsupported_inputs(change):
    q, k, v, cos, sin, offsets = inputs([8, 8], 2, 16, torch.float16)
    args = {"q": q, "k": k, "v": v, "offsets": offsets, "cos": cos, "sin": sin}
    assert supported(**args)
    if change == "odd-dim":
        args.update(q=q[..., :15], k=k[..., :15], v=v[..., :15], cos=cos[:, :15], sin=sin[:, :15])
    elif change == "fp32":  # its products in fp32 need twice the shared memory an H200 has
        args.update(q=q.float(), k=k.float(), v=v.float())
    elif change == "mixed-dtypes":
        args.update(k=k.bfloat16())
    elif change == "shape":
        args.update(v=v[:, :1])
    elif change == "offsets-dtype":
        args.update(offsets=offsets.long())
    elif change == "one-of-cos-sin":
        args.update(sin=None)
    else:
        args.update(cos=cos[:, :8], sin=sin[:, :8])
    assert not supported(**args)
    with pytest.raises((TypeError, ValueError)):
        window_attention(args["q"], args["k"], args["v"], args["offsets"], 0.25, args["cos"], args["sin"])


def test_max_chunk_is_the_vision_windows():
    """Qwen2.5-VL's windows: 112 pixels, patches of 14: 8 x 8 patches."""
    assert MAX_CHUNK == (112 // 14) ** 2
