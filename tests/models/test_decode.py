"""models.decode: decoding steps over a reserved KV cache, replayed from a CUDA graph on the GPU.

On the CPU the steps run their launches as they are (capture off): what a graph records. The
tests compare them with transformers' own decoding: the same tokens and scores."""

from __future__ import annotations

import functools
import threading

import pytest
import torch

import models.decode as decode
import models.stop_check as stop_check
from kernels import FlashPrefillConfig
from models import load
from models.cache import capacity_for, room
from videoprefill import prefix as prefixes
from videoprefill.pipeline import VideoQA
from videoprefill.synthetic import DEMO_QUESTION
from videoprefill.video import Sampling

SMALL = Sampling(fps=4.0, max_frames=8, max_pixels=56 * 56, min_pixels=28 * 28)
SPARSE = FlashPrefillConfig(block_size=16, alpha=0.3, sink_blocks=1, window_blocks=1, last_full_blocks=1,
                            min_seq_len=0)
FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return {family: load(tiny_models[family], config=SPARSE, device="cpu") for family in FAMILIES}


def _instances(monkeypatch, module, name: str) -> list:
    """Every instance of `module.name` (a class) made while the test runs, in order."""
    made = []

    class Counted(getattr(module, name)):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(module, name, Counted)
    return made


@pytest.fixture
def made(monkeypatch):
    """Every StepGraphs that graph_decoding makes while the test runs, in order."""
    return _instances(monkeypatch, decode, "StepGraphs")


