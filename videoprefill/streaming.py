"""The vision encoder run on a video's frames while the rest are still being read.

Reading the frames is host work (decord, on several threads); the vision encoder is GPU work.
Run one after the other they add up (0.4-0.5 s of reading before 1.6 s of vision encoder at 128K
video tokens on an H200, BENCHMARKS.md). Qwen-VL vision towers see a video as independent frame
pairs (temporal patches): every attention, windowed or full, stays within one pair, and the
rotary and learned position embeddings repeat per pair. So the tower's output for a video is
its outputs for any split of the video at pair boundaries, joined in order. Here the frames are
read in pieces that start at pair boundaries, and each piece is resized, put through the video
processor and the vision tower as soon as it is in; the model's own vision call then gets the
joined output (`vision_output`). Tests compare the answers with the whole-video path for the
three model families.

The prompt's ids and the other processor outputs depend only on the frames' count, size and
metadata, so they come from a stand-in video of that shape (a broadcast zero frame), before any
frame is read; its pixels are replaced by an empty placeholder, which the stock vision tower
rejects (a shape error), so a request built here cannot silently run the tower on nothing.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from .video import FramePlan, VideoError, read_planned, resize_frames

# Frames the vision tower takes per call at most: small enough that it starts early, large enough
# that its matmuls stay efficient (a 16-frame pair-aligned piece is 2,048 tokens at 448 x 448).
PIECE_FRAMES = 32
PIXELS = "pixel_values_videos"


@dataclass
class VisionOutput:
    """The vision tower's output for a whole video, computed ahead: `output` is what the tower
    returns for a call over `grid` (video_grid_thw); `seconds` the time from its first piece's
    start to its last piece's end (the frames still being read underneath)."""

    output: Any
    grid: torch.Tensor
    seconds: float


def join(parts: list) -> Any:
    """The vision tower's outputs for consecutive pieces of a video joined into its output for the
    whole: tensors concatenated along their first (token) dimension, lists and tuples element by
    element, model outputs field by field."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if first is None:
        return None
    if isinstance(first, dict):  # transformers' ModelOutput is an ordered dict of its set fields
        return type(first)(**{k: join([p[k] for p in parts]) for k in first})
    if isinstance(first, (list, tuple)):
        return type(first)(join(list(items)) for items in zip(*parts))
    raise TypeError(f"cannot join vision outputs of type {type(first).__name__}")


def _without_unused(output: Any) -> Any:
    """Drop the tower's pre-merger patch states when it returns the merged tokens beside them: the
    language model takes the merged tokens only (`pooler_output`, and Qwen3-VL's deepstack
    features), and the patch states are four times their size."""
    if isinstance(output, dict) and output.get("pooler_output") is not None and "last_hidden_state" in output:
        fields = {k: v for k, v in output.items() if k != "last_hidden_state"}
        return type(output)(**fields)
    return output


def _copy(output: Any) -> Any:
    """A shallow copy: transformers assigns to the fields of the output it is given."""
    if isinstance(output, dict):
        return type(output)(**dict(output))
    return output


@contextlib.contextmanager
def vision_output(model, vision: VisionOutput | None):
    """While open, the model's vision tower returns `vision.output` for a call on the empty
    placeholder over `vision.grid`, and runs as usual for any other call."""
    if vision is None:
        yield
        return
    visual = model.model.visual
    own = visual.__dict__.get("forward")
    stock = visual.forward

    def forward(hidden_states, grid_thw=None, **kwargs):
        if (hidden_states.shape[0] == 0 and grid_thw is not None
                and torch.equal(grid_thw.cpu(), vision.grid.cpu())):
            return _copy(vision.output)
        return stock(hidden_states, grid_thw=grid_thw, **kwargs)

    visual.forward = forward
    try:
        yield
    finally:
        if own is None:
            del visual.forward
        else:
            visual.forward = own


def placeholder(model, inputs: dict) -> None:
    """Put an empty tensor of the vision tower's dtype where the video's pixels go."""
    pixels = inputs[PIXELS]
    inputs[PIXELS] = pixels.new_empty((0, pixels.shape[-1]), dtype=model.model.visual.dtype)


class _Window:
    """The time from the first call's start to the last call's end: from CUDA events on the GPU
    (no synchronisation until `seconds`, events on several streams), host time on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.first = None
        self.ends: list = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()  # on the current stream
            return event
        return time.perf_counter()

    def start(self) -> None:
        if self.first is None:
            self.first = self._now()

    def stop(self) -> None:
        self.ends.append(self._now())

    def seconds(self) -> float:
        if self.first is None:
            return 0.0
        if self.cuda:
            return max(self.first.elapsed_time(end) for end in self.ends) / 1000
        return max(self.ends) - self.first


