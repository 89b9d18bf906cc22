"""`generate`'s stop check a step behind, so the host queues the next decoding step while the GPU
still runs this one (`step_ahead`).

After each new token `generate` asks whether to stop: it reads `unfinished_sequences.max() == 0`
and hands the token to its streamer, and both wait for the GPU. Then the host does its own work
for the next token (processors, inputs, the streamer's callback, a graph's replay) while the GPU
waits for it. With graph decoding on the 7B model on an H200 that was 0.35-0.6 ms of a 7-9 ms
step (BENCHMARKS.md, twenty-ninth session), more on a slower host or with a slower callback.

transformers has the remedy, `DeferredStopCheck`: the flag and the token are copied to the host
without waiting and read one step later, so the host stays a step ahead. A step run past the end
of the answer is undone (its token dropped, the cache cut back by one). transformers 5.17-5.24 use
it only on Apple GPUs. Within `step_ahead()` its `generate` uses `StepAheadStopCheck` on every
device instead, which works the same way except that the first token is read and streamed at
once: the time to first token waited for it already, and a streamer shows it then.

A transformers without `DeferredStopCheck`, or with another form of it, checks as before (the
context yields False).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import threading

import torch

_AHEAD = contextvars.ContextVar("step_ahead", default=False)
_install_lock = threading.Lock()
_MARK = "_videoprefill_step_ahead"  # set on the class that takes transformers' place


@contextlib.contextmanager
def step_ahead(enabled: bool = True):
    """Within the block, `generate` on this thread checks for its stop a step behind (module
    docstring); yields whether it does."""
    if not enabled or not _install():
        yield False
        return
    token = _AHEAD.set(True)
    try:
        yield True
    finally:
        _AHEAD.reset(token)


class StepAheadStopCheck:
    """`generate`'s stop check (the interface of transformers' `StopCheck`: called after each new
    token with the unfinished flags, the token and the length; `finish` returns how many steps to
    undo). `reads` counts the steps read back a step late; `undone`, the steps undone."""

    def __init__(self, input_ids: torch.Tensor, max_length: int | None, cache, cache_is_returned: bool,
                 streamer=None):
        self.streamer, self.max_length = streamer, max_length
        # A cache that outlives generate is cut back by the step run past the end, as transformers does.
        self.cache = cache if cache_is_returned else None
        if self.cache is not None:
            self.cache.activate_past_recording()
        self.device = input_ids.device
        on_cuda = self.device.type == "cuda"
        self.slots = [(torch.zeros((), dtype=torch.bool, pin_memory=on_cuda),
                       torch.zeros(input_ids.shape[0], dtype=torch.long, pin_memory=on_cuda),
                       torch.cuda.Event() if on_cuda else None) for _ in range(2)]
        self.step = 0
        self.pending = None  # the slot of the step whose flag and token are still on their way
        self.stop_reported = False
        self.reads = self.undone = 0

    def __call__(self, unfinished: torch.Tensor, tokens: torch.Tensor, length: int) -> bool:
        self.step += 1
        if self.step == 1:  # the first token: read at once
            if self.streamer is not None:
                self.streamer.put(tokens.cpu())
            self.stop_reported = bool(unfinished.max() == 0)
        else:
            flag, held, done = slot = self.slots[self.step % 2]
            flag.copy_(unfinished.max() == 0, non_blocking=True)
            held.copy_(tokens, non_blocking=True)
            if done is not None:
                done.record(torch.cuda.current_stream(self.device))  # (where the copies above were queued)
            if self.pending is not None:
                self._read(self.pending)
            self.pending = slot
        stopping = self.stop_reported or (self.max_length is not None and length >= self.max_length)
        if not stopping and self.cache is not None:
            self.cache.crop(0)  # (lets a windowed layer drop what it kept for a cut back)
        return stopping

    def _read(self, slot) -> None:
        flag, held, done = slot
        if done is not None:
            done.synchronize()
        self.reads += 1
        if self.streamer is not None:
            self.streamer.put(held.clone())
        self.stop_reported = bool(flag)

    def finish(self) -> int:
        """Read the last step (streamed unless it ran past the end); the steps to undo, 0 or 1."""
        undo = 0
        if self.pending is not None:
            if self.stop_reported:  # the answer ended at the step before: this one is undone
                done = self.pending[2]
                if done is not None:
                    done.synchronize()  # (its copies land before the slots can be freed)
                undo = 1
            else:
                self._read(self.pending)
            self.pending = None
        self.undone += undo
        if self.cache is not None:
            self.cache.crop(-undo)
            for layer in self.cache.layers:
                if hasattr(layer, "record_past"):
                    layer.record_past = False
        return undo


def _install() -> bool:
    """Put a class in the place of transformers' `DeferredStopCheck` that routes to
    `StepAheadStopCheck` within `step_ahead` and to transformers' own elsewhere. False where this
    transformers has no `DeferredStopCheck` of the form known."""
    from transformers.generation import utils

    with _install_lock:
        theirs = getattr(utils, "DeferredStopCheck", None)
        if theirs is None:
            return False
        if getattr(theirs, _MARK, False):
            return True
        try:
            params = list(inspect.signature(theirs.__init__).parameters)
            supported = list(inspect.signature(theirs.is_supported).parameters)
        except (TypeError, ValueError):
            return False
        known = (params == ["self", "input_ids", "max_length", "cache", "cache_is_returned", "streamer"]
                 and supported == ["device", "cache", "cache_is_returned", "is_assistant"])
        if not known or not callable(getattr(theirs, "finish", None)):
            return False

        class Routed(theirs):
            @staticmethod
            def is_supported(device, cache, cache_is_returned, is_assistant):
                if _AHEAD.get() and not is_assistant:
                    # (transformers' condition, on every device: a cache that outlives generate must crop)
                    return cache is None or cache.is_croppable or not cache_is_returned
                return theirs.is_supported(device, cache, cache_is_returned, is_assistant=is_assistant)

            def __new__(cls, *args, **kwargs):
                # Not an instance of cls either way, so __init__ is not called again.
                return StepAheadStopCheck(*args, **kwargs) if _AHEAD.get() else theirs(*args, **kwargs)

        setattr(Routed, _MARK, True)
        utils.DeferredStopCheck = Routed
        return True
