"""The vision tower's batched attention (models.vision) against per-chunk SDPA and the stock modules."""

import pytest
import torch
import torch.nn.functional as F

import models.fused as fused_module
import models.vision as vision
from models.tiny import FAMILIES, build_config, build_tokenizer, model_class


def per_chunk_reference(q, k, v, cu_seqlens, scale):
    """What transformers' vision attention computes: one SDPA call per chunk."""
    out = []
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue
        qc, kc, vc = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
        out.append(F.scaled_dot_product_attention(qc, kc, vc, scale=scale)[0].transpose(0, 1))
    return torch.cat(out)


def packed(lengths, heads=3, dim=16, seed=0):
    """q, k, v as strided (S, H, D) views of one (S, 3, H, D) projection, like the vision tower's."""
    g = torch.Generator().manual_seed(seed)
    s = sum(lengths)
    qkv = torch.randn(s, 3, heads, dim, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return *qkv.permute(1, 0, 2, 3).unbind(0), cu


def tiny_model(family, device="cpu", **vision_config):
    """A small model of `family` (vision tower on SDPA), eval mode, fixed seed."""
    config = build_config(family, build_tokenizer())
    for key, value in vision_config.items():
        setattr(config.vision_config, key, value)
    torch.manual_seed(0)
    model = model_class(family)._from_config(
        config, attn_implementation={"text_config": "sdpa", "vision_config": "sdpa"}
    )
    return model.eval().to(device), config


def video_pixels(config, grid, device="cpu"):
    """Random flattened patches for videos of `grid` rows (frames / 2, patch rows, patch columns)."""
    p = config.vision_config.patch_size
    return torch.randn(int(grid.prod(-1).sum()), 3 * 2 * p * p, device=device)


@pytest.mark.parametrize("lengths", [[64] * 5, [16, 8, 16, 8, 4, 16], [7], [0, 12, 0, 12, 5, 0]],
                         ids=["uniform", "interleaved", "one", "empty-chunks"])
def test_chunked_attention_matches_per_chunk_sdpa(lengths):
    q, k, v, cu = packed(lengths)
    assert not q.is_contiguous()
    out = vision.chunked_attention(q, k, v, cu, 0.25)
    ref = per_chunk_reference(q, k, v, cu, 0.25)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # Attention stays inside the chunks: changing one chunk's keys leaves the others' rows alone.
    bounds = cu.tolist()
    first = next(i for i in range(len(bounds) - 1) if bounds[i + 1] > bounds[i])
    a, b = bounds[first], bounds[first + 1]
    k2 = k.clone()
    k2[a] += 1.0  # one key (a shift of all of them would leave the softmax unchanged)
    out2 = vision.chunked_attention(q, k2, v, cu, 0.25)
    torch.testing.assert_close(out2[b:], out[b:], rtol=0, atol=0)
    if b - a > 1:
        assert not torch.allclose(out2[a:b], out[a:b])


def test_chunks_of_unequal_lengths_are_gathered_in_bounded_pieces(monkeypatch):
    """Chunks of one length go to SDPA at most GATHER_TOKENS tokens at a time (at least one chunk):
    the same result as all at once."""
    lengths = [16, 8, 16, 8, 4, 16, 16, 40]
    q, k, v, cu = packed(lengths)
    whole = vision.chunked_attention(q, k, v, cu, 0.25)
    batches = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(vision.F, "scaled_dot_product_attention",
                        lambda q, *a, **kw: batches.append(tuple(q.shape[:3:2])) or sdpa(q, *a, **kw))
    monkeypatch.setattr(vision, "GATHER_TOKENS", 33)
    pieces = vision.chunked_attention(q, k, v, cu, 0.25)
    # (chunks, tokens per chunk) per call: 2 of 8 fit 33 tokens, 2 of 16 (of 4), 1 of 40 (alone)
    assert sorted(batches) == [(1, 4), (1, 40), (2, 8), (2, 16), (2, 16)]
    torch.testing.assert_close(pieces, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pieces, per_chunk_reference(q, k, v, cu, 0.25), rtol=1e-12, atol=1e-12)


def test_chunked_attention_reads_each_cu_seqlens_once():
    """A tower hands every layer the same cu_seqlens: it is read on the host once, and a new tensor
    or an in-place change is read again (never a stale layout)."""
    q, k, v, cu = packed([16, 8, 16, 8, 4])
    reads = []
    real = cu.tolist
    cu.tolist = lambda: reads.append(1) or real()
    first = vision.chunked_attention(q, k, v, cu, 0.25)
    second = vision.chunked_attention(q, k, v, cu, 0.25)
    assert len(reads) == 1
    torch.testing.assert_close(first, per_chunk_reference(q, k, v, cu.clone(), 0.25), rtol=1e-12, atol=1e-12)
    assert torch.equal(first, second)
    cu[1:3] = torch.tensor([8, 24], dtype=cu.dtype)  # other chunks, same tensor: its version changed
    moved = vision.chunked_attention(q, k, v, cu, 0.25)
    assert len(reads) == 2
    torch.testing.assert_close(moved, per_chunk_reference(q, k, v, cu.clone(), 0.25), rtol=1e-12, atol=1e-12)
    with torch.inference_mode():  # inference tensors have no version counter: a new tensor each forward
        for lengths in ([8, 16, 8, 16, 4], [4, 16, 8, 16, 8]):
            fresh = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
            out = vision.chunked_attention(q, k, v, fresh, 0.25)
            torch.testing.assert_close(out, per_chunk_reference(q, k, v, fresh, 0.25), rtol=1e-12, atol=1e-12)


def test_varlen_kernel_gets_the_nonempty_chunk_bounds(monkeypatch):
    """Where the variable-length kernel runs, it gets the bounds without empty chunks (int32, on
    q's device) and the longest chunk; here a per-chunk stand-in for the kernel checks the result."""
    lengths = [0, 12, 0, 12, 5, 0, 30, 0]
    q, k, v, cu = packed(lengths)
    calls = []

    def stand_in(q, k, v, offsets, longest, scale):
        calls.append((offsets.tolist(), offsets.dtype, offsets.device, longest))
        return per_chunk_reference(q, k, v, offsets, scale)

    monkeypatch.setattr(vision, "_takes_varlen_flash", lambda q, k, v: True)
    monkeypatch.setattr(vision, "_varlen_flash", stand_in)
    out = vision.chunked_attention(q, k, v, cu, 0.25)
    assert calls == [([0, 12, 24, 29, 59], torch.int32, q.device, 30)]
    torch.testing.assert_close(out, per_chunk_reference(q, k, v, cu, 0.25), rtol=1e-12, atol=1e-12)


def test_varlen_kernel_is_not_used_on_the_cpu():
    q, k, v, _ = packed([8, 8], heads=2, dim=16)
    assert not vision._takes_varlen_flash(q.half(), k.half(), v.half())


@pytest.mark.parametrize("cu", [[0, 4, 9], [1, 10], [0, 6, 3, 10], [0]], ids=["short", "start", "falling", "single"])
def test_chunked_attention_rejects_bad_boundaries(cu):
    q, k, v, _ = packed([10])
    with pytest.raises(ValueError, match="cu_seqlens"):
        vision.chunked_attention(q, k, v, torch.tensor(cu), 1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_vision_tower_matches_stock(family, monkeypatch):
    """The whole vision tower of a small model: same output with and without batching, over two
    videos whose grids give windows and frames of several lengths."""
    model, config = tiny_model(family)
    grid = torch.tensor([[2, 10, 14], [4, 6, 6]])
    pixels = video_pixels(config, grid)
    seen = []

    def spy(q, k, v, cu_seqlens, scale):
        seen.append(sorted(set((cu_seqlens[1:] - cu_seqlens[:-1]).tolist())))
        return chunked(q, k, v, cu_seqlens, scale)

    chunked = vision.chunked_attention
    monkeypatch.setattr(vision, "chunked_attention", spy)
    with torch.no_grad():
        stock = model.model.visual(pixels, grid_thw=grid).last_hidden_state
        assert vision.batch_vision_attention(model) == config.vision_config.depth
        assert vision.batch_vision_attention(model) == config.vision_config.depth  # twice: no double wrap
        batched = model.model.visual(pixels, grid_thw=grid).last_hidden_state
        assert len(seen) == config.vision_config.depth
        assert all(len(lengths) > 1 for lengths in seen)  # chunks of several lengths in every layer
        assert vision.batch_vision_attention(model, enabled=False) == 0
        restored = model.model.visual(pixels, grid_thw=grid).last_hidden_state
    assert len(seen) == config.vision_config.depth  # the restored modules no longer call it
    torch.testing.assert_close(batched, stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(restored, stock, rtol=0, atol=0)


def test_fused_window_kernel_in_the_tower(monkeypatch):
    """Qwen2.5-VL's windowed layers through kernels.window_attention (on the CPU here, under
    Triton's interpreter; on CUDA in the product), in fp16: the tower's output is that of the
    rotary embedding and then SDPA per chunk length, within fp16 rounding. Its full-attention layer,
    whose chunks are whole frames, keeps that path."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, config = tiny_model("qwen2.5-vl", device)
    model = model.half()
    vision.prepare_vision_tower(model)
    grid = torch.tensor([[2, 10, 14], [4, 6, 6]], device=device)
    pixels = video_pixels(config, grid, device).half()
    calls = []
    kernel = vision.window_attention
    monkeypatch.setattr(vision, "window_attention", lambda *a: calls.append(a[3].tolist()) or kernel(*a))
    monkeypatch.setattr(vision, "_windows_here", lambda q: True)
    with torch.no_grad():
        fused = model.model.visual(pixels, grid_thw=grid).last_hidden_state
        monkeypatch.setattr(vision, "FUSED_WINDOWS", False)
        plain = model.model.visual(pixels, grid_thw=grid).last_hidden_state
    assert len(calls) == 1  # layer 0 (windowed); layer 1 (fullatt_block_indexes) attends over frames
    lengths = [b - a for a, b in zip(calls[0], calls[0][1:])]
    assert max(lengths) <= vision.MAX_CHUNK and len(set(lengths)) > 1  # whole and edge windows
    torch.testing.assert_close(fused.float(), plain.float(), rtol=1e-2, atol=1e-2)


def test_window_kernel_out_of_shared_memory_falls_back(monkeypatch):
    """On a GPU with less shared memory than the window kernel holds, Triton raises OutOfResources:
    the layer runs the unfused path, and later calls on that device no longer try the kernel."""
    from triton.runtime.errors import OutOfResources

    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the kernel runs (the interpreter on CPU)
    model, config = tiny_model("qwen2.5-vl", device)
    model = model.half()
    vision.prepare_vision_tower(model)
    grid = torch.tensor([[2, 10, 14]], device=device)
    pixels = video_pixels(config, grid, device).half()
    tries = []

    def too_big(*args):
        tries.append(1)
        raise OutOfResources(131072, 101376, "shared memory")

    monkeypatch.setattr(vision, "_windows_here", lambda q: True)
    monkeypatch.setattr(vision, "_NO_WINDOWS", {})
    with torch.no_grad():
        monkeypatch.setattr(vision, "FUSED_WINDOWS", False)
        plain = model.model.visual(pixels, grid_thw=grid).last_hidden_state
        monkeypatch.setattr(vision, "FUSED_WINDOWS", True)
        monkeypatch.setattr(vision, "window_attention", too_big)
        first = model.model.visual(pixels, grid_thw=grid).last_hidden_state
        second = model.model.visual(pixels, grid_thw=grid).last_hidden_state
    assert len(tries) == 1 and list(vision._NO_WINDOWS) == [str(pixels.device)]
    assert torch.equal(first, plain) and torch.equal(second, plain)


def test_other_attention_implementations_are_left_alone():
    config = build_config("qwen2.5-vl", build_tokenizer())
    model = model_class("qwen2.5-vl")._from_config(
        config, attn_implementation={"text_config": "sdpa", "vision_config": "eager"}
    )
    assert vision.batch_vision_attention(model) == 0


@pytest.mark.cuda
@pytest.mark.parametrize("varlen", [True, False], ids=["varlen-flash", "sdpa"])
@pytest.mark.parametrize("lengths,dim", [([64] * 48, 80), ([64, 32, 64, 32, 16] * 8 + [1024, 1024], 80),
                                         ([0, 64, 0, 36, 64, 16, 0], 72)], ids=["windows", "mixed", "empty-72"])
def test_chunked_attention_cuda_bf16(lengths, dim, varlen, monkeypatch):
    """On the GPU, the variable-length flash kernel (or SDPA, which may pick another backend for
    the batch than for one chunk): the error against fp64 stays within twice that of per-chunk SDPA
    in bf16. 16 heads of 80 (Qwen2.5-VL) or of 72 (Qwen3-VL)."""
    monkeypatch.setattr(vision, "VARLEN_FLASH", varlen)
    kernel = vision._varlen_flash
    calls = []
    monkeypatch.setattr(vision, "_varlen_flash", lambda *a: calls.append(1) or kernel(*a))
    q, k, v, cu = packed(lengths, heads=16, dim=dim, seed=1)
    exact = per_chunk_reference(q, k, v, cu, dim**-0.5)
    q, k, v, cu = (x.cuda() for x in (q, k, v, cu))
    q16, k16, v16 = (x.to(torch.bfloat16) for x in (q, k, v))
    out = vision.chunked_attention(q16, k16, v16, cu, dim**-0.5)
    assert len(calls) == varlen
    per_chunk = per_chunk_reference(q16, k16, v16, cu, dim**-0.5)
    assert out.dtype == torch.bfloat16 and out.shape == q16.shape
    error = (out.double().cpu() - exact).abs().max().item()
    assert error <= 2 * (per_chunk.double().cpu() - exact).abs().max().item() + 1e-3
    # fp32 (a tower not cast to bf16) is not the flash kernel's: SDPA per length, close to exact
    out32 = vision.chunked_attention(q.float(), k.float(), v.float(), cu, dim**-0.5)
    assert len(calls) == varlen
    torch.testing.assert_close(out32.double().cpu(), exact, rtol=1e-3, atol=1e-3)


def test_aligned_mlp_width_keeps_the_function():
    """A Qwen2.5-VL vision MLP width of 100 (the real 3420 is not a multiple of 64 either) padded
    to 128 gives the same tower output; cutting back restores the modules and the output exactly."""
    model, config = tiny_model("qwen2.5-vl", intermediate_size=100)
    grid = torch.tensor([[2, 6, 8]])
    pixels = video_pixels(config, grid)
    mlp = model.model.visual.blocks[0].mlp
    with torch.no_grad():
        stock = model.model.visual(pixels, grid_thw=grid).last_hidden_state
        assert vision.align_mlp_width(model) == config.vision_config.depth
        assert vision.align_mlp_width(model) == config.vision_config.depth  # twice: padded once
        assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (128, 128, 128)
        assert mlp.up_proj.weight[100:].abs().sum() == 0 and mlp.down_proj.weight[:, 100:].abs().sum() == 0
        padded = model.model.visual(pixels, grid_thw=grid).last_hidden_state
        assert vision.align_mlp_width(model, enabled=False) == 0
        assert (mlp.gate_proj.out_features, mlp.down_proj.in_features) == (100, 100)
        restored = model.model.visual(pixels, grid_thw=grid).last_hidden_state
    torch.testing.assert_close(padded, stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(restored, stock, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl"])
def test_ungated_mlps_are_left_alone(family):
    """Qwen2-VL's and Qwen3-VL's vision MLPs are fc1 -> act -> fc2 (widths 5120 and 4304 on the
    real models, both aligned): not padded."""
    model, _ = tiny_model(family)
    before = [tuple(p.shape) for p in model.parameters()]
    assert vision.align_mlp_width(model, multiple=256) == 0
    assert [tuple(p.shape) for p in model.parameters()] == before


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_norms_and_patch_matmul_keep_the_function(family):
    """RMSNorms through F.rms_norm (Qwen2.5-VL's; the others use LayerNorm) and the patch
    embedding's Conv3d as a matmul: the same tower output; undone, the stock output exactly."""
    model, config = tiny_model(family)
    grid = torch.tensor([[2, 6, 8]])
    pixels = video_pixels(config, grid)
    norms = 2 * config.vision_config.depth + 1 if family == "qwen2.5-vl" else 0  # two per block, the merger's
    with torch.no_grad():
        stock = model.model.visual(pixels, grid_thw=grid).last_hidden_state
        assert vision.fuse_norms(model) == norms
        assert vision.patch_embed_as_matmul(model) == 1
        assert vision.patch_embed_as_matmul(model) == 1  # twice: patched once
        prepared = model.model.visual(pixels, grid_thw=grid).last_hidden_state
        assert vision.fuse_norms(model, enabled=False) == 0
        assert vision.patch_embed_as_matmul(model, enabled=False) == 0
        restored = model.model.visual(pixels, grid_thw=grid).last_hidden_state
    torch.testing.assert_close(prepared, stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(restored, stock, rtol=0, atol=0)
    conv = model.model.visual.patch_embed.proj
    x = torch.randn(3, *conv.weight.shape[1:2], *conv.kernel_size)
    torch.testing.assert_close(vision._patch_matmul_forward(conv, x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_block_adds_keep_the_function(family, monkeypatch):
    """Qwen2.5-VL's blocks (RMSNorms) run their middle add and norm2 through kernels.rms_norm (on
    the CPU here, under Triton's interpreter; on CUDA in the product): the same tower output;
    undone, the stock output exactly. The other families' blocks (LayerNorms) are left alone."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, config = tiny_model(family, device)
    grid = torch.tensor([[2, 6, 8]], device=device)
    pixels = video_pixels(config, grid, device)
    calls = []
    kernel = fused_module.add_rms_norm
    monkeypatch.setattr(fused_module, "add_rms_norm", lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k))
    monkeypatch.setattr(vision, "_add_norm_here", lambda x: True)
    depth = config.vision_config.depth if family == "qwen2.5-vl" else 0
    with torch.no_grad():
        stock = model.model.visual(pixels, grid_thw=grid).last_hidden_state
        assert vision.fuse_block_adds(model) == depth
        assert vision.fuse_block_adds(model) == depth  # twice: patched once
        fused = model.model.visual(pixels, grid_thw=grid).last_hidden_state
        assert vision.fuse_block_adds(model, enabled=False) == 0
        restored = model.model.visual(pixels, grid_thw=grid).last_hidden_state
    assert len(calls) == depth
    torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(restored, stock, rtol=0, atol=0)


def test_mlp_adds_its_product_into_the_residual(monkeypatch):
    """With the whole tower prepared, each Qwen2.5-VL block's last residual add is done by the MLP's
    down projection adding into the sum that carries its bias (models.fused.add_into; on the CPU
    here, under Triton's interpreter): the tower's output is that of the prepared tower with the
    blocks as transformers wrote them, and the one with that add separate (ACCUMULATE_MLP False),
    within fp32 rounding. (Not the stock tower's on CUDA: its patch embedding is a cuDNN
    convolution, which may run in TF32.)"""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, config = tiny_model("qwen2.5-vl", device)
    grid = torch.tensor([[2, 6, 8], [2, 4, 4]], device=device)
    pixels = video_pixels(config, grid, device)
    assert all(block.mlp.down_proj.bias is not None for block in model.model.visual.blocks)
    vision.prepare_vision_tower(model)
    with torch.no_grad():
        vision.fuse_block_adds(model, enabled=False)
        stock = model.model.visual(pixels, grid_thw=grid).last_hidden_state
        vision.fuse_block_adds(model)
    calls = []
    add_into = fused_module.add_into
    monkeypatch.setattr(fused_module, "add_into", lambda *a: calls.append(1) or add_into(*a))
    monkeypatch.setattr(vision, "_add_norm_here", lambda x: True)
    monkeypatch.setattr(fused_module, "_accumulates_here", lambda x: True)
    monkeypatch.setattr(fused_module, "MLP_CHUNK_BYTES", 2 * 2 * 64 * 4 * 10)  # chunks of 10 tokens: several per MLP
    with torch.no_grad():
        accumulated = model.model.visual(pixels, grid_thw=grid).last_hidden_state
        monkeypatch.setattr(vision, "ACCUMULATE_MLP", False)
        separate = model.model.visual(pixels, grid_thw=grid).last_hidden_state
    assert len(calls) == config.vision_config.depth
    torch.testing.assert_close(accumulated, stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(accumulated, separate, rtol=1e-5, atol=1e-5)


def test_fused_block_add_falls_back_where_the_kernel_does_not_take_the_input(monkeypatch):
    """Where `kernels.rms_norm.supported` declines the block's tensors, the block computes the stock
    way from the attention's output (not running the attention twice): the stock output exactly."""
    model, config = tiny_model("qwen2.5-vl")
    grid = torch.tensor([[2, 6, 8]])
    pixels = video_pixels(config, grid)
    attention_calls = []
    for block in model.model.visual.blocks:
        block.attn.register_forward_hook(lambda *_: attention_calls.append(1))
    monkeypatch.setattr(vision, "_add_norm_here", lambda x: True)
    monkeypatch.setattr(fused_module, "add_norm_supported", lambda *a, **k: False)
    monkeypatch.setattr(fused_module, "add_rms_norm", lambda *a, **k: pytest.fail("kernel called"))
    with torch.no_grad():
        stock = model.model.visual(pixels, grid_thw=grid).last_hidden_state
        vision.fuse_block_adds(model)
        fused = model.model.visual(pixels, grid_thw=grid).last_hidden_state
    assert len(attention_calls) == 2 * config.vision_config.depth  # once per block in each run
    torch.testing.assert_close(fused, stock, rtol=0, atol=0)


def test_prepare_vision_tower_on_the_demo_model():
    """The loader prepares the tower: batched attention in every block, fused norms, the patch
    matmul, nothing to pad (width 128)."""
    from models import load

    model, _ = load("demo", attention="dense", device="cpu")
    depth = model.config.vision_config.depth
    assert vision.prepare_vision_tower(model) == {"batched_attention": depth, "padded_mlps": 0,
                                                  "fused_norms": 2 * depth + 1, "fused_adds": depth,
                                                  "patch_matmul": 1,
                                                  "fused_mlps": depth}
    assert set(vision.prepare_vision_tower(model, enabled=False).values()) == {0}


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_reference_is_the_modeling_files_rotary_embedding(family):
    """kernels.rope's reference computes what each family's vision attention calls, bit for bit."""
    import sys

    from kernels.rope import rope_reference

    module = sys.modules[model_class(family).__module__]
    q, k, _, _ = packed([30], heads=2, dim=80)
    q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
    angles = torch.randn(30, 40) * 20
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    for ours, theirs in zip(rope_reference(q, k, cos, sin), module.apply_rotary_pos_emb_vision(q, k, cos, sin)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_prepared_tower_cuda_bf16(family):
    """On the GPU in bf16 (fused rotary embedding, the window kernel in Qwen2.5-VL's windowed layers,
    variable-length flash attention, padded MLPs):
    the prepared tower's error against the tower in fp32 is within twice the stock bf16 tower's."""
    import copy

    config = build_config(family, build_tokenizer())
    if family == "qwen2.5-vl":
        config.vision_config.intermediate_size = 100  # padded to 128, as 3420 is to 3456
    torch.manual_seed(0)
    model = model_class(family)._from_config(
        config, attn_implementation={"text_config": "sdpa", "vision_config": "sdpa"}
    ).eval().cuda()
    p = config.vision_config.patch_size
    grid = torch.tensor([[2, 10, 14], [4, 6, 6]], device="cuda")
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * p * p, device="cuda")
    with torch.no_grad():
        exact = model.model.visual(pixels, grid_thw=grid).last_hidden_state.double()
        model16 = copy.deepcopy(model).to(torch.bfloat16)
        stock = model16.model.visual(pixels, grid_thw=grid).last_hidden_state.double()
        vision.prepare_vision_tower(model16)
        prepared = model16.model.visual(pixels, grid_thw=grid).last_hidden_state.double()
    stock_error = ((stock - exact).norm() / exact.norm()).item()
    prepared_error = ((prepared - exact).norm() / exact.norm()).item()
    assert 0 < prepared_error <= 2 * stock_error + 1e-3
