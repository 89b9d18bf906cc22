"""FlashPrefill inside transformers' Qwen-VL models (CPU, reference backend)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import models.attention as attention_module
from kernels import FlashPrefillConfig
from models import load, request_settings, set_attention
from models.attention import RequestSettings, SparsityRecorder
from models.tiny import FAMILIES
from videoprefill.pipeline import VideoQA
from videoprefill.video import Sampling

SMALL = Sampling(fps=4.0, max_frames=8, max_pixels=56 * 56, min_pixels=28 * 28)


def config(alpha: float) -> FlashPrefillConfig:
    return FlashPrefillConfig(block_size=16, alpha=alpha, sink_blocks=1, window_blocks=1, last_full_blocks=1,
                              min_seq_len=0)


def count_flash_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = attention_module.flash_prefill

    def counting(q, *args, **kwargs):
        calls.append(q.shape[1])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(attention_module, "flash_prefill", counting)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_and_sparse_agree_at_alpha_zero(family, tiny_models, sample_video, monkeypatch):
    model, processor = load(tiny_models[family], attention="sparse", config=config(0.0), device="cpu")
    qa = VideoQA(model, processor)
    prepared = qa.prepare(sample_video, "What moves?", SMALL)
    assert prepared.tokens["video"] > 0
    calls = count_flash_calls(monkeypatch)
    with torch.inference_mode():
        set_attention(model, "sparse")
        with request_settings(RequestSettings(config=config(0.0))):
            sparse_logits = model(**prepared.inputs).logits
        assert len(calls) == model.config.text_config.num_hidden_layers, "the sparse path did not run"
        set_attention(model, "dense")
        dense_logits = model(**prepared.inputs).logits
    torch.testing.assert_close(sparse_logits, dense_logits, atol=1e-4, rtol=1e-4)

    sparse = qa.run(prepared, "sparse", max_new_tokens=6, config=config(0.0))
    dense = qa.run(prepared, "dense", max_new_tokens=6, config=config(0.0))
    assert sparse.text == dense.text
    assert sparse.new_tokens == dense.new_tokens > 0


def test_padded_batch_equals_single_runs(tiny_models, monkeypatch):
    # A random model attends almost uniformly: alpha near 1 makes it drop blocks all the same.
    model, processor = load(tiny_models["qwen2.5-vl"], attention="sparse", config=config(0.99), device="cpu")
    tok = processor.tokenizer
    texts = ["the red square moves left and the blue circle is still " * 12, "what colour is the ball? " * 5]
    calls = count_flash_calls(monkeypatch)
    settings = RequestSettings(config=config(0.99), recorder=SparsityRecorder())
    with torch.inference_mode(), request_settings(settings):
        batch = tok(texts, return_tensors="pt", padding=True)
        assert (batch["attention_mask"] == 0).any(), "the batch should be padded"
        batched = model(**batch).logits
        singles = [model(**tok([t], return_tensors="pt")).logits for t in texts]
    assert calls, "the sparse path did not run"
    assert settings.recorder.finish()["density"] < 1.0, "alpha 0.99 should drop blocks"
    for i, single in enumerate(singles):
        n = single.shape[1]
        torch.testing.assert_close(batched[i, -n:], single[0], atol=1e-4, rtol=1e-4)


def _reference_range(row):
    idx = [i for i, x in enumerate(row.tolist()) if x]
    return (idx[0], idx[-1] + 1) if idx and len(idx) == idx[-1] + 1 - idx[0] else None


def test_key_ranges_of_masks_are_read_once_per_mask(monkeypatch):
    """Each row's run of valid keys, from the last query's row of a 4-D mask (or a 2-D one); a mask
    handed to every layer is read once, and a new mask or an in-place change is read again."""
    rows = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0],
                         [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert attention_module._valid_ranges(rows) == [_reference_range(r) for r in rows]
    assert attention_module._valid_ranges(rows) == [(2, 6), (0, 6), None, None, (0, 1), (5, 6)]
    mask = torch.zeros(6, 1, 3, 6, dtype=torch.bool)
    mask[:, 0, -1] = rows
    reads = []
    real = attention_module._valid_ranges
    monkeypatch.setattr(attention_module, "_valid_ranges", lambda x: reads.append(1) or real(x))
    first = attention_module._key_ranges(mask, 6)
    assert attention_module._key_ranges(mask, 6) == first and len(reads) == 1
    assert attention_module._key_ranges(mask, 4) == [_reference_range(r[-4:]) for r in rows]  # fewer keys
    mask[0, 0, -1, 0] = True  # written in place: read again
    assert attention_module._key_ranges(mask, 6)[0] is None and len(reads) == 3
    float_mask = torch.where(mask, 0.0, float("-inf"))  # an additive mask: 0 where visible
    assert attention_module._key_ranges(float_mask, 6) == attention_module._key_ranges(mask.clone(), 6)


def test_decode_steps_take_the_dense_path(tiny_models, sample_video, monkeypatch):
    model, processor = load(tiny_models["qwen2.5-vl"], config=config(0.1), device="cpu")
    qa = VideoQA(model, processor, warmup=False)
    prepared = qa.prepare(sample_video, "Describe this video.", SMALL)
    calls = count_flash_calls(monkeypatch)
    answer = qa.run(prepared, "sparse", max_new_tokens=5)
    layers = model.config.text_config.num_hidden_layers
    assert answer.new_tokens == 5
    # prefill only, once per layer: the video prefix, then the question's tokens over its cache
    assert calls == [prepared.prefix_len] * layers + [prepared.tokens["total"] - prepared.prefix_len] * layers


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_short_queries_run_sdpa_without_cudnn(mode, tiny_models, sample_video, monkeypatch):
    """In both modes SDPA runs the decoding steps (one query) with its cuDNN backend off, since
    cuDNN builds a plan for each shape it has not run and these come in new shapes; the dense
    mode's prefill of the prefix (queries = keys) keeps SDPA's own choice, and the flag is back on
    afterwards. The dense mode's question over the prefix's cache runs as kernels'
    `dense_attention` (its own test: off cuDNN too), as in the sparse mode's dense calls. (Two
    prefill calls forced: a dense prompt's first question is one call; a later one is the question
    over the kept prefix's cache.)"""
    from transformers.integrations import sdpa_attention

    from videoprefill import pipeline

    monkeypatch.setattr(pipeline, "ONE_CALL_WHEN_DENSE", False)

    model, processor = load(tiny_models["qwen2.5-vl"], attention=mode, config=config(0.1), device="cpu")
    assert model.config.text_config._attn_implementation == (
        attention_module.ATTENTION_NAME if mode == "sparse" else attention_module.DENSE_NAME)
    qa = VideoQA(model, processor, warmup=False)
    prepared = qa.prepare(sample_video, "Describe this video.", SMALL)
    seen = []
    real = sdpa_attention.sdpa_attention_forward

    def recording(module, query, key, *args, **kwargs):
        seen.append((query.shape[2], key.shape[2], torch.backends.cuda.cudnn_sdp_enabled()))
        return real(module, query, key, *args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", recording)
    dense_calls = []
    kernels_dense = attention_module.dense_attention
    monkeypatch.setattr(attention_module, "dense_attention",
                        lambda q, k, *a: dense_calls.append((q.shape[1], k.shape[1])) or kernels_dense(q, k, *a))
    answer = qa.run(prepared, mode, max_new_tokens=4)
    layers = model.config.text_config.num_hidden_layers
    steps = [cudnn for queries, _, cudnn in seen if queries == 1]
    assert answer.new_tokens == 4 and len(steps) == 3 * layers and not any(steps)
    prefix = [cudnn for queries, keys, cudnn in seen if queries == keys]
    assert not [q for q, k, _ in seen if 1 < q < k]  # no question call through transformers' SDPA
    assert len(prefix) == (layers if mode == "dense" else 0) and all(prefix)
    question = prepared.tokens["total"] - prepared.prefix_len
    if mode == "dense":
        assert dense_calls == [(question, prepared.tokens["total"])] * layers
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_dense_attention_keeps_short_queries_off_cudnn(monkeypatch):
    """kernels' dense attention (the sparse mode's prompts under min_seq_len) runs a query shorter
    than its keys without SDPA's cuDNN backend and a causal prefill with SDPA's own choice; both
    match the reference."""
    from kernels.flash_prefill import api, reference

    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 40, heads, 64) for heads in (4, 2, 2))
    for tq in (40, 7):
        out = api.dense_attention(q[:, -tq:], k, v, 0.125)
        pattern = reference.causal_pattern(1, 4, tq, 40, 16, q.device)
        torch.testing.assert_close(out, reference.sparse_attention(q[:, -tq:], k, v, pattern, 0.125))
    assert seen == [True, False] and torch.backends.cuda.cudnn_sdp_enabled()