def _generate(model, processor, inputs, new_tokens: int, steps: bool, capture: bool | None = False,
              ahead: bool | None = None, min_new_tokens: int | None = None, gemv: bool | None = None,
              **generate_kwargs):
    """generate over a fresh cache, each new token's scores kept; with `steps`, inside
    graph_decoding (capture off by default, None: on CUDA; ahead and gemv: their defaults, on CUDA
    and in captured steps). -> (output, the StepGraphs or None, the cache)."""
    cache = prefixes.new_cache(model)
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens if min_new_tokens is None else min_new_tokens,
                   do_sample=False, output_scores=True, return_dict_in_generate=True,
                   pad_token_id=processor.tokenizer.pad_token_id, **generate_kwargs)
    with torch.inference_mode(), decode.graph_decoding(model, new_tokens, enabled=steps, capture=capture,
                                                       ahead=ahead, gemv=gemv) as graphs:
        out = model.generate(**inputs, **{prefixes.cache_argument(model): cache},
                             **prefixes.generation_options(model, options))
    return out, graphs, cache


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_give_generates_tokens_and_scores(family, tiny, sample_video):
    model, processor = tiny[family]
    inputs = VideoQA(model, processor, warmup=False).prepare(sample_video, "What colour is it?", SMALL).inputs
    prompt = inputs["input_ids"].shape[1]
    expected, _, plain_cache = _generate(model, processor, inputs, 7, steps=False)
    got, graphs, cache = _generate(model, processor, inputs, 7, steps=True)
    assert graphs.eager_steps == 6 and graphs.replayed_steps == 0 and not graphs.off  # every step after the first token
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # The cache reads as transformers' own: the prompt and the 6 tokens fed back, the same values,
    # held as views of the reserved buffers (room for the answer, rounded up).
    assert cache.get_seq_length() == plain_cache.get_seq_length() == prompt + 6
    for ours, theirs in zip(cache.layers, plain_cache.layers, strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.values, theirs.values, rtol=1e-4, atol=1e-4)
        assert ours.keys.untyped_storage().nbytes() >= (prompt + 7) * ours.keys[0, :, 0].numel() * 4
    assert "forward" not in model.__dict__  # the model's own forward back


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_with_gemvs_and_fused_adds_give_generates_tokens(family, tiny, sample_video, monkeypatch):
    """What a captured step runs, run eagerly here (under Triton's interpreter): the projections as
    kernels.gemv launches with the layers' norms and residual adds inside them. transformers' tokens,
    its scores within fp32 rounding."""
    import kernels.gemv as gemv_module
    import models.fused as fused
    import models.text as text

    model, processor = tiny[family]
    layers = len(fused.tower(model, "language_model").layers)
    inputs = VideoQA(model, processor, warmup=False).prepare(sample_video, "What colour is it?", SMALL).inputs
    expected, _, _ = _generate(model, processor, inputs, 5, steps=False)
    monkeypatch.setattr(text, "_add_norm_here", lambda x: True)  # (CUDA only otherwise)
    monkeypatch.setattr(fused, "_accumulates_here", lambda x: True)
    calls = []
    stock, stock_gated = gemv_module.gemv, gemv_module.gated_gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda x, parts, add=False, out=None, residual=None, norm=None: (
        calls.append(("add" if add else "residual" if residual is not None else "", norm is not None))
        or stock(x, parts, add, out, residual, norm)))
    monkeypatch.setattr(gemv_module, "gated_gemv", lambda x, gate, up, norm=None: (
        calls.append(("gated", norm is not None)) or stock_gated(x, gate, up, norm)))
    got, graphs, _ = _generate(model, processor, inputs, 5, steps=True, gemv=True)
    assert graphs.eager_steps == 4
    # Per step and layer: q, k, v of the input norm; o, adding the residual; gate and up of the
    # post-attention norm; down, adding into the sum. And the head. No other launch.
    assert calls.count(("", True)) == 4 * layers and calls.count(("residual", False)) == 4 * layers
    assert calls.count(("", False)) == 4
    assert calls.count(("gated", True)) == 4 * layers and calls.count(("add", False)) == 4 * layers
    assert len(calls) == 4 * (4 * layers + 1)
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_answers_as_without_steps_first_and_later_questions(tiny, sample_video, made, monkeypatch):
    """Through the pipeline, sparse and dense, a first question (dense: one prefill call) and a
    later one over the kept prefix, whose cache holds views of the reserved buffers: the same
    answers, streamed the same, as with transformers' decoding; with the stop check a step behind,
    as on CUDA."""
    import videoprefill.pipeline as pipeline

    model, processor = tiny["qwen2.5-vl"]
    plain = VideoQA(model, processor, warmup=False)
    stepped = VideoQA(model, processor, warmup=False)
    monkeypatch.setattr(stepped, "_graph_decode", lambda: True)  # (CUDA only otherwise)
    monkeypatch.setattr(pipeline, "graph_decoding", functools.partial(decode.graph_decoding, ahead=True))
    for attention in ("sparse", "dense"):
        for question in ("What colour is it?", "Where does it go?"):
            streamed = []
            answer = stepped.ask(sample_video, question, attention, SMALL, max_new_tokens=8,
                                 on_text=lambda text, _, streamed=streamed: streamed.append(text))
            expected = plain.ask(sample_video, question, attention, SMALL, max_new_tokens=8)
            assert (answer.text, answer.new_tokens) == (expected.text, expected.new_tokens)
            assert streamed[-1] == answer.text and answer.tokens["cached"] == expected.tokens["cached"]
            assert made[-1].eager_steps == answer.new_tokens - 1 > 0 and made[-1].ahead
        assert answer.tokens["cached"] > 0


def test_steps_it_cannot_take_go_to_the_models_forward(tiny, sample_video):
    """Asked to capture on the CPU (no CUDA graphs there), every step goes to the model's own
    forward: no buffers reserved, the tokens and scores of transformers' decoding exactly."""
    model, processor = tiny["qwen3-vl"]
    inputs = VideoQA(model, processor, warmup=False).prepare(sample_video, "What colour is it?", SMALL).inputs
    expected, _, plain_cache = _generate(model, processor, inputs, 5, steps=False)
    got, graphs, cache = _generate(model, processor, inputs, 5, steps=True, capture=True)
    assert graphs.calls == 5 and graphs.eager_steps == graphs.replayed_steps == graphs.capacity == 0
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.scores, expected.scores, strict=True))
    # nothing reserved: the layers still lead the buffers their cache made at the prefill
    prompt = inputs["input_ids"].shape[1]
    assert all(room(layer)[0].shape[2] == capacity_for(prompt) for layer in cache.layers)


