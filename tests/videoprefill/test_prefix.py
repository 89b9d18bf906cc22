"""The video prefix: two-call prefill, and its KV cache kept for the next question (CPU, tiny models)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import weakref

import pytest
import torch

from kernels import BlockSparsePattern, FlashPrefillConfig
from models import load, set_attention
from models.attention import SparsityRecorder
from models.cache import room
from models.tiny import FAMILIES
from videoprefill import prefix as prefixes
from videoprefill.pipeline import VideoQA
from videoprefill.synthetic import DEMO_QUESTION
from videoprefill.video import Sampling, sample_video_path

SMALL = Sampling(fps=4.0, max_frames=8, max_pixels=56 * 56, min_pixels=28 * 28)
EXACT = Sampling(fps=2.0, max_frames=512, min_pixels=112 * 112, max_pixels=112 * 112)  # the demo's frames
SPARSE = FlashPrefillConfig(block_size=16, alpha=0.3, sink_blocks=1, window_blocks=1, last_full_blocks=1,
                            min_seq_len=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_calls_give_the_one_call_tokens_and_logits(family, tiny_models, sample_video, monkeypatch):
    """The prefix, then the question over its cache, with the positions generate gives the whole
    prompt: the same logits as one generate call over the prompt (dense attention, two calls
    forced)."""
    from videoprefill import pipeline

    monkeypatch.setattr(pipeline, "ONE_CALL_WHEN_DENSE", False)
    model, processor = load(tiny_models[family], device="cpu")
    qa = VideoQA(model, processor, warmup=False)
    set_attention(model, "dense")
    prepared = qa.prepare(sample_video, "What happens in this video?", SMALL)
    assert 0 < prepared.prefix_len < prepared.tokens["total"]
    ids = prepared.inputs["input_ids"][0]
    assert int(ids[prepared.prefix_len - 1]) == model.config.video_token_id
    assert not bool((ids[prepared.prefix_len:] == model.config.video_token_id).any())
    options = {"max_new_tokens": 6, "do_sample": False, "output_scores": True, "return_dict_in_generate": True,
               "pad_token_id": processor.tokenizer.pad_token_id}
    with torch.inference_mode():
        one = model.generate(**prepared.inputs, **options)
        key = qa._settings("dense", None, None, None)[0]
        two, state = qa._generate(prepared, key, None, 6, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(one.sequences, two.sequences)
    assert len(one.scores) == len(two.scores) == 6
    for a, b in zip(one.scores, two.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert state.cache.get_seq_length() == prepared.prefix_len  # the question's positions were dropped


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_a_dense_prompt_prefills_in_one_call(attention, family, tiny_models, sample_video, monkeypatch):
    """Where every layer attends densely over the whole prompt (the dense mode; the sparse mode under
    min_seq_len), a request that computes its prefix runs the language model once, and its answer,
    sparsity record, kept KV cache and kept record are those of the two calls; so is a later
    question's over that cache. Sparse from min_seq_len on, it stays two calls."""
    from videoprefill import pipeline

    below = dataclasses.replace(SPARSE, min_seq_len=10**6)
    model, processor = load(tiny_models[family], config=below, device="cpu")
    calls = []
    hook = model.model.language_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    results = {}
    try:
        for one_call in (True, False):
            monkeypatch.setattr(pipeline, "ONE_CALL_WHEN_DENSE", one_call)
            qa = VideoQA(model, processor, mask_layers=(1,), warmup=False)
            prepared = qa.prepare(sample_video, "What colour is the square?", SMALL)
            calls.clear()
            first = qa.run(prepared, attention, max_new_tokens=1, dense_layers=1)
            prefill_calls, state = len(calls), next(iter(qa._prefix.states.values()))
            later = qa.run(qa.follow_up(prepared, "Where does it go?"), attention, max_new_tokens=3, dense_layers=1)
            results[one_call] = prefill_calls, first, state, later
            length = prepared.prefix_len
        monkeypatch.setattr(pipeline, "ONE_CALL_WHEN_DENSE", True)
        calls.clear()
        qa.run(qa.prepare(sample_video, "What colour is the square?", SMALL), attention, 1, SPARSE,
               reuse_prefix=False)
        above_calls = len(calls)
    finally:
        hook.remove()
    (one, first, state, later), (two, first2, state2, later2) = results[True], results[False]
    assert (one, two) == (1, 2) and above_calls == (1 if attention == "dense" else 2)
    assert later.tokens["cached"] == later2.tokens["cached"] == length
    for a, b in ((first, first2), (later, later2)):
        assert a.text == b.text and a.tokens == b.tokens
        assert a.sparsity["density"] == pytest.approx(b.sparsity["density"])
        assert a.sparsity["per_layer"] == pytest.approx(b.sparsity["per_layer"])
        torch.testing.assert_close(torch.tensor(a.sparsity["per_head"]), torch.tensor(b.sparsity["per_head"]))
        assert set(a.sparsity["masks"]) == set(b.sparsity["masks"]) == ({1} if attention == "sparse" else set())
        for layer, mask in a.sparsity["masks"].items():
            assert torch.equal(mask, b.sparsity["masks"][layer])
    assert state.cache.get_seq_length() == state2.cache.get_seq_length() == length
    for a, b in zip(state.cache.layers, state2.cache.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
    assert set(state.recorder.kept) == set(state2.recorder.kept) == (
        set(range(model.config.text_config.num_hidden_layers)) if attention == "sparse" else set())
    for layer in state.recorder.kept:
        assert torch.equal(state.recorder.kept[layer], state2.recorder.kept[layer])
        assert torch.equal(state.recorder.visible[layer], state2.recorder.visible[layer])
    assert set(state.recorder.masks) == set(state2.recorder.masks)
    for layer, mask in state.recorder.masks.items():
        assert torch.equal(mask, state2.recorder.masks[layer])


def test_generate_gets_a_generation_config(tiny_models, sample_video, monkeypatch):
    """The pipeline's `generate` calls get their generation options on a copy of the model's
    generation config (`prefix.generation_options`), so generate skips its check of the model's
    config for generation options (a default config built per call in transformers 5.17); the
    model's own generation config is left as it was."""
    model, processor = load(tiny_models["qwen2.5-vl"], device="cpu")
    before = model.generation_config.to_dict()
    stop = object()
    options = prefixes.generation_options(model, {"max_new_tokens": 3, "do_sample": False, "stopping_criteria": stop})
    assert options["generation_config"].max_new_tokens == 3 and options["stopping_criteria"] is stop
    assert options["generation_config"] is not model.generation_config and set(options) == {
        "generation_config", "stopping_criteria"}
    assert prefixes.generation_options(model, options) is options

    def no_check(self):
        raise AssertionError("generate checked the model's config for generation options")

    monkeypatch.setattr(type(model.config), "_get_generation_parameters", no_check)
    qa = VideoQA(model, processor, warmup=False)
    for attention in ("dense", "sparse"):
        answer = qa.ask(sample_video, "What happens in this video?", attention, SMALL, max_new_tokens=3)
        assert answer.new_tokens >= 1
    assert model.generation_config.to_dict() == before


@pytest.mark.parametrize("family", FAMILIES)
def test_the_prefix_frees_the_patch_states_before_the_language_model(family, tiny_models, sample_video):
    """transformers' forward may keep the vision tower's patch states from before the merger alive
    through the language model's prefill; the prefix's call drops them from the tower's output, and
    its KV cache is the one of the stock call (merged tokens and Qwen3-VL's deepstack features kept)."""
    model, processor = load(tiny_models[family], device="cpu")
    qa = VideoQA(model, processor, warmup=False)
    set_attention(model, "dense")
    prepared = qa.prepare(sample_video, "What happens in this video?", SMALL)
    length = prepared.prefix_len
    positions = prefixes.prompt_positions(model, prepared.inputs)
    states, alive = [], []
    # registered before the prefix's own hook, so it sees the tower's whole output
    seen = model.model.visual.register_forward_hook(lambda m, a, out: states.append(weakref.ref(out.last_hidden_state)))
    check = model.model.language_model.register_forward_pre_hook(lambda m, a: alive.append(states[-1]() is not None))
    try:
        with torch.inference_mode():
            lean = prefixes.prefill_prefix(model, prepared.inputs, length, positions)
            stock = prefixes.new_cache(model)
            stock_inputs, _ = prefixes.split_inputs(prepared.inputs, length)
            model.model(**stock_inputs, position_ids=positions[..., :length],
                        **{prefixes.cache_argument(model): stock}, use_cache=True)
    finally:
        seen.remove()
        check.remove()
    # Dropped in the prefix's call. The stock call keeps them alive where the model's forward holds
    # the tower's output (transformers 5.24 on this machine's CI: all three families; 5.17: Qwen3-VL).
    assert len(alive) == 2 and alive[0] is False
    assert len(lean.layers) == len(stock.layers) > 0
    for a, b in zip(lean.layers, stock.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_pixels_are_prepared_in_the_vision_towers_dtype(tiny_models, sample_video):
    """A bf16 model gets bf16 pixels (half the processor's fp32) and computes the same prefix from
    them: it casts them to its vision tower's dtype first thing. Other float inputs keep theirs."""
    model, processor = load(tiny_models["qwen2.5-vl"], device="cpu", dtype=torch.bfloat16)
    qa = VideoQA(model, processor, warmup=False)
    set_attention(model, "dense")
    prepared = qa.prepare(sample_video, "What happens in this video?", SMALL)
    assert prepared.inputs["pixel_values_videos"].dtype == torch.bfloat16
    assert prepared.inputs["second_per_grid_ts"].dtype == torch.float32
    fp32 = dict(prepared.inputs, pixel_values_videos=prepared.inputs["pixel_values_videos"].float())
    length = prepared.prefix_len
    positions = prefixes.prompt_positions(model, prepared.inputs)
    with torch.inference_mode():
        ours = prefixes.prefill_prefix(model, prepared.inputs, length, positions)
        theirs = prefixes.prefill_prefix(model, fp32, length, positions)
    for a, b in zip(ours.layers, theirs.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def _decodes(qa, monkeypatch) -> list[str]:
    seen: list[str] = []
    real = qa.decode

    def counting(video, sampling=None):
        seen.append(video)
        return real(video, sampling)

    monkeypatch.setattr(qa, "decode", counting)
    return seen


@pytest.fixture(scope="module")
def demo():
    """The trained demo model (its FlashPrefill settings keep part of the blocks on the sample)."""
    return load("demo", device="cpu")


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_a_later_question_reuses_the_prefix(attention, demo, monkeypatch):
    model, processor = demo
    video = str(sample_video_path())
    qa = VideoQA(model, processor, warmup=False)
    decodes = _decodes(qa, monkeypatch)
    questions = (DEMO_QUESTION, "What colour is the flash?", DEMO_QUESTION)
    first = qa.ask(video, questions[0], attention, EXACT, max_new_tokens=4)
    (state,) = qa._prefix.states.values()
    buffers = [tuple(t.data_ptr() for t in room(layer)) for layer in state.cache.layers]
    second, again = (qa.ask(video, q, attention, EXACT, max_new_tokens=4) for q in questions[1:])
    assert decodes == [video]  # the later questions neither decode nor run the vision encoder
    # nor copy the prefix's keys and values: their tokens went into the room after them (models.cache)
    assert [tuple(t.data_ptr() for t in room(layer)) for layer in state.cache.layers] == buffers
    assert first.text.lower().startswith("yellow")
    assert first.tokens["cached"] == 0 and first.timings["vision_s"] > 0
    for later in (second, again):
        assert later.tokens["cached"] > 0 and later.timings["vision_s"] == 0.0
        assert later.tokens["video"] == first.tokens["video"]
    # The same answers, density and block masks as requests that compute their prefix.
    cold = VideoQA(model, processor, warmup=False)
    cold.prefix_cache = False
    for later, question in zip((second, again), questions[1:]):
        fresh = cold.ask(video, question, attention, EXACT, max_new_tokens=4)
        assert fresh.tokens["cached"] == 0 and cold._prefix is None
        assert later.text == fresh.text and later.new_tokens == fresh.new_tokens
        assert later.tokens == {**fresh.tokens, "cached": later.tokens["cached"]}
        assert later.sparsity["density"] == pytest.approx(fresh.sparsity["density"])
        assert later.sparsity["per_layer"] == pytest.approx(fresh.sparsity["per_layer"])
        assert set(later.sparsity["masks"]) == set(fresh.sparsity["masks"])
        for layer, mask in fresh.sparsity["masks"].items():
            assert torch.equal(later.sparsity["masks"][layer], mask)
    if attention == "sparse":
        assert 0 < second.sparsity["density"] < 1 and second.sparsity["masks"]
        n_blocks = -(-second.tokens["total"] // qa.config.block_size)
        for mask in second.sparsity["masks"].values():
            assert mask.shape == (model.config.text_config.num_attention_heads, n_blocks, n_blocks)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("one_call", [True, False], ids=["one-call", "two-calls"])
def test_a_later_question_has_its_whole_prompts_positions(one_call, family, tiny_models, sample_video, monkeypatch):
    """A question over a kept prefix gets the positions the model's method gives its whole prompt,
    built from the prefix's kept ones (`positions_over_prefix`): the method runs over the whole
    prompt once per prefix, for its first question where two calls prefill it, for the first later
    question where one call does (generate computes that call's positions itself)."""
    from videoprefill import pipeline

    monkeypatch.setattr(pipeline, "ONE_CALL_WHEN_DENSE", one_call)
    model, processor = load(tiny_models[family], device="cpu")
    qa = VideoQA(model, processor, warmup=False)
    given, whole = [], []
    generate, positions = prefixes.generate_over_prefix, prefixes.prompt_positions
    monkeypatch.setattr(prefixes, "generate_over_prefix", lambda model, inputs, length, cache, at, **options: (
        given.append(at) or generate(model, inputs, length, cache, at, **options)))
    monkeypatch.setattr(prefixes, "prompt_positions", lambda model, inputs: whole.append(1) or positions(model, inputs))
    qa.ask(sample_video, "Describe this video.", "dense", SMALL, max_new_tokens=1)
    first = len(whole)
    for question in ("How many squares are there?", "Is it red, green or blue? Answer with one word.", "a"):
        prepared = qa.prepare(sample_video, question, SMALL)
        assert qa.run(prepared, "dense", max_new_tokens=1).tokens["cached"] == prepared.prefix_len
        full = qa.prepare_decoded(qa.decode(sample_video, SMALL), question, reuse_prefix=False)
        assert torch.equal(given[-1], positions(model, full.inputs))
    assert (first, len(whole)) == ((0, 1) if one_call else (1, 1))


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_built_on_a_prefix_are_the_processors(family, tiny_models, sample_video):
    """A later question's tokens (the kept prefix's, then the question's text tokenized alone)
    are exactly what the processor gives for the whole prompt."""
    model, processor = load(tiny_models[family], device="cpu")
    qa = VideoQA(model, processor, warmup=False)
    qa.ask(sample_video, "Describe this video.", "dense", SMALL, max_new_tokens=1)
    for question in ("How many squares are there?", "Is it red, green or blue? Answer with one word.", "a"):
        on_prefix = qa.prepare(sample_video, question, SMALL)
        assert "pixel_values_videos" not in on_prefix.inputs
        full = qa.prepare_decoded(qa.decode(sample_video, SMALL), question, reuse_prefix=False)
        assert set(on_prefix.inputs) == set(full.inputs) - {"pixel_values_videos"}
        for key, value in on_prefix.inputs.items():
            assert torch.equal(value, full.inputs[key]), key
        assert on_prefix.prefix_len == full.prefix_len and on_prefix.tokens == full.tokens
        assert on_prefix.video_ranges == full.video_ranges


def test_other_settings_or_a_changed_file_compute_the_prefix_again(tiny_models, sample_video, tmp_path, monkeypatch):
    model, processor = load(tiny_models["qwen2.5-vl"], config=SPARSE, device="cpu")
    qa = VideoQA(model, processor, warmup=False)
    video = str(tmp_path / "clip.mp4")
    shutil.copy(sample_video, video)
    decodes = _decodes(qa, monkeypatch)
    question = "What colour is the square?"
    assert qa.ask(video, question, "sparse", SMALL, max_new_tokens=2).tokens["cached"] == 0
    assert qa.ask(video, question, "sparse", SMALL, max_new_tokens=2).tokens["cached"] > 0
    assert len(decodes) == 1
    cold = qa.prepare_decoded(qa.decode(video, SMALL), question, reuse_prefix=False)
    later = qa.follow_up(cold, "Where does it go?")
    assert "pixel_values_videos" not in later.inputs and later.prefix_len == cold.prefix_len
    assert qa.run(later, "sparse", 2).tokens["cached"] > 0 and len(decodes) == 2
    # Another attention mode: the request was built on the prefix, so its frames are read again.
    prepared = qa.prepare(video, question, SMALL)
    dense = qa.run(prepared, "dense", max_new_tokens=2)
    assert dense.tokens["cached"] == 0 and len(decodes) == 3 and dense.timings["vision_s"] > 0
    cold = VideoQA(model, processor, warmup=False)
    cold.prefix_cache = False
    assert dense.text == cold.ask(video, question, "dense", SMALL, max_new_tokens=2).text
    assert qa.ask(video, question, "dense", SMALL, max_new_tokens=2).tokens["cached"] > 0
    # Other FlashPrefill settings, other sampling, a modified file: not the kept prefix.
    other = FlashPrefillConfig(**{**SPARSE.__dict__, "alpha": 0.5})  # (SPARSE has 0.3)
    assert qa.ask(video, question, "dense", SMALL, max_new_tokens=2).tokens["cached"] > 0
    assert qa.run(qa.prepare(video, question, SMALL), "sparse", 2, other).tokens["cached"] == 0
    assert qa.ask(video, question, "sparse", Sampling(fps=2.0, max_frames=8, max_pixels=56 * 56),
                  max_new_tokens=2).tokens["cached"] == 0
    n = len(decodes)
    stat = os.stat(video)
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert qa.ask(video, question, "sparse", SMALL, max_new_tokens=2).tokens["cached"] == 0
    assert len(decodes) == n + 1
    # A request asking not to reuse computes its prefix and leaves nothing kept.
    assert qa.ask(video, question, "sparse", SMALL, max_new_tokens=2).tokens["cached"] > 0
    prepared = qa.prepare(video, question, SMALL)
    assert qa.run(prepared, "sparse", 2, reuse_prefix=False).tokens["cached"] == 0
    assert qa._prefix is not None and not qa._prefix.states
    qa.forget_prefix()
    assert qa._prefix is None


def test_compare_keeps_both_caches_for_a_later_question(tiny_models, sample_video, monkeypatch):
    """Dense and sparse on one video (the compare mode): a later question reuses both KV caches,
    with the answers of requests that compute their prefix; with `prefix_states = 1` the two runs
    replace each other's cache, as before."""
    model, processor = load(tiny_models["qwen2.5-vl"], config=SPARSE, device="cpu")
    questions = ("What colour is the square?", "Where does it go?")
    cold = VideoQA(model, processor, warmup=False)
    cold.prefix_cache = False
    for states in (2, 1):
        qa = VideoQA(model, processor, warmup=False)
        qa.prefix_states = states
        decodes = _decodes(qa, monkeypatch)
        first = qa.compare(sample_video, questions[0], SMALL, max_new_tokens=3)
        later = qa.compare(sample_video, questions[1], SMALL, max_new_tokens=3)
        assert [first["runs"][m].tokens["cached"] for m in ("dense", "sparse")] == [0, 0]
        cached = [later["runs"][m].tokens["cached"] for m in ("dense", "sparse")]
        if states == 2:
            assert cached[0] > 0 and cached[1] > 0 and len(decodes) == 1
            assert [later["runs"][m].timings["vision_s"] for m in ("dense", "sparse")] == [0.0, 0.0]
            assert [k[0] for k in qa._prefix.states] == ["dense", "sparse"]
        else:
            assert cached == [0, 0]  # each run found the other mode's cache, and freed it
            assert [k[0] for k in qa._prefix.states] == ["sparse"]
        fresh = cold.compare(sample_video, questions[1], SMALL, max_new_tokens=3)
        for mode in ("dense", "sparse"):
            assert later["runs"][mode].text == fresh["runs"][mode].text
            assert later["runs"][mode].sparsity["density"] == pytest.approx(fresh["runs"][mode].sparsity["density"])


def test_a_dense_cache_serves_any_flashprefill_settings(tiny_models, sample_video):
    """Dense attention does not depend on FlashPrefill's settings: a later dense question with
    other ones reuses the dense cache (and runs no warm-up of its own), a sparse one does not."""
    model, processor = load(tiny_models["qwen2.5-vl"], config=SPARSE, device="cpu")
    qa = VideoQA(model, processor, warmup=False)
    question = "What colour is the square?"
    other = dataclasses.replace(SPARSE, alpha=0.5, block_size=32)
    assert qa.ask(sample_video, question, "dense", SMALL, max_new_tokens=2).tokens["cached"] == 0
    assert qa.ask(sample_video, question, "dense", SMALL, max_new_tokens=2, config=other).tokens["cached"] > 0
    assert qa.ask(sample_video, question, "sparse", SMALL, max_new_tokens=2).tokens["cached"] == 0
    assert qa.ask(sample_video, question, "sparse", SMALL, max_new_tokens=2, config=other).tokens["cached"] == 0
    assert qa._settings("dense", SPARSE, 1, None)[0] == qa._settings("dense", other, 0, None)[0]


def test_the_oldest_cache_goes_first_and_memory_runs_out_only_once(tiny_models, sample_video, monkeypatch):
    """A third setting frees the oldest cache; a prefill that runs out of GPU memory while another
    setting's cache is kept frees it and runs again, after which prefixes as long free the others
    before their prefill; one that runs out with nothing kept fails."""
    model, processor = load(tiny_models["qwen2.5-vl"], config=SPARSE, device="cpu")
    qa = VideoQA(model, processor, warmup=False)
    question = "What colour is the square?"
    other = dataclasses.replace(SPARSE, alpha=0.5)
    for mode, config in (("dense", None), ("sparse", None), ("sparse", other)):
        qa.run(qa.prepare(sample_video, question, SMALL), mode, 2, config)
    assert [(k[0], k[1].alpha) for k in qa._prefix.states] == [("sparse", 0.3), ("sparse", 0.5)]

    generate, calls = qa._generate, []

    def short_of_memory(*args, **kwargs):
        calls.append(len(qa._prefix.states) if qa._prefix else 0)
        if calls[-1]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return generate(*args, **kwargs)

    monkeypatch.setattr(qa, "_generate", short_of_memory)
    answer = qa.run(qa.prepare(sample_video, question, SMALL), "dense", 2)
    assert calls == [1, 0] and answer.tokens["cached"] == 0  # one kept cache (prefix_states 2): freed, run again
    assert [k[0] for k in qa._prefix.states] == ["dense"]
    qa.run(qa.prepare(sample_video, question, SMALL), "sparse", 2)  # as long a prefix: the others freed first
    assert calls == [1, 0, 0] and [k[0] for k in qa._prefix.states] == ["sparse"]
    monkeypatch.setattr(qa, "_generate", lambda *a, **kw: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x")))
    qa.forget_prefix()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        qa.run(qa.prepare(sample_video, question, SMALL), "dense", 2)


def test_a_removed_video_fails_as_before(tiny_models, sample_video, tmp_path):
    model, processor = load(tiny_models["qwen2.5-vl"], device="cpu")
    qa = VideoQA(model, processor, warmup=False)
    video = str(tmp_path / "clip.mp4")
    shutil.copy(sample_video, video)
    qa.ask(video, "Describe this video.", "dense", SMALL, max_new_tokens=1)
    os.remove(video)
    with pytest.raises(ValueError, match="not found|No such|does not exist|cannot"):
        qa.prepare(video, "Describe this video.", SMALL)
    with pytest.raises(ValueError, match="question is empty"):
        qa.prepare(sample_video, "  ", SMALL)


def test_recorder_adds_a_chunk_after_its_keys():
    """A mask recorded over a prefix, then over the question's query chunk: one mask over the
    whole prompt; a pattern that does not continue the recorded keys is left out."""
    bs, heads, prefix, total = 4, 2, 10, 17
    gen = torch.Generator().manual_seed(0)
    n_prefix, n_total = -(-prefix // bs), -(-total // bs)
    first_mask = (torch.rand(1, heads, n_prefix, n_prefix, generator=gen) < 0.5).tril()
    first_q = prefix // bs
    chunk_mask = (torch.rand(1, heads, n_total - first_q, n_total, generator=gen) < 0.5).tril(diagonal=first_q)
    rec = SparsityRecorder(mask_layers=(0,))
    rec.record(0, BlockSparsePattern.from_dense(first_mask, bs, prefix, prefix))
    snapshot = rec.copy()
    rec.record(0, BlockSparsePattern.from_dense(chunk_mask, bs, total - prefix, total))
    rec.record(0, BlockSparsePattern.from_dense(first_mask, bs, prefix, prefix))  # another padded row: ignored
    merged = rec.masks[0]
    assert merged.shape == (heads, n_total, n_total)
    expected = torch.zeros(heads, n_total, n_total, dtype=torch.bool)
    expected[:, :n_prefix, :n_prefix] = first_mask[0]
    expected[:, first_q:] |= chunk_mask[0]
    assert torch.equal(merged, expected)
    assert torch.equal(snapshot.masks[0], first_mask[0])  # the copy was not written
    out = rec.finish()
    assert out["masks"][0].shape == (heads, n_total, n_total) and out["num_tokens"] == prefix


def test_the_needle_benchmark_answers_as_the_pipeline_does(demo):
    """videoprefill.bench accuracy prefills in the pipeline's two calls; dense, that is the one
    call's answer, and FlashPrefill's density is recorded over both calls."""
    from videoprefill.accuracy import run_one
    from videoprefill.synthetic import is_correct, needle
    from videoprefill.train_demo import HELD_OUT_SEED, encode

    model, processor = demo
    sample = needle(HELD_OUT_SEED + 31, 64, depth=0.5, multiple_choice=False)
    inputs = encode(processor, sample, False, "cpu")
    config = FlashPrefillConfig(block_size=32, sink_blocks=1, window_blocks=2, last_full_blocks=1, min_seq_len=0)
    two, _, _ = run_one(model, processor, inputs, "dense", config)
    one, _, _ = run_one(model, processor, inputs, "dense", config, one_call=True)
    assert two == one and is_correct(sample, two)
    text, density, errors = run_one(model, processor, inputs, "alpha=0.4", dataclasses.replace(config, alpha=0.4))
    assert 0 < density < 1 and is_correct(sample, text)
    assert set(errors) == set(range(model.config.text_config.num_hidden_layers))
