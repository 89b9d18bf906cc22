"""Video input: check a file with decord first, then sample frames through qwen-vl-utils.

qwen-vl-utils falls back to a torchvision reader that no longer exists when decord fails, which
hides the real error; so every file is opened and its first and last frames decoded here first,
and any failure becomes one VideoError that names the file and the cause.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")


class VideoError(ValueError):
    """A video that cannot be used: missing, empty, truncated or not a video."""


@dataclass(frozen=True)
class VideoInfo:
    path: str
    num_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


@dataclass(frozen=True)
class Sampling:
    """How frames are taken from a video. Pixels are per frame (max_pixels) and over the clip (total_pixels)."""

    fps: float | None = 2.0
    num_frames: int | None = None
    max_frames: int = 64
    min_pixels: int = 16 * 28 * 28
    max_pixels: int = 256 * 28 * 28
    total_pixels: int | None = None

    def __post_init__(self) -> None:
        if (self.fps is None) == (self.num_frames is None):
            raise ValueError("give exactly one of fps and num_frames")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.num_frames is not None and self.num_frames < 2:
            raise ValueError(f"num_frames must be at least 2, got {self.num_frames}")
        if self.max_frames < 2:
            raise ValueError(f"max_frames must be at least 2, got {self.max_frames}")
        if self.max_pixels < 1 or self.min_pixels < 1:
            raise ValueError(f"pixel bounds must be positive, got min {self.min_pixels}, max {self.max_pixels}")

    def video_entry(self, path: str) -> dict:
        entry: dict = {"type": "video", "video": path, "max_pixels": self.max_pixels,
                       "min_pixels": min(self.min_pixels, self.max_pixels)}
        if self.fps is not None:
            entry.update(fps=float(self.fps), max_frames=self.max_frames, min_frames=2)
        else:
            entry["nframes"] = self.num_frames
        if self.total_pixels is not None:
            entry["total_pixels"] = self.total_pixels
        return entry


def probe(path: str | os.PathLike) -> VideoInfo:
    """Open the file with decord and decode its first and last frames, or raise VideoError."""
    p = Path(path)
    if not p.exists():
        raise VideoError(f"video not found: {p}")
    if not p.is_file():
        raise VideoError(f"not a file: {p}")
    if p.stat().st_size == 0:
        raise VideoError(f"video file is empty: {p}")
    import decord

    try:
        with _quiet_stderr():  # FFmpeg and decord print their own lines; the error below says it once
            reader = decord.VideoReader(str(p), num_threads=1)
            count = len(reader)
            if count == 0:
                raise VideoError(f"video has no frames: {p}")
            first = reader[0]
            reader[count - 1]
            fps = float(reader.get_avg_fps())
    except VideoError:
        raise
    except Exception as err:  # decord raises its own error types and RuntimeError
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VideoError(f"cannot decode video {p}: {cause[:200]}") from err
    return VideoInfo(str(p), count, fps, int(first.shape[1]), int(first.shape[0]))


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (native libraries write there directly)."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def sample_frames(messages: list[dict], patch_size: int):
    """Frames and metadata of the videos in `messages`, through qwen-vl-utils (decord backend)."""
    from qwen_vl_utils import process_vision_info

    try:
        _, videos, video_kwargs = process_vision_info(
            messages, return_video_kwargs=True, return_video_metadata=True, image_patch_size=patch_size
        )
    except Exception as err:
        raise VideoError(f"cannot sample frames: {str(err).strip().splitlines()[0][:200]}") from err
    frames = [v[0] for v in videos]
    metadata = [v[1] for v in videos]
    return frames, metadata, video_kwargs


def sample_video_path() -> Path:
    """The bundled sample video."""
    return Path(__file__).parent / "assets" / "sample.mp4"


def write_test_video(path: str | os.PathLike, seconds: float = 4.0, fps: int = 8, size: tuple[int, int] = (112, 112),
                     seed: int = 0) -> Path:
    """Write a small deterministic mp4 (moving coloured squares on a gradient) with PyAV."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    w, h = size
    n = int(seconds * fps)
    colours = rng.integers(40, 255, size=(3, 3))
    starts = rng.integers(0, min(w, h) // 2, size=(3, 2))
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(n):
            img = np.zeros((h, w, 3), dtype=np.uint8)
            img[..., 0] = (xx * 255 // max(w - 1, 1)).astype(np.uint8)
            img[..., 2] = (yy * 255 // max(h - 1, 1)).astype(np.uint8)
            for c in range(3):
                x0 = int(starts[c, 0] + i * (c + 1)) % (w - 16)
                y0 = int(starts[c, 1] + i * (3 - c)) % (h - 16)
                img[y0 : y0 + 16, x0 : x0 + 16] = colours[c]
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
