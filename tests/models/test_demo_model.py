"""The shipped demo model: loads offline and answers held-out generated questions."""

from __future__ import annotations

import json

import pytest

from models import load
from models.tiny import SHIPPED_DEMO, shipped_demo
from videoprefill.pipeline import VideoQA
from videoprefill.synthetic import DEMO_QUESTION, count, is_correct, needle, prompt_text, write_video
from videoprefill.train_demo import HELD_OUT_SEED
from videoprefill.video import Sampling, sample_video_path

# The frames are 112 x 112 at 2 fps: sample every frame at that size.
EXACT = Sampling(fps=2.0, max_frames=512, min_pixels=112 * 112, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def qa():
    assert shipped_demo() is not None, f"the trained demo model is missing from {SHIPPED_DEMO}"
    model, processor = load("demo", device="cpu")
    return VideoQA(model, processor, warmup=False)


def test_shipped_record(qa):
    record = json.loads((SHIPPED_DEMO / "videoprefill.json").read_text())
    assert record["trained"] is True and qa.info.trained is True
    assert record["command"].startswith("python -m videoprefill.train_demo")
    assert record["steps"] > 0 and record["final_held_out_accuracy"]


def test_answers_the_bundled_sample(qa):
    answer = qa.ask(str(sample_video_path()), DEMO_QUESTION, sampling=EXACT, max_new_tokens=3)
    assert answer.text.lower().startswith("yellow")


@pytest.mark.parametrize("task", ["mc", "short", "count"])
def test_answers_held_out_questions(qa, tmp_path, task):
    hits = 0
    for i in range(4):
        seed = HELD_OUT_SEED + 555_555 + 17 * i
        if task == "count":
            s = count(seed, 24)
        else:
            s = needle(seed, 24 + 8 * i, depth=i / 3, multiple_choice=task == "mc")
        path = write_video(s, tmp_path / f"{task}{i}.mp4")
        answer = qa.ask(str(path), prompt_text(s), sampling=EXACT, max_new_tokens=3)
        hits += is_correct(s, answer.text)
    assert hits >= 3, f"{hits}/4 held-out {task} questions answered"