@torch.inference_mode()
def encode_while_reading(model, processor, plan: FramePlan, threads: int, device: torch.device,
                         processor_kwargs: dict, piece: int | None = None) -> tuple[torch.Tensor, VisionOutput]:
    """Read a plan's frames on `threads` threads and run each piece through the resize (on
    `device`), the video processor and the vision tower as soon as it is in, on this thread.

    Returns the uint8 (T, C, H, W) frames and the vision tower's output for the whole video.
    Raises VideoError when the frames cannot be read."""
    vp = processor.video_processor
    align = int(getattr(vp, "temporal_patch_size", 1) or 1)
    piece = piece or PIECE_FRAMES
    if piece % align:
        raise ValueError(f"piece ({piece}) must be a multiple of the temporal patch size ({align})")
    visual = model.model.visual
    ready: queue.Queue = queue.Queue()
    holder: dict = {}

    def read() -> None:
        try:
            holder["frames"] = read_planned(plan, threads, piece=piece, align=align,
                                            on_piece=lambda a, b, frames: ready.put((a, frames)))
            ready.put(None)
        except BaseException as err:  # handed to the encoding thread, which raises it
            ready.put(err)

    device = torch.device(device)
    # Pieces alternate between two streams: the vision tower synchronises with its stream a few
    # times per call (its window and position indices are read on the host), and on one stream
    # each of those would drain the GPU's queue before the next piece's work is queued.
    streams = [torch.cuda.Stream(device), torch.cuda.Stream(device)] if device.type == "cuda" else []
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream(device))
    reader = threading.Thread(target=read, name="videoprefill-read", daemon=True)
    reader.start()
    window = _Window(device)
    outputs: list[tuple[int, Any]] = []
    grids: list[torch.Tensor] = []
    try:
        while True:
            item = ready.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise VideoError(f"cannot sample frames: {str(item).strip().splitlines()[0][:200]}") from item
            a, raw = item  # written by the reading thread before it queued them
            on = torch.cuda.stream(streams[len(outputs) % 2]) if streams else contextlib.nullcontext()
            with on:
                if streams:  # from pinned memory the copy does not wait for the stream's queue
                    raw = raw.pin_memory().to(device, non_blocking=True)
                frames = resize_frames(raw, plan.size)
                pixels = vp(videos=[frames], do_resize=False, do_sample_frames=False, return_tensors="pt",
                            **processor_kwargs)
                grid = pixels["video_grid_thw"]
                window.start()
                out = visual(pixels[PIXELS].to(device=visual.device, dtype=visual.dtype),
                             grid_thw=grid.to(visual.device))
                window.stop()
            outputs.append((a, _without_unused(out)))
            grids.append(grid.cpu())
    finally:
        reader.join()
        for stream in streams:
            torch.cuda.current_stream(device).wait_stream(stream)
    outputs.sort(key=lambda pair: pair[0])
    whole = join([out for _, out in outputs])
    grid = torch.tensor([[sum(int(g[0, 0]) for g in grids), int(grids[0][0, 1]), int(grids[0][0, 2])]])
    return holder["frames"], VisionOutput(output=whole, grid=grid, seconds=window.seconds())
