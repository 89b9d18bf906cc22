"""Video input: check a file with decord first, then sample frames as qwen-vl-utils does.

Frames are read as qwen-vl-utils' decord reader reads them, but on several threads, and resized
apart (`read_frames`, then `SampledFrames.resized` on the model's device), which gives
qwen-vl-utils' frames (bit for bit on the CPU) without its CPU resize in the way of a GPU.

qwen-vl-utils falls back to a torchvision reader that no longer exists when decord fails, which
hides the real error; so every file is opened and its first and last frames decoded here first,
and any failure becomes one VideoError that names the file and the cause.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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
        if self.total_pixels is not None and self.total_pixels < 1:
            raise ValueError(f"total_pixels must be positive, got {self.total_pixels}")

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


def probe(path: str | os.PathLike, decode_last: bool = True) -> VideoInfo:
    """Open the file with decord and decode its first and (with decode_last) last frames, or raise
    VideoError. decord's open already reads every packet, so it rejects a cut file; the last
    frame's decode (from the key frame before it: 0.2 s for a 1080p clip on 2 cores) is for a
    check before anything else runs, as the CLI does before loading the model."""
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
            if decode_last:
                reader[count - 1]
            fps = float(reader.get_avg_fps())
    except VideoError:
        raise
    except Exception as err:  # decord raises its own error types and RuntimeError
        raise VideoError(f"cannot decode video {p}: {_decord_cause(err)}") from err
    return VideoInfo(str(p), count, fps, int(first.shape[1]), int(first.shape[0]))


def _decord_cause(err: Exception) -> str:
    """decord's error as one short line: its first line, without the time, source line, file name
    and failed check that decord puts before its message; a file without a video stream (audio
    only) said so in words."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    line = text.splitlines()[0]
    if "cannot find video stream" in line:
        return "the file holds no video stream"
    line = re.sub(r"^\[[\d:]+\] \S+:\d+: (\[[^\]]*\] )?", "", line)  # "[05:49:51] video_reader.cc:270: [path] "
    if line.startswith("Check failed") and " ERROR " in line:
        line = line.split(" ERROR ", 1)[1]
    return line[:200]


# `_quiet_stderr` across threads (a video read ahead, or the batch runner's decoding thread, while
# another thread probes): the first to enter saves descriptor 2, the last to leave puts it back.
_quiet_lock = threading.Lock()
_quiet_done = threading.Condition(_quiet_lock)  # notified when the last thread leaves
_quiet_count = 0
_saved_stderr: int | None = None


def wait_for_stderr(timeout: float = 30.0) -> bool:
    """Wait until no thread has file descriptor 2 silenced (a video being read, `_quiet_stderr`),
    so that a message written to stderr now is seen: a CLI's error while its video is read ahead.
    False when `timeout` seconds passed first."""
    with _quiet_lock:
        return _quiet_done.wait_for(lambda: _quiet_count == 0, timeout)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (native libraries write there directly), for the whole process
    until the last thread inside leaves: two threads each saving and restoring it themselves could
    leave it pointing at /dev/null for good."""
    global _quiet_count, _saved_stderr
    with _quiet_lock:
        if _quiet_count == 0:
            try:
                _saved_stderr = os.dup(2)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 2)
                os.close(null)
            except OSError:
                pass  # left as it is
        _quiet_count += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_count -= 1
            if _quiet_count == 0 and _saved_stderr is not None:
                os.dup2(_saved_stderr, 2)
                os.close(_saved_stderr)
                _saved_stderr = None
            if _quiet_count == 0:
                _quiet_done.notify_all()


@dataclass
class SampledFrames:
    """The frames qwen-vl-utils samples from one video, as read (uint8 (T, C, H, W)), with the
    size it resizes them to and its metadata. `resized(device)` gives them resized."""

    raw: torch.Tensor
    size: tuple[int, int]
    metadata: dict
    sample_fps: float

    def resized(self, device=None) -> torch.Tensor:
        """Float (T, C, h, w) frames, 0-255: qwen-vl-utils' bicubic antialiased resize, run on
        `device` (the CPU by default). On the CPU it is qwen-vl-utils' result bit for bit; on CUDA
        torchvision resizes in fp32 and rounds to uint8 levels, which differ from the CPU's
        fixed-point path by one level in about one value in 80,000 (BENCHMARKS.md)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF  # noqa: N812

        frames = self.raw if device is None else self.raw.to(device)
        return TF.resize(frames, list(self.size), interpolation=InterpolationMode.BICUBIC, antialias=True).float()


# Frames each reading thread decodes at least (sampled or not): each thread opens its own reader
# (10-20 ms) and decodes from the key frame before its first frame, so short clips read on one.
MIN_DECODED_FRAMES_PER_THREAD = 256


