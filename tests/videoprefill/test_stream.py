"""The answer handed over while it is generated (`VideoQA.run(on_text=...)`, which the web UI shows)."""

from __future__ import annotations

import pytest
import torch

from kernels import FlashPrefillConfig
from models import load
from videoprefill.pipeline import VideoQA, _AnswerStream
from videoprefill.video import Sampling

SMALL = Sampling(fps=4.0, max_frames=8, max_pixels=56 * 56, min_pixels=28 * 28)
SPARSE = FlashPrefillConfig(block_size=16, alpha=0.3, sink_blocks=1, window_blocks=1, last_full_blocks=1,
                            min_seq_len=0)
QUESTIONS = ("What colour is the square?", "Where does it go?")


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """An untrained tiny Qwen2.5-VL: its answers run to max_new_tokens, several words long."""
    return load(tiny_models["qwen2.5-vl"], config=SPARSE, device="cpu")


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_the_streamed_text_grows_into_the_answer(attention, tiny, sample_video):
    """Every call brings new text and the request's TTFT; the last call's text is the answer. The
    same answer as without streaming, for a first question (the dense one prefills in one call) and
    for a later one over the kept prefix."""
    qa = VideoQA(*tiny, warmup=False)
    plain = VideoQA(*tiny, warmup=False)
    for question in QUESTIONS:
        calls: list[tuple[str, float]] = []
        answer = qa.ask(sample_video, question, attention, SMALL, max_new_tokens=8,
                        on_text=lambda *call, calls=calls: calls.append(call))
        texts = [text for text, _ in calls]
        assert len(calls) >= 2 and len(set(texts)) == len(texts)
        assert texts[-1] == answer.text != ""
        assert {ttft_s for _, ttft_s in calls} == {answer.timings["ttft_s"]}
        expected = plain.ask(sample_video, question, attention, SMALL, max_new_tokens=8)
        assert (answer.text, answer.new_tokens) == (expected.text, expected.new_tokens)
        assert answer.tokens["cached"] == expected.tokens["cached"]
    assert answer.tokens["cached"] > 0  # the second question was served from the kept prefix


class _Clock:
    def __init__(self):
        self.marks = {}


def test_the_stream_skips_the_prompt_and_stamps_the_first_token(tiny):
    """The prompt's ids are not part of the answer; the first new token stamps the clock when the
    stopping criterion has not yet (and leaves an earlier stamp alone); a token that changes
    nothing visible (an end of text) calls nothing."""
    tokenizer = tiny[1].tokenizer
    ids = tokenizer("red square", add_special_tokens=False)["input_ids"]
    calls = []
    clock = _Clock()
    stream = _AnswerStream(tokenizer, clock, lambda: clock.marks["first_token"], lambda *c: calls.append(c))
    stream.put(torch.tensor([[11, 12, 13]]))
    assert calls == [] and clock.marks == {}
    stream.put(torch.tensor([ids[0]]))
    first = clock.marks["first_token"]
    assert calls == [(tokenizer.decode(ids[:1]).strip(), first)]
    for token in ids[1:]:
        stream.put(torch.tensor([token]))
    stream.put(torch.tensor([tokenizer.eos_token_id]))
    stream.end()
    assert calls[-1] == ("red square", first) and len(calls) == len(ids)
    assert clock.marks["first_token"] == first

    clock = _Clock()
    clock.marks["first_token"] = 1.0  # stamped by the stopping criterion first
    stream = _AnswerStream(tokenizer, clock, lambda: clock.marks["first_token"], lambda *c: calls.append(c))
    stream.put(torch.tensor([[11]]))
    stream.put(torch.tensor([ids[0]]))
    assert clock.marks["first_token"] == 1.0 and calls[-1][1] == 1.0


def test_stop_ends_generation_after_the_token_being_made(tiny, sample_video):
    """A stop set while the answer is generated (here on its first text) ends it there; one set
    before the request still lets the first token be made; without it the untrained model's
    answer runs to max_new_tokens."""
    import threading

    qa = VideoQA(*tiny, warmup=False)
    full = qa.ask(sample_video, QUESTIONS[0], "sparse", SMALL, max_new_tokens=8)
    assert full.new_tokens == 8 and not full.stopped
    stop = threading.Event()
    prepared = qa.prepare(sample_video, QUESTIONS[0], SMALL)
    answer = qa.run(prepared, "sparse", 8, on_text=lambda *_: stop.set(), stop=stop)
    assert answer.stopped and answer.new_tokens <= 2
    assert full.text.startswith(answer.text) and answer.timings["ttft_s"] > 0
    early = qa.run(qa.prepare(sample_video, QUESTIONS[1], SMALL), "dense", 8, stop=stop)
    assert early.stopped and early.new_tokens == 1
