import numpy as np
import pytest

from videoprefill.synthetic import COLOURS, LETTERS, NUMBERS, count, is_correct, needle, prompt_text, sample


def saturation(frame: np.ndarray) -> float:
    f = frame.reshape(-1, 3).astype(float)
    return float((f.max(1) - f.min(1)).mean())


def test_deterministic():
    a, b = sample(123, 32), sample(123, 32)
    assert np.array_equal(a.frames, b.frames) and (a.question, a.answer, a.options) == (b.question, b.answer, b.options)
    assert not np.array_equal(sample(124, 32).frames, a.frames)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_needle_answer_is_right_by_construction(seed, depth):
    s = needle(seed, 24, depth=depth)
    colourful = [t for t in range(s.num_frames) if saturation(s.frames[t]) > 60]
    start = colourful[0]
    assert colourful == [start, start + 1] and start % 2 == 0  # exactly one temporal patch
    assert abs(start / (s.num_frames - 2) - depth) <= 1 / (s.num_frames - 2) + 1e-9
    colour = s.options[LETTERS.index(s.answer)]
    mean = s.frames[start].reshape(-1, 3).mean(0)
    nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - mean).sum())
    assert nearest == colour and len(set(s.options)) == 4
    assert is_correct(s, s.answer) and is_correct(s, f"{s.answer}.") and not is_correct(s, "Z")
    assert prompt_text(s).splitlines()[1:5] == [f"{LETTERS[i]}. {o}" for i, o in enumerate(s.options)]


def test_short_answer_needle():
    s = needle(5, 16, depth=0.5, multiple_choice=False)
    assert s.options is None and s.answer in COLOURS and is_correct(s, s.answer.capitalize())


@pytest.mark.parametrize("seed", range(8))
def test_count_answer_is_right_by_construction(seed):
    s = count(seed, 20)
    bright = [t for t in range(s.num_frames) if s.frames[t].mean() > 200]
    assert len(bright) == 2 * NUMBERS.index(s.answer)


def test_bad_length():
    with pytest.raises(ValueError, match="even"):
        needle(0, 7)
