"""Procedural videos with known answers, deterministic from a seed (for the demo model and the
needle-in-a-video-haystack benchmark).

Tasks:
- "needle": one coloured flash (two frames, one temporal patch) hidden among grey distractor
  frames at a chosen depth; asked as multiple choice (a letter) or as a short answer (a colour).
- "count": one to three white flashes; the answer is a number word.
Frames are uint8 (T, H, W, 3), 112 x 112 by default (the size the pipeline's default pixel bounds
keep as is); videos are meant to be read at 2 frames per second, every frame sampled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLOURS = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 230), "yellow": (235, 220, 30),
    "purple": (140, 40, 180), "orange": (240, 130, 20), "pink": (240, 120, 190), "white": (245, 245, 245),
}
NEEDLE_COLOURS = [c for c in COLOURS if c != "white"]
NUMBERS = ["zero", "one", "two", "three"]
# The question the bundled sample video (a yellow flash 60% of the way in) answers.
DEMO_QUESTION = "What colour is the flash? Answer with one word."
LETTERS = "ABCD"
VIDEO_FPS = 2


@dataclass
class Sample:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    question: str
    answer: str
    options: list[str] | None
    task: str
    depth: float | None
    seed: int

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def _background(rng: np.random.Generator, num_frames: int, size: int) -> np.ndarray:
    """Grey noise with a slowly moving darker square: something to look at that is not the answer."""
    frames = rng.integers(50, 95, size=(num_frames, size, size, 1), dtype=np.uint8).repeat(3, axis=3)
    side = size // 4
    x, y = rng.integers(0, size - side, size=2)
    dx, dy = rng.choice([-2, -1, 1, 2], size=2)
    for t in range(num_frames):
        x = int(np.clip(x + dx, 0, size - side))
        y = int(np.clip(y + dy, 0, size - side))
        frames[t, y : y + side, x : x + side] = 30
    return frames


def _flash(frames: np.ndarray, start: int, colour: tuple[int, int, int], rng: np.random.Generator) -> None:
    """Fill one temporal patch (frames start, start + 1) with a colour and a little noise."""
    noise = rng.integers(-12, 13, size=frames[start : start + 2].shape)
    frames[start : start + 2] = np.clip(np.array(colour)[None, None, None] + noise, 0, 255).astype(np.uint8)


def check_frame_counts(option: str, counts: list[int]) -> None:
    """ValueError unless every count is even and >= 2, as `needle` requires (the model takes frames
    in temporal pairs): command-line frame counts checked before any video is made. `option`
    names them in the message."""
    bad = [n for n in counts if n < 2 or n % 2]
    if bad:
        raise ValueError(f"{option} must be even frame counts >= 2, got {bad[0]}")


def needle(seed: int, num_frames: int, depth: float | None = None, size: int = 112,
           multiple_choice: bool = True) -> Sample:
    """A coloured flash at `depth` (0 = first frames, 1 = last) among grey frames."""
    if num_frames < 2 or num_frames % 2:
        raise ValueError(f"num_frames must be even and >= 2, got {num_frames}")
    rng = np.random.default_rng(seed)
    depth = float(rng.random()) if depth is None else float(depth)
    frames = _background(rng, num_frames, size)
    colour = NEEDLE_COLOURS[int(rng.integers(len(NEEDLE_COLOURS)))]
    start = 2 * int(round(depth * (num_frames // 2 - 1)))
    _flash(frames, start, COLOURS[colour], rng)
    question = "What colour is the flash?"
    if multiple_choice:
        others = [c for c in NEEDLE_COLOURS if c != colour]
        options = [colour] + [str(c) for c in rng.choice(others, size=3, replace=False)]
        rng.shuffle(options)
        return Sample(frames, question, LETTERS[options.index(colour)], options, "needle", depth, seed)
    return Sample(frames, question + " Answer with one word.", colour, None, "needle", depth, seed)


def count(seed: int, num_frames: int, size: int = 112) -> Sample:
    """One to three white flashes at distinct places."""
    rng = np.random.default_rng(seed)
    frames = _background(rng, num_frames, size)
    pairs = num_frames // 2
    n = int(rng.integers(1, min(3, pairs) + 1))
    for p in sorted(rng.choice(pairs, size=n, replace=False)):
        _flash(frames, 2 * int(p), COLOURS["white"], rng)
    return Sample(frames, "How many white flashes are there? Answer with one word.", NUMBERS[n], None, "count",
                  None, seed)


TRAINING_MIX = {"needle_mc": 0.5, "needle_short": 0.4, "count": 0.1}


def sample(seed: int, num_frames: int, size: int = 112, mix: dict[str, float] | None = None) -> Sample:
    """A task drawn from the seed: needle (multiple choice or short) or count, in proportions `mix`."""
    mix = mix or TRAINING_MIX
    rng = np.random.default_rng(seed + 7_000_003)
    kind = rng.choice(list(mix), p=np.array(list(mix.values())) / sum(mix.values()))
    if kind == "count":
        return count(seed, num_frames, size)
    return needle(seed, num_frames, size=size, multiple_choice=kind == "needle_mc")


def prompt_text(s: Sample) -> str:
    """The question as the model sees it (options lettered, as the batch runner writes them)."""
    if not s.options:
        return s.question
    lines = [s.question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(s.options)]
    return "\n".join(lines + ["Answer with the option's letter from the given choices directly."])


def is_correct(s: Sample, output: str) -> bool:
    words = output.strip().lower().replace(".", " ").split()
    if s.options:
        return bool(words) and words[0].upper() == s.answer
    return bool(words) and words[0] == s.answer


def write_video(s: Sample, path: str | os.PathLike) -> Path:
    """Write the frames as an mp4 at 2 frames per second (x264, quality 18)."""
    import av

    path = Path(path)
    h, w = s.frames.shape[1:3]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS, options={"crf": "18"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for frame in s.frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
