"""Frames read ahead of the question (`VideoQA.decode_ahead`, which the web UI starts on upload)."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch

from models import load
from videoprefill.pipeline import VideoQA
from videoprefill.video import Sampling, VideoError

SMALL = Sampling(fps=4.0, max_frames=8, max_pixels=56 * 56, min_pixels=28 * 28)
QUESTION = "What happens in this video?"


@pytest.fixture(scope="module")
def qa():
    return VideoQA(*load("demo", device="cpu"), warmup=False)


@pytest.fixture
def reads(qa, monkeypatch):
    """The name of the thread each `qa.decode` ran on, in order."""
    names: list[str] = []
    decode = qa.decode

    def spy(*args, **kwargs):
        names.append(threading.current_thread().name)
        return decode(*args, **kwargs)

    monkeypatch.setattr(qa, "decode", spy)
    qa.forget_prefix()
    yield names
    qa._take_ahead(None)


def test_the_question_takes_the_frames_read_ahead(qa, reads, sample_video):
    """The request reads nothing itself, builds the inputs a plain request builds, and reports the
    reading done before it apart from its own times."""
    plain = qa.prepare(sample_video, QUESTION, SMALL)
    assert reads == [threading.current_thread().name]
    qa.decode_ahead(sample_video, SMALL)
    qa._ahead[1].result()  # the read is done before the question comes
    ahead = qa.prepare(sample_video, QUESTION, SMALL)
    assert len(reads) == 2 and reads[1].startswith("videoprefill-decode-ahead")
    assert ahead.inputs.keys() == plain.inputs.keys()
    for name, value in plain.inputs.items():
        assert torch.equal(ahead.inputs[name], value), name
    assert ahead.decoded_ahead_s > 0 and plain.decoded_ahead_s == 0.0
    answer = qa.run(ahead, "sparse", max_new_tokens=2, reuse_prefix=False)
    t = answer.timings
    assert t["decoded_ahead_s"] == ahead.decoded_ahead_s
    assert t["ttft_s"] >= t["decode_video_s"] + t["vision_s"] + t["prefill_s"]
    assert qa._ahead is None  # taken: the frames are not held for a later request


def test_asking_again_for_the_video_being_read_keeps_its_read(qa, reads, sample_video):
    qa.decode_ahead(sample_video, SMALL)
    first = qa._ahead[1]
    qa.decode_ahead(sample_video, SMALL)
    assert qa._ahead[1] is first
    first.result()
    qa.prepare(sample_video, QUESTION, SMALL)
    assert len(reads) == 1 and reads[0].startswith("videoprefill-decode-ahead")


@pytest.fixture
def gate(qa, reads, monkeypatch):
    """An Event that `qa.decode` (spied on by `reads`) waits for before it reads."""
    gate = threading.Event()
    spy = qa.decode

    def slow(*args, **kwargs):
        gate.wait(10)
        return spy(*args, **kwargs)

    monkeypatch.setattr(qa, "decode", slow)
    return gate


def test_a_question_asked_while_the_read_runs_waits_for_it(qa, reads, gate, sample_video):
    """The question counts the part of the reading it waited for as its decode time."""
    qa.decode_ahead(sample_video, SMALL)
    threading.Timer(0.3, gate.set).start()
    prepared = qa.prepare(sample_video, QUESTION, SMALL)
    assert len(reads) == 1 and reads[0].startswith("videoprefill-decode-ahead")
    assert prepared.decode_s >= 0.25  # it waited for the gate


def test_a_newer_video_does_not_wait_behind_an_older_read(qa, reads, sample_video, tmp_path, monkeypatch):
    """A read cannot be stopped once decord runs; the next upload's read starts at once anyway."""
    older = str(tmp_path / "older.mp4")
    shutil.copy(sample_video, older)
    gate = threading.Event()
    spy = qa.decode

    def decode(video, *args, **kwargs):
        if video == older:
            gate.wait(30)
        return spy(video, *args, **kwargs)

    monkeypatch.setattr(qa, "decode", decode)
    try:
        qa.decode_ahead(older, SMALL)
        qa.decode_ahead(sample_video, SMALL)
        prepared = qa.prepare(sample_video, QUESTION, SMALL)  # the older read still held at the gate
        assert prepared.decode_s < 10  # it did not wait for the older read (up to 30 s)
        assert reads == ["videoprefill-decode-ahead"]  # the newer one's; the older has not got past its gate
    finally:
        gate.set()


@pytest.mark.parametrize("change", ["sampling", "video", "file"])
def test_frames_of_another_request_are_not_used(qa, reads, sample_video, tmp_path, change):
    """Other sampling, another video, or the file rewritten since: the request reads its own frames."""
    video = str(tmp_path / "clip.mp4")
    shutil.copy(sample_video, video)
    qa.decode_ahead(video, SMALL)
    qa._ahead[1].result()
    sampling, asked = SMALL, video
    if change == "sampling":
        sampling = Sampling(fps=2.0, max_frames=8, max_pixels=56 * 56, min_pixels=28 * 28)
    elif change == "video":
        asked = sample_video
    else:
        st = os.stat(video)
        os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    prepared = qa.prepare(asked, QUESTION, sampling)
    assert len(reads) == 2 and reads[1] == threading.current_thread().name
    assert prepared.decoded_ahead_s == 0.0 and qa._ahead is None


def test_a_bad_file_read_ahead_fails_its_question_with_the_usual_error(qa, reads, tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video\n" * 30)
    qa.decode_ahead(str(bad), SMALL)
    with pytest.raises(VideoError, match="cannot decode video"):
        qa.prepare(str(bad), QUESTION, SMALL)
    assert reads[0].startswith("videoprefill-decode-ahead")


def test_nothing_is_read_ahead_for_a_missing_file_or_a_kept_prefix(qa, reads, sample_video, tmp_path):
    qa.decode_ahead(str(tmp_path / "missing.mp4"), SMALL)
    assert qa._ahead is None
    qa.run(qa.prepare(sample_video, QUESTION, SMALL), "sparse", max_new_tokens=1)  # keeps the prefix
    qa.decode_ahead(sample_video, SMALL)
    assert qa._ahead is None and len(reads) == 1
    again = qa.prepare(sample_video, "And then?", SMALL)
    assert again.prefix_len > 0 and len(reads) == 1  # built on the kept prefix, nothing read


def test_finish_reading_waits_for_the_read_and_keeps_its_frames(qa, reads, gate, sample_video):
    """What a CLI calls before it exits on an error: the read running ahead ends first (its frames
    still there for a question); with nothing read ahead it returns at once."""
    qa.finish_reading()
    qa.decode_ahead(sample_video, SMALL)
    threading.Timer(0.3, gate.set).start()
    qa.finish_reading()
    assert gate.is_set() and qa._ahead[1].done() and len(reads) == 1
    prepared = qa.prepare(sample_video, QUESTION, SMALL)
    assert prepared.decode_s < 0.25 and len(reads) == 1  # taken, not read again
