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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

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
        return resize_frames(self.raw, self.size, device)


def resize_frames(raw: torch.Tensor, size: tuple[int, int], device=None) -> torch.Tensor:
    """uint8 (T, C, H, W) frames resized to `size` as qwen-vl-utils resizes them, on `device` (the
    CPU by default), as float (T, C, h, w), 0-255. Frame by frame: any slice of the frames gives
    that slice of the whole."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF  # noqa: N812

    frames = raw if device is None else raw.to(device)
    return TF.resize(frames, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True).float()


# Frames each reading thread decodes at least (sampled or not): each thread opens its own reader
# (10-20 ms) and decodes from the key frame before its first frame, so short clips read on one.
MIN_DECODED_FRAMES_PER_THREAD = 256


def read_threads() -> int:
    """Threads `read_frames` reads a long video with by default: the cores this process may use, at
    most 16 (one decord reader each; the sweep in BENCHMARKS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(16, cores or 1))


@dataclass
class FramePlan:
    """What qwen-vl-utils' decord reader takes from one video, decided before any frame is read:
    the sampled frame indices, their metadata and sampling rate, the frames' size as read and the
    size it resizes them to. `read_planned` reads them."""

    path: str
    indices: list[int]
    metadata: dict
    sample_fps: float
    shape: tuple[int, int, int]  # (H, W, C) as decoded
    size: tuple[int, int]  # (h, w) after the resize
    reader: object = None  # the open decord reader (reused by the first reading thread)

    @property
    def num_frames(self) -> int:
        return len(self.indices)


def _plan_decord(entry: dict, patch_size: int, decoder_threads: int) -> FramePlan:
    """qwen-vl-utils' decord reader (0.0.14) up to the read: the same frame range, frame count,
    indices, metadata and sampling rate, through its own functions; and the size `fetch_video`
    resizes to, by its rule."""
    import decord
    import torch
    from qwen_vl_utils import smart_resize
    from qwen_vl_utils import vision_process as vp

    path = entry["video"]
    reader = decord.VideoReader(path, num_threads=decoder_threads)
    total_frames, video_fps = len(reader), reader.get_avg_fps()
    start_frame, end_frame, total_frames = vp.calculate_video_frame_range(entry, total_frames, video_fps)
    nframes = vp.smart_nframes(entry, total_frames=total_frames, video_fps=video_fps)
    idx = torch.linspace(start_frame, end_frame, nframes).round().long().tolist()
    metadata = {"fps": video_fps, "frames_indices": idx, "total_num_frames": total_frames, "video_backend": "decord"}
    shape = tuple(int(d) for d in reader[idx[0]].shape)
    height, width = shape[0], shape[1]
    factor = patch_size * vp.SPATIAL_MERGE_SIZE
    min_pixels = entry.get("min_pixels", vp.VIDEO_MIN_TOKEN_NUM * factor * factor)
    total_pixels = entry.get("total_pixels", vp.MODEL_SEQ_LEN * factor * factor * 0.9)
    max_pixels = max(min(vp.VIDEO_MAX_TOKEN_NUM * factor * factor, total_pixels / nframes * vp.FRAME_FACTOR),
                     int(min_pixels * 1.05))
    max_pixels = min(entry.get("max_pixels", max_pixels), max_pixels)
    if "resized_height" in entry and "resized_width" in entry:
        size = smart_resize(entry["resized_height"], entry["resized_width"], factor=factor)
    else:
        size = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return FramePlan(path, idx, metadata, nframes / max(total_frames, 1e-6) * video_fps, shape, tuple(size), reader)


def plan_frames(entry: dict, patch_size: int, decoder_threads: int = 1) -> FramePlan:
    """The frames qwen-vl-utils samples from a video and the size it resizes them to, decided with
    one decoded frame; VideoError when the file cannot be sampled. decoder_threads: decord's own
    threads for the plan's reader (0: its default, as qwen-vl-utils opens it), which the first
    reading thread goes on with."""
    try:
        return _plan_decord(entry, patch_size, decoder_threads)
    except Exception as err:
        raise VideoError(f"cannot sample frames: {str(err).strip().splitlines()[0][:200]}") from err


def _runs_for(n: int, threads: int, first: int, last: int, align: int) -> list[int]:
    """Bounds of the contiguous runs that `threads` readers take of n sampled frames (original
    indices first..last), each starting at a multiple of `align`."""
    parts = max(1, min(threads, n // align, (last - first + 1) // MIN_DECODED_FRAMES_PER_THREAD))
    bounds = sorted({min(n, round(n * k / parts / align) * align) for k in range(parts)} | {n})
    return bounds if bounds[0] == 0 else [0, *bounds]


def _pieces(a: int, b: int, piece: int | None, align: int) -> list[tuple[int, int]]:
    """[a, b) cut into near-equal pieces of at most `piece` frames starting at multiples of `align`
    (one piece when piece is None)."""
    if piece is None or b - a <= piece:
        return [(a, b)]
    count = -(-(b - a) // piece)
    cuts = sorted({a + round((b - a) * k / count / align) * align for k in range(count)} | {b})
    return list(zip(cuts, cuts[1:]))


def read_planned(plan: FramePlan, threads: int, piece: int | None = None, align: int = 1,
                 on_piece: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Read a plan's frames into one uint8 (T, C, H, W) tensor: contiguous runs on up to `threads`
    threads, each with its own decord reader (decord decodes every frame up to the sampled ones,
    on one core per reader, and releases the GIL while it does). Each run is read in pieces of at
    most `piece` frames that start at multiples of `align`; `on_piece(a, b)` is called from the
    reading thread once frames [a, b) are in the tensor. The frames are qwen-vl-utils' bit for bit
    (tests compare them with its reader)."""
    from concurrent.futures import ThreadPoolExecutor

    import decord
    import torch
    from torch.utils.dlpack import from_dlpack

    idx = plan.indices
    h, w, c = plan.shape
    frames = torch.empty((len(idx), h, w, c), dtype=torch.uint8)
    bounds = _runs_for(len(idx), threads, idx[0], idx[-1], align)

    def read(k: int) -> None:  # decord's batch is taken as a tensor (DLPack) and copied once, in place
        own = plan.reader if k == 0 and plan.reader is not None else decord.VideoReader(plan.path, num_threads=1)
        for a, b in _pieces(bounds[k], bounds[k + 1], piece, align):
            frames[a:b].copy_(from_dlpack(own.get_batch(idx[a:b]).to_dlpack()))
            if on_piece is not None:
                on_piece(a, b, frames[a:b].permute(0, 3, 1, 2))

    if len(bounds) == 2:
        read(0)
    else:
        with ThreadPoolExecutor(len(bounds) - 1) as pool:
            list(pool.map(read, range(len(bounds) - 1)))  # list() re-raises a thread's error here
    return frames.permute(0, 3, 1, 2)


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
    threads = read_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    plan = plan_frames(entry, patch_size, decoder_threads=1 if threads > 1 else 0)
    try:
        raw = read_planned(plan, threads)
    except Exception as err:
        raise VideoError(f"cannot sample frames: {str(err).strip().splitlines()[0][:200]}") from err
    return SampledFrames(raw, plan.size, plan.metadata, float(plan.sample_fps))


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