def read_threads() -> int:
    """Threads `read_frames` reads a long video with by default: the cores this process may use, at
    most 16 (one decord reader each; the sweep in BENCHMARKS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(16, cores or 1))


def _read_decord(entry: dict, threads: int) -> tuple[torch.Tensor, dict, float]:
    """qwen-vl-utils' decord reader (0.0.14: the same frame range, frame count, indices, metadata
    and sampling rate, through its own functions; a one-frame video, which it refuses, is read as
    two copies of that frame), with the sampled frames read in contiguous runs
    on up to `threads` threads, each with its own decord reader, straight into one uint8 tensor.
    decord decodes every frame up to the sampled ones, on one core per reader, and releases the
    GIL while it does; the frames are the same bit for bit (tests compare them with qwen-vl-utils'
    reader)."""
    from concurrent.futures import ThreadPoolExecutor

    import decord
    import numpy as np
    import torch
    from qwen_vl_utils import vision_process as vp
    from torch.utils.dlpack import from_dlpack

    path = entry["video"]
    reader = decord.VideoReader(path, num_threads=1 if threads > 1 else 0)
    total_frames, video_fps = len(reader), reader.get_avg_fps()
    start_frame, end_frame, total_frames = vp.calculate_video_frame_range(entry, total_frames, video_fps)
    # A video of one frame (a still saved as a video), which qwen-vl-utils refuses, gives that frame
    # twice: the model takes frames in temporal pairs, as its processor pads a lone frame.
    nframes = vp.smart_nframes(entry, total_frames=max(total_frames, vp.FRAME_FACTOR), video_fps=video_fps)
    idx = torch.linspace(start_frame, end_frame, nframes).round().long().tolist()
    parts = max(1, min(threads, len(idx), (idx[-1] - idx[0] + 1) // MIN_DECODED_FRAMES_PER_THREAD))
    if parts == 1:
        frames = torch.from_numpy(reader.get_batch(idx).asnumpy())
    else:
        bounds = np.linspace(0, len(idx), parts + 1).round().astype(int).tolist()
        frames = torch.empty((len(idx), *reader[idx[0]].shape), dtype=torch.uint8)

        def read(k: int) -> None:  # decord's batch is taken as a tensor (DLPack) and copied once, in place
            own = reader if k == 0 else decord.VideoReader(path, num_threads=1)
            a, b = bounds[k], bounds[k + 1]
            frames[a:b].copy_(from_dlpack(own.get_batch(idx[a:b]).to_dlpack()))

        with ThreadPoolExecutor(parts) as pool:
            list(pool.map(read, range(parts)))  # list() re-raises a thread's error here
    metadata = {"fps": video_fps, "frames_indices": idx, "total_num_frames": total_frames, "video_backend": "decord"}
    return frames.permute(0, 3, 1, 2), metadata, nframes / max(total_frames, 1e-6) * video_fps


def check_frame_pixels(max_pixels: int, patch_size: int) -> None:
    """Refuse a per-frame pixel cap under one merged patch of the model (patch size x qwen-vl-utils'
    spatial merge, squared: 784 pixels for patch 14), which would resize the frames to no pixels."""
    from qwen_vl_utils import vision_process as vp

    factor = patch_size * vp.SPATIAL_MERGE_SIZE
    if max_pixels < factor * factor:
        raise ValueError(f"max_pixels must be at least {factor * factor} (one {factor} x {factor} patch of this "
                         f"model), got {max_pixels}")


def read_frames(entry: dict, patch_size: int, threads: int | None = None) -> SampledFrames:
    """Sample a video as qwen-vl-utils does (its decord reader: which frames, their metadata and
    sampling rate) and work out the size it resizes them to, without resizing them.

    qwen-vl-utils resizes inside `fetch_video` on the CPU, which for long videos takes seconds
    (2.2 s for 1,040 frames on 16 cores, BENCHMARKS.md); reading and resizing apart lets the
    resize run on the GPU. The size follows `fetch_video`'s rule (qwen-vl-utils 0.0.14);
    tests check the whole result against `process_vision_info` on the CPU.

    threads: how many threads read the frames (`read_threads()` when None); 1 reads them as
    qwen-vl-utils does, with one reader.
    """
    from qwen_vl_utils import smart_resize
    from qwen_vl_utils import vision_process as vp

    threads = read_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    try:
        raw, metadata, sample_fps = _read_decord(entry, threads)
    except Exception as err:
        raise VideoError(f"cannot sample frames: {_decord_cause(err)}") from err
    factor = patch_size * vp.SPATIAL_MERGE_SIZE
    nframes, _, height, width = raw.shape
    min_pixels = entry.get("min_pixels", vp.VIDEO_MIN_TOKEN_NUM * factor * factor)
    total_pixels = entry.get("total_pixels", vp.MODEL_SEQ_LEN * factor * factor * 0.9)
    max_pixels = max(min(vp.VIDEO_MAX_TOKEN_NUM * factor * factor, total_pixels / nframes * vp.FRAME_FACTOR),
                     int(min_pixels * 1.05))
    max_pixels = min(entry.get("max_pixels", max_pixels), max_pixels)
    if "resized_height" in entry and "resized_width" in entry:
        size = smart_resize(entry["resized_height"], entry["resized_width"], factor=factor)
    else:
        check_frame_pixels(max_pixels, patch_size)
        size = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return SampledFrames(raw, tuple(size), metadata, float(sample_fps))


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