def test_a_cache_with_room_for_the_answer_is_reserved_in_place(tiny, sample_video, monkeypatch):
    """Over the pipeline's cache (models.cache), whose layers lead buffers with room, graph decoding
    reserves nothing: the steps write into the buffers the prefill made. Without room for the
    answer, the layers move into new buffers. The tokens and scores of transformers' decoding over
    its own cache (concatenating) either way."""
    import models.cache as room_cache

    model, processor = tiny["qwen2.5-vl"]
    layers = len(decode.tower(model, "language_model").layers)
    inputs = VideoQA(model, processor, warmup=False).prepare(sample_video, "What colour is it?", SMALL).inputs
    prompt = inputs["input_ids"].shape[1]
    with monkeypatch.context() as plain:
        plain.setattr(prefixes, "with_room", lambda cache: cache)
        expected, _, theirs = _generate(model, processor, inputs, 5, steps=False)
    assert room(theirs.layers[0]) is None  # (transformers' own cache)
    moved = []
    move = decode.move_into_room
    monkeypatch.setattr(decode, "move_into_room", lambda layer, *a: moved.append(layer) or move(layer, *a))
    for room_size, multiple, moves, capacity in ((room_cache.ROOM, room_cache.MULTIPLE, 0, capacity_for(prompt)),
                                                 (0, 1, layers, prompt + 5)):
        monkeypatch.setattr(room_cache, "ROOM", room_size)
        monkeypatch.setattr(room_cache, "MULTIPLE", multiple)
        moved.clear()
        got, graphs, _ = _generate(model, processor, inputs, 5, steps=True)
        assert graphs.eager_steps == 4 and len(moved) == moves and graphs.capacity == capacity
        assert torch.equal(got.sequences, expected.sequences)
        for ours, theirs in zip(got.scores, expected.scores, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_short_answers_and_disabled_leave_the_forward_alone(tiny):
    model, _ = tiny["qwen2-vl"]
    for new_tokens, enabled in ((decode.MIN_NEW_TOKENS - 1, True), (32, False)):
        with decode.graph_decoding(model, new_tokens, enabled=enabled) as graphs:
            assert graphs is None and "forward" not in model.__dict__


def test_rotary_positions_from_what_generate_passes():
    text_first = torch.tensor([45, 31, 31, 31]).view(4, 1, 1)
    assert torch.equal(decode._rotary_positions(text_first), text_first[1:])
    three = torch.tensor([7, 8, 9]).view(3, 1, 1)
    assert decode._rotary_positions(three) is three
    assert torch.equal(decode._rotary_positions(torch.tensor([[5]])), torch.full((3, 1, 1), 5))
    assert decode._rotary_positions(None) is None
    assert decode._rotary_positions(torch.zeros(3, 1, 2, dtype=torch.long)) is None  # not one token


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_graph_replays_give_generates_tokens_on_cuda(family, tiny_models, sample_video):
    """On the GPU in fp32 (dense attention: FlashPrefill's kernels take 16-bit floats): the model's
    first answer runs its first step eagerly and captures the second; the next answers replay the
    kept graph from their first step over their own caches (another prompt, another capacity);
    once a weight is replaced, the next answer captures its first step again. Tokens and scores as
    transformers' decoding throughout."""
    model, processor = load(tiny_models[family], attention="dense", device="cuda", dtype="fp32")
    qa = VideoQA(model, processor, warmup=False)
    inputs = qa.prepare(sample_video, "What colour is it?", SMALL).inputs
    other = qa.prepare(sample_video, "Where does the square go after it turns?", SMALL).inputs
    assert other["input_ids"].shape[1] > inputs["input_ids"].shape[1]
    # (prompt, new tokens, (eager steps, replayed steps, captures))
    runs = [(inputs, 9, (1, 7, 1)), (inputs, 9, (0, 8, 0)), (other, 70, (0, 69, 0)), (inputs, 5, (0, 4, 0))]
    for prompt, new_tokens, counts in runs:
        expected, _, _ = _generate(model, processor, prompt, new_tokens, steps=False)
        got, graphs, _ = _generate(model, processor, prompt, new_tokens, steps=True, capture=None)  # (CUDA: capture)
        assert (graphs.eager_steps, graphs.replayed_steps, graphs.captures) == counts
        assert not graphs.off and graphs.ahead
        assert torch.equal(got.sequences, expected.sequences)
        for ours, theirs in zip(got.scores, expected.scores, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone() * 2)  # replaced, not updated in place
    expected, _, _ = _generate(model, processor, inputs, 6, steps=False)
    got, graphs, _ = _generate(model, processor, inputs, 6, steps=True, capture=None)
    assert (graphs.eager_steps, graphs.captures) == (0, 1) and torch.equal(got.sequences, expected.sequences)


@pytest.mark.cuda
def test_demo_model_answers_the_same_with_graph_decoding(sample_video, made, checks):
    """The bundled demo model in bf16, as `videoprefill.run` loads it (its warm-up decoding as an
    answer does): graph decoding on (the default on CUDA, with the stop check a step behind) and
    off give the same answers, and every step after the first token was replayed from the graph the
    first warm-up captured and the model kept, in either attention mode, on the main thread and on
    another. Its answer to the colour question ends before max_new_tokens: the step queued past its
    end is undone."""
    qa = VideoQA.from_pretrained("demo", device="cuda")
    short = qa.ask(sample_video, DEMO_QUESTION, "sparse", max_new_tokens=12)
    assert short.new_tokens < 12 and made[-1].ahead and checks[-1].undone == 1
    # Replayed from the first step (the warm-up's graph kept), the undone step among the replays.
    assert (made[-1].eager_steps, made[-1].replayed_steps, made[-1].captures) == (0, short.new_tokens, 0)
    qa.graph_decode = False
    assert qa.ask(sample_video, DEMO_QUESTION, "sparse", max_new_tokens=12).text == short.text
    qa.graph_decode = True
    for attention in ("sparse", "dense"):
        question = "Describe this video."  # (not what the demo model learned: its answer runs long or ends early)
        on = qa.ask(sample_video, question, attention, max_new_tokens=12)
        # Every step read back a step late; one queued past an end of text (if any) replayed and undone.
        undone = checks[-1].undone
        assert on.new_tokens >= 4 and made[-1].replayed_steps == on.new_tokens - 1 + undone and not made[-1].off
        assert made[-1].captures == 0  # the graph kept since the first warm-up, in either mode
        assert made[-1].ahead and checks[-1].reads == on.new_tokens - 1 and undone == (on.new_tokens < 12)
        qa.graph_decode = False
        off = qa.ask(sample_video, question, attention, max_new_tokens=12)
        qa.graph_decode = True
        assert (on.text, on.new_tokens) == (off.text, off.new_tokens)
    # On a thread of its own, as the web UI runs each request: replayed there too.
    answers = []
    worker = threading.Thread(target=lambda: answers.append(qa.ask(sample_video, question, "sparse",
                                                                   max_new_tokens=12)))
    worker.start()
    worker.join()
    assert answers[0].text == on.text and made[-1].replayed_steps == answers[0].new_tokens - 1 + checks[-1].undone


@pytest.fixture
def checks(monkeypatch):
    """Every StepAheadStopCheck that generate makes while the test runs, in order."""
    return _instances(monkeypatch, stop_check, "StepAheadStopCheck")


class _Tokens:
    """A streamer that keeps what generate hands it: the prompt, then each new token."""

    def __init__(self):
        self.puts = []

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.puts.append("end")


class _StopAt:
    """A stopping criterion: done once the sequence is `length` tokens long (on the host, as the
    web UI's Stop is)."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_a_step_ahead_gives_the_same_tokens_scores_stream_and_cache(family, tiny, sample_video, checks):
    """The stop check a step behind (CPU: its logic, without the asynchronous copies): the tokens,
    scores, streamed tokens and cache of transformers' decoding; every step after the first read
    back a step late, nothing undone when the answer runs to max_new_tokens."""
    model, processor = tiny[family]
    inputs = VideoQA(model, processor, warmup=False).prepare(sample_video, "What colour is it?", SMALL).inputs
    prompt = inputs["input_ids"].shape[1]
    plain_stream, ahead_stream = _Tokens(), _Tokens()
    expected, _, plain_cache = _generate(model, processor, inputs, 6, steps=False, streamer=plain_stream)
    got, graphs, cache = _generate(model, processor, inputs, 6, steps=True, ahead=True, streamer=ahead_stream)
    assert graphs.ahead and len(checks) == 1 and (checks[0].reads, checks[0].undone) == (5, 0)
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ahead_stream.puts == plain_stream.puts and len(ahead_stream.puts) == 1 + 6 + 1
    assert cache.get_seq_length() == plain_cache.get_seq_length() == prompt + 5


def test_a_stop_seen_a_step_late_undoes_the_step_run_past_it(tiny, sample_video, checks):
    """Stopped by a criterion after 3 of 8 tokens: the step already queued for a 4th is undone (its
    token not returned, not streamed, its key and value cut from the cache), as transformers'
    decoding without it stops."""
    model, processor = tiny["qwen2.5-vl"]
    inputs = VideoQA(model, processor, warmup=False).prepare(sample_video, "What colour is it?", SMALL).inputs
    prompt = inputs["input_ids"].shape[1]
    plain_stream, ahead_stream = _Tokens(), _Tokens()
    criteria = dict(min_new_tokens=0, stopping_criteria=[_StopAt(prompt + 3)])
    expected, _, plain_cache = _generate(model, processor, inputs, 8, steps=False, streamer=plain_stream, **criteria)
    got, graphs, cache = _generate(model, processor, inputs, 8, steps=True, ahead=True, streamer=ahead_stream,
                                   **criteria)
    assert expected.sequences.shape[1] == prompt + 3
    assert torch.equal(got.sequences, expected.sequences) and len(got.scores) == 3
    assert ahead_stream.puts == plain_stream.puts
    assert graphs.eager_steps == 3 and (checks[0].reads, checks[0].undone) == (2, 1)  # steps 2-4 run, 4 undone
    assert cache.get_seq_length() == plain_cache.get_seq_length() == prompt + 2
    for ours, theirs in zip(cache.layers, plain_cache.layers, strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-4, atol=1e-4)


def test_the_stop_check_is_transformers_own_outside_step_ahead(tiny, sample_video, checks):
    """Only within step_ahead (and not for an assistant model) does generate defer its check; graph
    decoding with ahead=False and plain generate make no StepAheadStopCheck."""
    from transformers.generation import utils

    with stop_check.step_ahead() as ahead:
        assert ahead and utils.DeferredStopCheck.is_supported(torch.device("cpu"), None, False, is_assistant=False)
        assert not utils.DeferredStopCheck.is_supported(torch.device("cpu"), None, False, is_assistant=True)
    assert not utils.DeferredStopCheck.is_supported(torch.device("cpu"), None, False, is_assistant=False)
    model, processor = tiny["qwen2-vl"]
    inputs = VideoQA(model, processor, warmup=False).prepare(sample_video, "What colour is it?", SMALL).inputs
    _, graphs, _ = _generate(model, processor, inputs, 4, steps=True, ahead=False)
    _generate(model, processor, inputs, 4, steps=False)
    assert not graphs.ahead and checks == []
    with stop_check.step_ahead(enabled=False) as ahead:
        assert not ahead


def test_what_a_kept_step_depends_on(tiny):
    """A model's kept step serves its next answer only where nothing it baked in changed (its key):
    the same in both of our attention modes (both run a step's attention alike), another with
    another attention implementation, a replaced weight or another cache dtype."""
    from models.attention import set_attention

    model, _ = tiny["qwen2.5-vl"]
    steps = decode.StepGraphs(model, 8)
    steps.buffers = [(torch.zeros(1, 2, 64, 16), torch.zeros(1, 2, 64, 16))]
    head = model.get_output_embeddings()
    weight = head.weight
    try:
        set_attention(model, "sparse")
        key = steps._step_key()
        set_attention(model, "dense")
        assert steps._step_key() == key
        model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
        assert steps._step_key() != key
        set_attention(model, "sparse")
        head.weight = torch.nn.Parameter(weight.detach().clone())
        assert steps._step_key() != key
        head.weight = weight
        assert steps._step_key() == key
        steps.buffers = [(torch.zeros(1, 2, 64, 16, dtype=torch.float16),) * 2]
        assert steps._step_key() != key
    finally:
        head.weight = weight
        set_attention(model, "sparse")
