"""The language model's fused RMSNorms, rotary embedding and MLP activations (models.text, models.fused)."""

import copy
import sys

import pytest
import torch

import models.fused as fused
from models.text import fused_adds_at_every_length, prepare_language_model
from models.tiny import FAMILIES, build_config, build_tokenizer, model_class


def tiny_model(family, device="cpu"):
    config = build_config(family, build_tokenizer())
    torch.manual_seed(0)
    model = model_class(family)._from_config(config, attn_implementation={"text_config": "sdpa",
                                                                          "vision_config": "sdpa"})
    return model.eval().to(device), config


@pytest.fixture
def stock_rope_functions(monkeypatch):
    """The modeling files' apply_rotary_pos_emb as transformers wrote them for the test (a model
    loaded earlier in the process may have replaced them: the replacement is module-level), and
    back as they were after it."""
    for family in FAMILIES:
        modeling = sys.modules[model_class(family).__module__]
        stock = getattr(modeling, "_videoprefill_stock_apply_rotary_pos_emb", None)
        if stock is not None:
            monkeypatch.setattr(modeling, "apply_rotary_pos_emb", stock)
            monkeypatch.delattr(modeling, "_videoprefill_stock_apply_rotary_pos_emb")


def text_forward(model, ids):
    with torch.no_grad():
        return model.model.language_model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_prepared_language_model_keeps_the_function(family, stock_rope_functions):
    """Fused RMSNorms (two per layer, the final one, and Qwen3-VL's q / k norms) give the same
    hidden states; the MLPs, the rotary embedding and the layers' residual adds are recognised but
    run their stock code on CPU; undone, the stock modules and function and the stock output
    exactly."""
    model, config = tiny_model(family)
    text = config.text_config
    ids = torch.randint(0, text.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    norms = 2 * text.num_hidden_layers + 1 + (2 * text.num_hidden_layers if family == "qwen3-vl" else 0)
    modeling = sys.modules[type(model).__module__]
    stock_rope = modeling.apply_rotary_pos_emb
    stock = text_forward(model, ids)
    layers = text.num_hidden_layers
    counts = {"fused_norms": norms, "fused_mlps": layers, "fused_rope": layers, "fused_adds": layers,
              "one_token_gemvs": 7 * layers + 1}  # q, k, v, o, gate, up, down and the head
    assert prepare_language_model(model) == counts
    assert prepare_language_model(model) == counts  # twice: once
    assert modeling.apply_rotary_pos_emb is not stock_rope
    prepared = text_forward(model, ids)
    assert set(prepare_language_model(model, enabled=False).values()) == {0}
    assert modeling.apply_rotary_pos_emb is stock_rope
    restored = text_forward(model, ids)
    torch.testing.assert_close(prepared, stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(restored, stock, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_layer_adds_keep_the_function(family, monkeypatch):
    """Each decoder layer's add after the attention and the RMSNorm after it as one kernel, and its
    add after the MLP inside the MLP's down projection (on the CPU here, under Triton's interpreter):
    the prepared language model's output without them, within fp32 rounding. Inputs below
    FUSED_ADDS_MIN_TOKENS keep the stock layer."""
    import models.text as text_module

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, config = tiny_model(family, device)
    layers = config.text_config.num_hidden_layers
    ids = torch.randint(0, config.text_config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(2))
    prepare_language_model(model)
    calls = []
    add_into = fused.add_into
    monkeypatch.setattr(fused, "add_into", lambda *a: calls.append(a[1].shape) or add_into(*a))
    monkeypatch.setattr(text_module, "_add_norm_here", lambda x: True)
    monkeypatch.setattr(fused, "_accumulates_here", lambda x: True)
    monkeypatch.setattr(text_module, "FUSED_ADDS_MIN_TOKENS", 2 * 37)
    ids = ids.to(device)
    fused_out = text_forward(model, ids)
    assert len(calls) == layers and all(shape == (2 * 37, config.text_config.hidden_size) for shape in calls)
    text_forward(model, ids[:1])  # 37 tokens: below the threshold
    assert len(calls) == layers
    assert text_module.fuse_layer_adds(model, enabled=False) == 0
    plain = text_forward(model, ids)
    torch.testing.assert_close(fused_out, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_token_projections_as_gemvs_keep_the_function(family, monkeypatch):
    """Inside one_token_gemvs, a token's forward (the head's logits) runs its projections as
    kernels.gemv launches (here under Triton's interpreter): per layer one for q, k and v, one for o,
    gate and up with the activation in one, one for down; one for the head. The same logits within
    fp32 rounding; no result left waiting after the block; outside it, no launch."""
    import kernels.gemv as gemv_module

    model, config = tiny_model(family)
    layers = config.text_config.num_hidden_layers
    prepare_language_model(model)
    launches = []
    for name in ("gemv", "gated_gemv"):
        kernel = getattr(gemv_module, name)
        monkeypatch.setattr(gemv_module, name, lambda *a, _k=kernel, _n=name, **kw: launches.append(
            (_n, len(a[1]) if _n == "gemv" else 2)) or _k(*a, **kw))
    ids = torch.tensor([[5]])
    with torch.no_grad():
        stock = model(input_ids=ids).logits
        assert launches == []
        with fused.one_token_gemvs():
            ours = model(input_ids=ids).logits
    assert launches.count(("gemv", 3)) == layers and launches.count(("gated_gemv", 2)) == layers
    assert launches.count(("gemv", 1)) == 2 * layers + 1 and len(launches) == 4 * layers + 1
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    assert not any(fused.PENDING in m.__dict__ for m in model.modules())
    with torch.no_grad(), fused.one_token_gemvs():
        model(input_ids=torch.tensor([[5, 6]]))  # two tokens: cuBLAS
    assert len(launches) == 4 * layers + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_one_token_layers_run_their_norms_and_adds_inside_the_gemvs(family, monkeypatch):
    """Inside one_token_gemvs with the fused adds (a captured decoding step; here under Triton's
    interpreter), a token's decoder layers run no norm and no add of their own: the input norm in
    the q, k, v launch, the residual in o's, the post-attention norm in gate and up's, the last add
    in down's. The stock model's logits within fp32 rounding, as with NORMS_IN_GEMVS off (where
    add_rms_norm and the input norms run)."""
    import models.text as text_module

    model, config = tiny_model(family)
    layers = config.text_config.num_hidden_layers
    prepare_language_model(model)
    monkeypatch.setattr(text_module, "_add_norm_here", lambda x: True)
    monkeypatch.setattr(fused, "_accumulates_here", lambda x: True)
    norms = []
    for layer in fused.tower(model, "language_model").layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.register_forward_hook(lambda *a: norms.append(1))
    add_norms = []
    add_rms_norm = fused.add_rms_norm
    monkeypatch.setattr(fused, "add_rms_norm", lambda *a, **k: add_norms.append(1) or add_rms_norm(*a, **k))
    ids = torch.tensor([[5]])
    with torch.no_grad():
        stock = model(input_ids=ids).logits
        norms.clear()
        for inside in (True, False):
            monkeypatch.setattr(text_module, "NORMS_IN_GEMVS", inside)
            with fused.one_token_gemvs(), text_module.fused_adds_at_every_length():
                ours = model(input_ids=ids).logits
            torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
            assert (len(norms), len(add_norms)) == ((0, 0) if inside else (layers, layers))
    assert not any(fused.PENDING in m.__dict__ or fused.RESIDUAL in m.__dict__ for m in model.modules())


def test_an_attention_projecting_another_input_raises(monkeypatch):
    """The q, k, v results a layer computes from its normalised input are for the input it gives its
    attention: an attention projecting anything else gets an error, not a wrong answer."""
    import models.text as text_module

    model, _ = tiny_model("qwen2.5-vl")
    prepare_language_model(model)
    monkeypatch.setattr(text_module, "_add_norm_here", lambda x: True)
    monkeypatch.setattr(fused, "_accumulates_here", lambda x: True)
    attention = fused.tower(model, "language_model").layers[1].self_attn
    forward = attention.forward
    monkeypatch.setattr(attention, "forward", lambda hidden_states, **kw: forward(hidden_states * 1.0, **kw))
    with torch.no_grad(), fused.one_token_gemvs(), text_module.fused_adds_at_every_length():
        with pytest.raises(RuntimeError, match="another input"):
            model(input_ids=torch.tensor([[5]]))
    assert not any(fused.PENDING in m.__dict__ for m in model.modules())


def test_only_silu_gated_mlps_are_fused():
    model, _ = tiny_model("qwen2.5-vl")
    mlp = copy.deepcopy(model.model.language_model.layers[0].mlp)
    assert fused.is_silu_gated_mlp(mlp)
    mlp.act_fn = torch.nn.GELU()
    assert not fused.is_silu_gated_mlp(mlp)
    # Qwen2-VL's vision MLP is fc1 -> act -> fc2: not gated.
    other, _ = tiny_model("qwen2-vl")
    assert fused.fuse_mlp_activations(other.model.visual) == 0


def test_the_loader_prepares_the_language_model():
    from models import load

    model, _ = load("demo", attention="dense", device="cpu")
    layers = model.config.text_config.num_hidden_layers
    forwards = [m.forward for m in model.model.language_model.layers[0].modules()
                if hasattr(m.forward, "__func__")]
    assert any(f.__func__ is fused._rms_norm_forward for f in forwards)
    assert any(f.__func__ is fused._fused_mlp_forward for f in forwards)
    assert prepare_language_model(model) == {"fused_norms": 2 * layers + 1, "fused_mlps": layers,
                                             "fused_rope": layers, "fused_adds": layers,
                                             "one_token_gemvs": 7 * layers + 1}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("tower", ["language_model", "visual"])  # down_proj without and with a bias
def test_long_inputs_go_through_the_mlp_in_chunks(device, tower, monkeypatch):
    """Over more tokens than fit MLP_CHUNK_BYTES the MLP runs chunk by chunk (its hidden width never
    held for every token), its output written in place: the same output, each token's depending on
    that token alone."""
    model, config = tiny_model("qwen2.5-vl", device=device)
    layer = model.model.language_model.layers[0] if tower == "language_model" else model.model.visual.blocks[0]
    mlp = copy.deepcopy(layer.mlp)
    assert (mlp.down_proj.bias is not None) == (tower == "visual")
    if device == "cuda":
        mlp = mlp.to(torch.bfloat16)
    x = torch.randn(2, 37, mlp.gate_proj.in_features, device=device, dtype=mlp.gate_proj.weight.dtype)
    with torch.no_grad():
        assert fused.fuse_mlp_activations(mlp) == 1
        whole = mlp(x)
        width = mlp.gate_proj.out_features
        monkeypatch.setattr(fused, "MLP_CHUNK_BYTES", 10 * 2 * width * x.dtype.itemsize + 1)
        rows = []
        mlp.gate_proj.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
        chunked = mlp(x)
    assert rows == [10] * 7 + [4]  # 74 tokens
    assert fused.chunk_tokens(width, x.dtype) == 10
    assert chunked.shape == whole.shape
    tolerance = 1e-2 if device == "cuda" else 1e-6
    torch.testing.assert_close(chunked, whole, rtol=tolerance, atol=tolerance)


@pytest.mark.cuda
def test_fused_mlp_cuda_bf16():
    """On the GPU in bf16: the fused activation's MLP output is within one bf16 rounding of the
    MLP computed in fp32, and no worse than the stock bf16 MLP."""
    model, config = tiny_model("qwen2.5-vl", device="cuda")
    mlp = model.model.language_model.layers[0].mlp
    x = torch.randn(3, 257, config.text_config.hidden_size, device="cuda")
    with torch.no_grad():
        exact = mlp(x).double()
        mlp16 = copy.deepcopy(mlp).to(torch.bfloat16)
        stock = mlp16(x.to(torch.bfloat16)).double()
        assert fused.fuse_mlp_activations(mlp16) == 1
        prepared = mlp16(x.to(torch.bfloat16)).double()
    assert not torch.equal(prepared, stock)  # the fused kernel ran (it rounds once, the stock twice)
    stock_error = ((stock - exact).norm() / exact.norm()).item()
    prepared_error = ((prepared - exact).norm() / exact.norm()).item()
    assert 0 < prepared_error <= stock_error * 1.05 + 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_text_rope_cuda(family):
    """The replacement of the modeling file's apply_rotary_pos_emb on (B, H, T, D) views of
    (B, T, H, D) projections, batch 2 and grouped KV heads: within one bf16 rounding of the
    function computed in fp32, and no further from it than the stock bf16 function."""
    from models.text import _make_fused_rope

    stock = sys.modules[model_class(family).__module__].apply_rotary_pos_emb
    fused_rope = _make_fused_rope(stock)
    g = torch.Generator().manual_seed(0)
    b, t, hq, hk, d = 2, 300, 6, 2, 64
    q = torch.randn(b, t, hq * d, generator=g).cuda().view(b, t, hq, d).transpose(1, 2)
    k = torch.randn(b, t, hk * d, generator=g).cuda().view(b, t, hk, d).transpose(1, 2)
    angles = torch.randn(b, t, d // 2, generator=g).cuda() * 30
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    bf = [x.to(torch.bfloat16) for x in (q, k, cos, sin)]
    exact = stock(*(x.double() for x in bf))  # the same bf16 inputs, no rounding after
    ours, theirs = fused_rope(*bf), stock(*bf)
    for o, s, e in zip(ours, theirs, exact):
        assert o.shape == e.shape and o.dtype == torch.bfloat16
        torch.testing.assert_close(o.double(), e, rtol=2**-7, atol=1e-5)
        assert (o.double() - e).norm() <= (s.double() - e).norm()


@pytest.mark.cuda
def test_fused_text_rope_leaves_what_the_kernel_does_not_take_to_the_stock_function():
    """fp64 (kernels.rope takes 16-bit floats and fp32): the modeling file's own result, exactly."""
    from models.text import _make_fused_rope

    stock = sys.modules[model_class("qwen2.5-vl").__module__].apply_rotary_pos_emb
    b, t, hq, hk, d = 1, 5, 4, 2, 64
    q = torch.randn(b, t, hq, d, dtype=torch.float64, device="cuda").transpose(1, 2)
    k = torch.randn(b, t, hk, d, dtype=torch.float64, device="cuda").transpose(1, 2)
    cos, sin = torch.randn(2, b, t, d, dtype=torch.float64, device="cuda")
    for ours, theirs in zip(_make_fused_rope(stock)(q, k, cos, sin), stock(q, k, cos, sin)):
        assert torch.equal(ours, theirs)


@pytest.mark.cuda
def test_prepared_language_model_cuda_bf16():
    """The whole small language model on the GPU in bf16, prepared: its error against fp32 is
    within twice the stock bf16 model's."""
    model, config = tiny_model("qwen2.5-vl", device="cuda")
    ids = torch.randint(0, config.text_config.vocab_size, (1, 300), device="cuda")
    exact = text_forward(model, ids).double()
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    stock = text_forward(model16, ids).double()
    prepare_language_model(model16)
    prepared = text_forward(model16, ids).double()
    stock_error = ((stock - exact).norm() / exact.norm()).item()
    prepared_error = ((prepared - exact).norm() / exact.norm()).item()
    assert 0 < prepared_error <= 2 * stock_error + 1e-3


@pytest.mark.cuda
def test_one_token_gemvs_cuda_bf16():
    """A token's logits from the small model on the GPU in bf16 with its projections as GEMVs, and
    with its norms and residual adds inside them too: their error against the model in fp32, over 8
    tokens, is within 1.5 times that of the same model through cuBLAS."""
    model, config = tiny_model("qwen2.5-vl", device="cuda")
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    prepare_language_model(model16)
    errors = {"ours": 0.0, "norms in": 0.0, "stock": 0.0}
    with torch.no_grad():
        for token in range(1, 9):
            ids = torch.tensor([[token]], device="cuda")
            exact = model(input_ids=ids).logits.double()
            stock = model16(input_ids=ids).logits.double()
            with fused.one_token_gemvs():
                ours = model16(input_ids=ids).logits.double()
            with fused.one_token_gemvs(), fused_adds_at_every_length():  # (as a captured step runs)
                normed = model16(input_ids=ids).logits.double()
            assert not torch.equal(ours, stock)  # (the GEMVs ran: they round differently)
            assert not torch.equal(normed, ours)  # (and the norms inside them)
            errors["ours"] += (ours - exact).norm().item()
            errors["norms in"] += (normed - exact).norm().item()
            errors["stock"] += (stock - exact).norm().item()
    assert 0 < errors["ours"] <= 1.5 * errors["stock"], errors
    assert 0 < errors["norms in"] <= 1.5 * errors["stock"], errors
