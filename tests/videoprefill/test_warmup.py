"""VideoQA's warm-up: a short request on the bundled sample before the first with given settings (CPU, tiny model)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from models import load
from models.attention import current_settings
from models.tiny import FAMILIES
from videoprefill.pipeline import InputError, VideoQA
from videoprefill.video import Sampling, sample_video_path

SMALL = Sampling(fps=4.0, max_frames=8, max_pixels=56 * 56, min_pixels=28 * 28)


@pytest.fixture()
def spied(tiny_models, monkeypatch):
    """A VideoQA with its warm-up on, and the (video, min_seq_len, new tokens) of each generation and
    the videos decoded, in order."""
    model, processor = load(tiny_models["qwen2.5-vl"], device="cpu")
    qa = VideoQA(model, processor)
    events: list[tuple] = []
    generate, decode = qa._generate, qa.decode

    def spy_generate(prepared, key, state, max_new_tokens, *args, **kwargs):
        events.append(("generate", os.path.basename(prepared.video.path), current_settings().config.min_seq_len,
                       max_new_tokens))
        return generate(prepared, key, state, max_new_tokens, *args, **kwargs)

    def spy_decode(video, sampling=None):
        events.append(("decode", os.path.basename(video)))
        return decode(video, sampling)

    monkeypatch.setattr(qa, "_generate", spy_generate)
    monkeypatch.setattr(qa, "decode", spy_decode)
    return qa, events


def test_the_warm_up_runs_the_sample_not_the_request(spied, sample_video):
    """The first request with given settings is preceded by the sample, decoded before the user's
    video and run untimed with FlashPrefill from its first block, then as configured (sparse); the
    user's request runs once. Later requests with those settings warm nothing; other settings do."""
    qa, events = spied
    sample, clip = sample_video_path().name, os.path.basename(sample_video)
    config = dataclasses.replace(qa.config, min_seq_len=64)
    first = qa.ask(sample_video, "What happens?", "sparse", SMALL, max_new_tokens=2, config=config)
    assert events == [("decode", sample), ("generate", sample, 0, 1), ("generate", sample, 64, 1),
                      ("decode", clip), ("generate", clip, 64, 2)]
    assert first.video["path"].endswith(clip) and first.new_tokens >= 1

    events.clear()
    qa.forget_prefix()
    qa.ask(sample_video, "What happens?", "sparse", SMALL, max_new_tokens=2, config=config)
    assert events == [("decode", clip), ("generate", clip, 64, 2)]  # warm with these settings

    events.clear()
    qa.forget_prefix()
    qa.ask(sample_video, "What happens?", "dense", SMALL, max_new_tokens=2, config=config)
    # another mode: the sample once (dense has no min_seq_len to cross), decoded once per process
    assert events == [("generate", sample, 0, 1), ("decode", clip), ("generate", clip, 64, 2)]


def test_no_warm_up_when_turned_off_and_bad_questions_fail_first(spied, sample_video):
    qa, events = spied
    with pytest.raises(InputError, match="empty"):
        qa.ask(sample_video, "  ", "sparse", SMALL)
    assert events == []  # nothing warmed or decoded for a request that cannot run
    qa.warmup = False
    qa.ask(sample_video, "What happens?", "sparse", SMALL, max_new_tokens=1)
    assert [e[:2] for e in events] == [("decode", os.path.basename(sample_video)),
                                       ("generate", os.path.basename(sample_video))]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_warms_up_on_the_sample(family, tiny_models):
    """The sample's frames suit each family's processor (its patch and merge sizes): the warm-up
    prefills a prompt with video tokens and counts these settings as warm."""
    model, processor = load(tiny_models[family], device="cpu")
    qa = VideoQA(model, processor)
    seen = []
    generate = qa._generate
    qa._generate = lambda prepared, *a, **kw: seen.append(prepared) or generate(prepared, *a, **kw)
    qa.warm_up("sparse")
    assert len(seen) == (1 if qa.config.min_seq_len == 0 else 2)
    assert seen[0].video.path.endswith(sample_video_path().name) and seen[0].tokens["video"] > 0
    assert ("sparse", qa.config, 0, None) in qa._warm


def test_the_warm_up_runs_the_language_models_fused_adds(tiny_models, monkeypatch, sample_video):
    """With models.text.FUSED_ADDS_MIN_TOKENS above the sample's length, the warm-up still runs the
    decoder layers' fused residual adds (so a long first request compiles nothing); a request under
    the threshold after it keeps the stock layers. (On the CPU here the fused path is let run under
    Triton's interpreter.)"""
    import models.text as text

    monkeypatch.setattr(text, "FUSED_ADDS_MIN_TOKENS", 10_000)

    model, processor = load(tiny_models["qwen2.5-vl"], device="cpu")
    qa = VideoQA(model, processor)
    calls = []
    fused = text.norm_and_mlp_residuals
    monkeypatch.setattr(text, "norm_and_mlp_residuals", lambda *a, **k: calls.append(a[0].shape) or fused(*a, **k))
    monkeypatch.setattr(text, "_add_norm_here", lambda x: True)
    qa.warm_up("dense")
    layers = model.config.text_config.num_hidden_layers
    assert len(calls) >= layers and all(shape[1] < text.FUSED_ADDS_MIN_TOKENS for shape in calls)
    calls.clear()
    qa.ask(sample_video, "What happens?", "dense", SMALL, max_new_tokens=1)
    assert calls == []