def test_dense_mode_is_transformers_sdpa(tiny_models, sample_video):
    """The dense mode's attention function gives transformers' own SDPA attention's logits."""
    model, processor = load(tiny_models["qwen2.5-vl"], attention="dense", config=config(0.1), device="cpu")
    prepared = VideoQA(model, processor, warmup=False).prepare(sample_video, "What moves?", SMALL)
    with torch.inference_mode():
        ours = model(**prepared.inputs).logits
        model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
        stock = model(**prepared.inputs).logits
    torch.testing.assert_close(ours, stock, atol=0, rtol=0)


def test_dense_layers_stay_dense(tiny_models, sample_video, monkeypatch):
    model, processor = load(tiny_models["qwen2.5-vl"], config=config(0.3), dense_layers=2, device="cpu")
    qa = VideoQA(model, processor, warmup=False)
    calls = count_flash_calls(monkeypatch)
    answer = qa.ask(sample_video, "Describe this video.", sampling=SMALL, max_new_tokens=2)
    layers = model.config.text_config.num_hidden_layers
    assert len(calls) == 2 * (layers - 2)  # the prefix and the question, each in the sparse layers
    assert answer.sparsity["per_layer"][:2] == [1.0, 1.0]


def test_sparsity_record_shapes_and_ranges(tiny_models, sample_video):
    model, processor = load(tiny_models["qwen2.5-vl"], config=config(0.3), device="cpu")
    qa = VideoQA(model, processor, mask_layers=(1,))
    answer = qa.ask(sample_video, "Which colour is the square?", sampling=SMALL, max_new_tokens=2)
    sp = answer.sparsity
    text_cfg = model.config.text_config
    assert len(sp["per_layer"]) == text_cfg.num_hidden_layers
    assert all(len(h) == text_cfg.num_attention_heads for h in sp["per_head"])
    assert 0.0 < sp["density"] <= 1.0
    n_blocks = -(-answer.tokens["total"] // 16)
    assert set(sp["masks"]) == {1}
    assert tuple(sp["masks"][1].shape) == (text_cfg.num_attention_heads, n_blocks, n_blocks)
    (start, end), = sp["video_ranges"]
    assert end - start == answer.tokens["video"]
    assert 0 < start < end < answer.tokens["total"]
    ids = qa.prepare(sample_video, "Which colour is the square?", SMALL).inputs["input_ids"][0]
    assert bool((ids[start:end] == model.config.video_token_id).all())


def test_switching_attention_needs_no_reload(tiny_models, sample_video):
    model, processor = load(tiny_models["qwen2.5-vl"], config=config(0.3), device="cpu")
    qa = VideoQA(model, processor)
    weights = model.lm_head.weight.data_ptr()
    result = qa.compare(sample_video, "Describe this video.", SMALL, max_new_tokens=3)
    assert model.lm_head.weight.data_ptr() == weights
    assert result["runs"]["dense"].sparsity["density"] == 1.0
    assert result["runs"]["sparse"].attention == "sparse"
    assert model.config.text_config._attn_implementation == attention_module.ATTENTION_NAME
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_load_rejects_unknown_models(tmp_path):
    from models import ModelLoadError

    with pytest.raises(ModelLoadError, match="cannot load a model config from .*nothing-here.*: no such folder"):
        load(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelLoadError, match="cannot load a model config from 'not-a-model'"):
        load("not-a-model")
    with pytest.raises(ValueError, match="attention"):
        load("demo", attention="fast")


def test_config_is_frozen_per_request():
    cfg = config(0.1)
    assert dataclasses.replace(cfg, alpha=0.2).alpha == 0.2 and cfg.alpha == 0.1


def test_fixed_density_benchmark_mode(tiny_models, sample_video):
    model, processor = load(tiny_models["qwen2.5-vl"], config=config(0.1), device="cpu")
    qa = VideoQA(model, processor, warmup=False)
    prepared = qa.prepare(sample_video, "Describe this video.", Sampling(fps=4.0, max_frames=16, max_pixels=112 * 112))
    answer = qa.run(prepared, "sparse", max_new_tokens=1, fixed_density=0.3)
    n = -(-prepared.tokens["total"] // 16)
    # Random blocks at 30% plus the diagonal, over n(n+1)/2 visible blocks per head.
    expected = (0.3 * (n * (n + 1) / 2 - n) + n) / (n * (n + 1) / 2)
    assert answer.sparsity["density"] == pytest.approx(expected, abs=0.08)


@pytest.mark.parametrize("batch, heads, q_len, kv_len, block", [(1, 4, 100, 100, 16), (2, 3, 5, 300, 16),
                                                                 (1, 2, 64, 64, 32), (1, 2, 17, 160, 16)])
def test_record_causal_equals_recording_the_causal_pattern(batch, heads, q_len, kv_len, block):
    from kernels.flash_prefill import reference

    prefix = reference.causal_pattern(1, heads, 48, 48, block, "cpu")  # (a first call recorded before)
    by_pattern, by_shapes = SparsityRecorder(), SparsityRecorder()
    for recorder in (by_pattern, by_shapes):
        recorder.record(3, prefix)
    by_pattern.record(3, reference.causal_pattern(batch, heads, q_len, kv_len, block, "cpu"))
    by_shapes.record_causal(3, batch, heads, q_len, kv_len, block, "cpu")
    torch.testing.assert_close(by_shapes.kept[3], by_pattern.kept[3], rtol=0, atol=0)
    torch.testing.assert_close(by_shapes.visible[3], by_pattern.visible[3], rtol=0, atol=0)
    assert (by_shapes.block_size, by_shapes.num_tokens) == (by_pattern.block_size, by_pattern.num_tokens) == (
        block, kv_len)


def test_a_later_question_in_the_last_full_blocks_builds_a_pattern_only_for_recorded_masks(
        tiny_models, sample_video, monkeypatch):
    """A question over a kept prefix whose blocks all keep every causal block runs dense
    (FULL_ROWS_DENSE): a pattern is asked for only at a layer whose mask is recorded, and the
    answer, its per-layer density and its mask are those recorded through the pattern stage."""
    from kernels.flash_prefill import api

    cfg = dataclasses.replace(config(1.0), last_full_blocks=4)  # (the prefix's blocks sparse)
    model, processor = load(tiny_models["qwen2.5-vl"], config=cfg, device="cpu")
    qa = VideoQA(model, processor, mask_layers=(1,), warmup=False)
    sampling = Sampling(fps=4.0, max_frames=16, max_pixels=112 * 112)  # (about 10 blocks, the last 4 full)
    qa.ask(sample_video, "Which colour is the square?", sampling=sampling, max_new_tokens=2)
    asked: list[bool] = []
    real = attention_module.flash_prefill
    monkeypatch.setattr(attention_module, "flash_prefill",
                        lambda *a, **k: asked.append(k.get("return_pattern", False)) or real(*a, **k))
    layers = model.config.text_config.num_hidden_layers
    later = {}
    for on in (True, False):
        monkeypatch.setattr(api, "FULL_ROWS_DENSE", on)
        asked.clear()
        answer = qa.ask(sample_video, "And the background?", sampling=sampling, max_new_tokens=2)
        tokens = answer.tokens
        assert tokens["cached"] > 0 and cfg.keeps_every_block(tokens["total"] - tokens["cached"], tokens["total"])
        later[on] = (list(asked), answer)
    assert later[True][0] == [i == 1 for i in range(layers)]
    assert later[False][0] == [True] * layers
    dense, staged = later[True][1], later[False][1]
    assert dense.text == staged.text
    assert dense.sparsity["per_layer"] == staged.sparsity["per_layer"] and dense.sparsity["density"] < 1.0
    assert torch.equal(dense.sparsity["masks"][1], staged.sparsity["masks"][1])


def test_dense_calls_build_a_pattern_only_for_recorded_masks(tiny_models, sample_video, monkeypatch):
    dense_config = dataclasses.replace(config(0.3), min_seq_len=10**6)  # every call below min_seq_len
    model, processor = load(tiny_models["qwen2.5-vl"], config=dense_config, device="cpu")
    qa = VideoQA(model, processor, mask_layers=(1,), warmup=False)
    asked: list[bool] = []
    real = attention_module.flash_prefill

    def asking(*args, **kwargs):
        asked.append(kwargs.get("return_pattern", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module, "flash_prefill", asking)
    answer = qa.ask(sample_video, "Which colour is the square?", sampling=SMALL, max_new_tokens=2)
    layers = model.config.text_config.num_hidden_layers
    assert asked == [i == 1 for i in range(layers)]  # the whole prompt in one call (every layer dense)
    sp = answer.sparsity
    assert sp["density"] == 1.0 and sp["per_layer"] == [1.0] * layers
    n_blocks = -(-answer.tokens["total"] // 16)
    assert set(sp["masks"]) == {1}
    assert tuple(sp["masks"][1].shape) == (model.config.text_config.num_attention_heads, n_blocks, n_blocks)
    assert bool((sp["masks"][1][0] == torch.ones(n_blocks, n_blocks).tril()).all())
