"""VideoQA: video + question -> answer, with a time-to-first-token breakdown and a sparsity record.

Stages, each closed by a GPU synchronisation so a stage's time is its own:
  decode_video_s  open and check the file, sample and resize frames, build the prompt and the
                  processor's tensors (everything before the model runs)
  vision_s        the vision encoder
  prefill_s       the language model over the whole prompt (FlashPrefill or dense): the video
                  prefix, then the question's tokens over its KV cache (videoprefill.prefix);
                  one call where every layer attends densely (ONE_CALL_WHEN_DENSE)
  first_token_s   from the end of prefill to the first token chosen (LM head, sampling)
  ttft_s          from the request (a video path) to the first token
  total_s         the whole request, all new tokens included
  decoded_ahead_s reading the frames done before the request, by `VideoQA.decode_ahead` (the web
                  UI starts it when a video is uploaded, `videoprefill.run` when its model has
                  loaded, before the warm-up); not part of the request's times, whose
                  decode_video_s keeps only what it still waited for (0 without a decode ahead)

A question about the video of the previous question, with the same sampling and attention
settings, reuses that video's prefix: no decoding, no vision encoder, and a prefill of the
question's tokens only (`tokens["cached"]` says how many tokens came from the cache).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from kernels import FlashPrefillConfig
from kernels.flash_prefill.api import plain_pattern_launches, split_kv_at_every_length
from models.attention import RequestSettings, SparsityRecorder, current_settings, request_settings, set_attention
from models.decode import MIN_NEW_TOKENS, graph_decoding
from models.text import fused_adds_at_every_length

from . import prefix as prefixes
from .tokens import collapsed_runs
from .video import SampledFrames, Sampling, VideoError, VideoInfo, probe, read_frames, sample_video_path

DEFAULT_QUESTION = "Describe this video."
ATTENTION_MODES = ("sparse", "dense")
# The warm-up request's frames: the bundled sample video at 112 x 112 pixels, 384 video tokens on
# Qwen2.5-VL (`VideoQA.warm_up`).
WARMUP_SAMPLING = Sampling(fps=2.0, max_frames=512, min_pixels=112 * 112, max_pixels=112 * 112)
# A request that computes its video prefix, where every layer attends densely over the whole prompt
# (the dense mode; the sparse mode under min_seq_len without a fixed density), prefills in one
# `generate` call and keeps the prefix's part of its KV cache: the two calls compute the same
# there, and the question's call over the cache, bound by host time, made a short video's first
# question 23-38 ms later on an H200 (TTFT 59.6 against 82.9 ms at 1K video tokens; BENCHMARKS.md,
# twenty-second session, run 4). False: always two calls.
ONE_CALL_WHEN_DENSE = True


class InputError(ValueError):
    """A request that cannot be served as given (bad video, empty question, bad settings)."""


# The name of the thread each `VideoQA.decode_ahead` reads on (a CLI about to exit looks for it).
READ_AHEAD_THREAD = "videoprefill-decode-ahead"


@dataclass
class DecodedVideo:
    """The sampled frames of one video, reusable for several questions. They are resized when a
    question needs them (`frames`): on a GPU each time (0.11 s for 1,040 frames on an H200, and
    no GPU memory held between questions), on the CPU once (seconds) and kept."""

    info: VideoInfo
    sampled: SampledFrames
    decode_s: float
    sampling: Sampling = field(default_factory=Sampling)
    ahead_s: float = 0.0  # of the reading, what `VideoQA.decode_ahead` did before the request (not in decode_s)
    _resized_on_cpu: torch.Tensor | None = field(default=None, repr=False)

    def frames(self, device: torch.device) -> torch.Tensor:
        """Float (T, C, h, w) frames as qwen-vl-utils resizes them, on `device`."""
        if device.type == "cuda":
            return self.sampled.resized(device)
        if self._resized_on_cpu is None:
            self._resized_on_cpu = self.sampled.resized()
        return self._resized_on_cpu


@dataclass
class Prepared:
    """A request after decoding: the model inputs and what is known of them."""

    video: VideoInfo
    question: str
    inputs: dict  # without pixels when built on a kept prefix (videoprefill.prefix)
    decode_s: float
    tokens: dict
    video_ranges: list[tuple[int, int]]
    sampled_frames: int
    sampling: Sampling = field(default_factory=Sampling)
    prefix_len: int = 0  # tokens through the last video token (0: counted when it runs)
    video_key: tuple | None = None
    decoded: DecodedVideo | None = field(default=None, repr=False)  # frames, for inputs built on a prefix
    decoded_ahead_s: float = 0.0  # reading done before the request (`VideoQA.decode_ahead`), not in decode_s


@dataclass
class Answer:
    text: str
    attention: str
    model: str
    trained: bool
    timings: dict
    tokens: dict
    sparsity: dict
    video: dict
    new_tokens: int
    config: dict = field(default_factory=dict)
    stopped: bool = False  # generation was stopped before its end (`VideoQA.run`'s `stop`)

    @property
    def ms_per_token(self) -> float | None:
        """Milliseconds per new token after the first, (total - TTFT) / (new tokens - 1); None
        with fewer than two."""
        if self.new_tokens < 2:
            return None
        return 1000 * (self.timings["total_s"] - self.timings["ttft_s"]) / (self.new_tokens - 1)

    def after_first(self) -> str:
        """"N more tokens at X ms each" (the tokens after the first), or "" with fewer than two."""
        ms = self.ms_per_token
        if ms is None:
            return ""
        more = self.new_tokens - 1
        return f"{more} more token{'s' if more > 1 else ''} at {ms:.1f} ms each"

    def to_json(self) -> dict:
        sparsity = {k: v for k, v in self.sparsity.items() if k != "masks"}
        return {
            "answer": self.text, "attention": self.attention, "model": self.model, "trained": self.trained,
            "timings": self.timings, "tokens": self.tokens, "sparsity": sparsity, "video": self.video,
            "new_tokens": self.new_tokens, "config": self.config,
        }


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _StageClock:
    """Forward hooks that add up the time of the vision tower's and the language model's calls
    before the first token (the prefix and the question's tokens: two language-model calls), and
    a stopping criterion that stamps the first chosen token."""

    def __init__(self, model, device: torch.device):
        self.device = device
        self.marks: dict[str, float] = {}
        self.totals = {"vision": 0.0, "prefill": 0.0}
        self._open: dict[str, float] = {}
        self.handles = []
        for name, module in (("vision", model.model.visual), ("prefill", model.model.language_model)):
            self.handles.append(module.register_forward_pre_hook(self._start(name)))
            self.handles.append(module.register_forward_hook(self._end(name)))

    def _start(self, name):
        def hook(module, args):
            if "first_token" not in self.marks:
                self._open[name] = _sync(self.device)
        return hook

    def _end(self, name):
        def hook(module, args, output):
            if name in self._open:
                now = _sync(self.device)
                self.totals[name] += now - self._open.pop(name)
                self.marks[f"{name}_end"] = now
        return hook

    def first_token_stopper(self):
        clock = self

        from transformers import StoppingCriteria

        class _FirstToken(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                if "first_token" not in clock.marks:
                    clock.marks["first_token"] = _sync(clock.device)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        return _FirstToken()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _stop_when_set(stop):
    """A stopping criterion for `generate`: every sequence is done once `stop` (an Event) is set."""
    from transformers import StoppingCriteria

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    return _Stop()


class _AnswerStream:
    """A `generate` streamer that hands the answer so far to `on_text(text, ttft_s)` after each new
    token: the text decoded as `VideoQA.run` decodes the answer (special tokens skipped, stripped),
    on the first token and whenever it changes; ttft_s, the request's time to first token (the value
    `timings["ttft_s"]` gets). It runs on the generating thread between decoding steps. The first
    new token's arrival on the host is a synchronisation point already, so it stamps the clock's
    first token there, before any work of its own, unless the stopping criterion did (whichever
    of the two transformers calls first)."""

    def __init__(self, tokenizer, clock: _StageClock, ttft_s, on_text):
        self.tokenizer = tokenizer
        self.clock = clock
        self.ttft_s = ttft_s  # () -> the request's TTFT, once the first token is stamped
        self.on_text = on_text
        self.ids: list[int] = []
        self.text: str | None = None
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        self.clock.marks.setdefault("first_token", time.perf_counter())
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        if text != self.text:
            self.text = text
            self.on_text(text, self.ttft_s())

    def end(self) -> None:
        pass


def _on_model_device(method):
    """A `VideoQA` method run with the model's device current (`VideoQA.on_device`)."""

    @functools.wraps(method)
    def on_device(self, *args, **kwargs):
        with self.on_device():
            return method(self, *args, **kwargs)

    return on_device


@contextlib.contextmanager
def _at_long_lengths():
    """The warm-up's first pass on CUDA: what a long prompt runs, at the warm-up's short length (the
    fused residual adds; a question's split-KV attention over the cache, which a long video's first
    question would otherwise compile, about a second)."""
    with fused_adds_at_every_length(), split_kv_at_every_length():
        yield


class VideoQA:
    """Question answering over a video with a loaded Qwen-VL model (see models.load)."""

    def __init__(self, model, processor, mask_layers: tuple[int, ...] | None = None, warmup: bool = True):
        """warmup: before the first request with given settings, run a short one untimed
        (`warm_up`), so one-time costs (Triton compilation, cuDNN plans, lazy loading) stay out of
        the reported timings."""
        self.model = model
        self.warmup = warmup
        self._warm: set[tuple] = set()  # settings keys (`_settings`) a request ran with
        self._warmup_request: Prepared | None = None
        self.processor = processor
        self.info = getattr(model, "videoprefill", None)
        self.device = next(model.parameters()).device
        num_layers = model.config.text_config.num_hidden_layers
        self.mask_layers = mask_layers if mask_layers is not None else (num_layers // 2, num_layers - 1)
        self.video_token_id = model.config.video_token_id
        self._attention = None
        self.processor_on_gpu = True  # False: resize and video processor on the CPU (for comparisons)
        # Keep the last video's prefix and its KV caches for the next question (False: every
        # question computes its prefix and nothing is held between requests).
        self.prefix_cache = True
        # KV caches kept of that prefix, one per attention setting: 2 serve the compare mode's dense
        # and sparse runs (a later question reuses both); a prefill that runs out of GPU memory
        # while another setting's cache is kept frees it and runs again, and from then on prefixes
        # as long free the others first. 1: one cache, as before.
        self.prefix_states = 2
        self._states_fit_below: int | None = None  # a prefix length at which that ran out of memory
        self._prefix: prefixes.VideoPrefix | None = None
        # The video being read ahead of its question (`decode_ahead`): its prefix key and the read.
        self._ahead: tuple[tuple, Future] | None = None
        self._ahead_lock = threading.Lock()
        # On CUDA, an answer's decoding steps after its second token replay a CUDA graph over a KV
        # cache reserved for the answer (models.decode); False: as transformers runs them.
        self.graph_decode = True

    @classmethod
    def from_pretrained(cls, model: str = "demo", **load_kwargs) -> VideoQA:
        from models import load

        return cls(*load(model, **load_kwargs))

    @property
    def config(self) -> FlashPrefillConfig:
        return self.info.config if self.info else FlashPrefillConfig()

    @property
    def frames_device(self) -> torch.device:
        """Where the frames are resized and the video processor rescales, normalises and patchifies
        them: on the model's GPU when it has one, so that work and its fp32 output are not done and
        copied on the host (BENCHMARKS.md); on the CPU otherwise."""
        return self.device if self.device.type == "cuda" and self.processor_on_gpu else torch.device("cpu")

    def processor_device(self) -> dict:
        """The video processor's keyword for `frames_device` (transformers' video processors take
        `device`; none means the CPU)."""
        device = self.frames_device
        return {"device": str(device)} if device.type == "cuda" else {}

    def decode(self, video: str, sampling: Sampling | None = None) -> DecodedVideo:
        """Check the file, then read the frames qwen-vl-utils samples (no GPU work; safe in a
        thread). They are resized by `prepare_decoded`, on the model's device."""
        start = time.perf_counter()
        sampling = sampling or Sampling()
        info = probe(video, decode_last=False)  # the read below decodes through the last frame
        sampled = read_frames(sampling.video_entry(info.path), self.processor.video_processor.patch_size)
        return DecodedVideo(info, sampled, time.perf_counter() - start, sampling)

    def decode_ahead(self, video: str, sampling: Sampling | None = None) -> None:
        """Start reading `video`'s frames (`decode`) on a background thread, before its question
        comes: the web UI calls it when a video is uploaded, so the question typed meanwhile does
        not wait for the decoding. `prepare` takes the frames when its video (the file unchanged)
        and sampling are these; the request then counts as decode time only what it still waited
        for (`Answer.timings["decoded_ahead_s"]` holds the rest). One video at a time: a call for
        the video and sampling being read keeps that read, another drops it. A decoding error is
        raised by the `prepare` that takes it."""
        sampling = sampling or Sampling()
        key = prefixes.video_key(os.fspath(video), sampling, self.frames_device)
        with self._ahead_lock:
            if key is not None and self._ahead is not None and self._ahead[0] == key:
                return
        self._take_ahead(None)  # the previous video's frames, read or not, are not needed
        if key is None or self._prefix_to_build_on(key) is not None:
            return  # a file that is not there (`prepare` says so), or one whose prefix is kept: nothing to read
        future: Future = Future()

        def read() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self._read_ahead(os.fspath(video), sampling))
                except BaseException as err:  # handed to the question that takes it
                    future.set_exception(err)

        with self._ahead_lock:
            self._ahead = (key, future)
        # A thread of its own per video: a newer upload does not wait behind an older read (which
        # cannot be stopped once decord runs), and none keeps the process from exiting.
        threading.Thread(target=read, name=READ_AHEAD_THREAD, daemon=True).start()

    def finish_reading(self, timeout: float = 60.0) -> None:
        """Wait, up to `timeout` seconds, for a read `decode_ahead` started to end (its frames kept
        for the question that takes them): for a process about to exit, which must not end while
        the video reader runs on another thread, nor print while the read has stderr silenced."""
        with self._ahead_lock:
            ahead = self._ahead
        if ahead is not None:
            concurrent.futures.wait([ahead[1]], timeout)

    def _read_ahead(self, video: str, sampling: Sampling) -> DecodedVideo:
        """`decode_ahead`'s work: the read, and on the CPU also the resize (done once and kept there;
        on a GPU each question resizes, holding no GPU memory between them)."""
        start = time.perf_counter()
        decoded = self.decode(video, sampling)
        if self.frames_device.type == "cpu":
            decoded.frames(self.frames_device)
        return dataclasses.replace(decoded, decode_s=time.perf_counter() - start)

    def _take_ahead(self, key: tuple | None) -> DecodedVideo | None:
        """The frames `decode_ahead` read for the video of prefix key `key`, waiting for the rest of
        the read (its decode_s: the wait; ahead_s: the reading done before), or None. The read ahead
        is given up either way."""
        with self._ahead_lock:
            ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        if key is None or ahead[0] != key:
            ahead[1].cancel()  # (a read already running finishes, unused)
            return None
        start = time.perf_counter()
        decoded = ahead[1].result()  # raises the read's VideoError
        waited = time.perf_counter() - start
        return dataclasses.replace(decoded, decode_s=waited, ahead_s=max(decoded.decode_s - waited, 0.0))

    @staticmethod
    def _check_question(question: str) -> None:
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty")

    def _prompt(self, question: str) -> str:
        self._check_question(question)
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _kept_prefix(self, key: tuple | None) -> prefixes.VideoPrefix | None:
        kept = self._prefix
        return kept if kept is not None and key is not None and kept.key == key else None

    def _prefix_to_build_on(self, key: tuple | None) -> prefixes.VideoPrefix | None:
        """The kept prefix of this video when a question's inputs can be built on it."""
        kept = self._kept_prefix(key)
        return kept if kept is not None and kept.bridge is not None else None

    def _question_ids(self, question: str) -> torch.Tensor:
        """(1, n) ids of the prompt's text after its video placeholder, tokenized alone: the
        placeholder and the tokens around it are added tokens, never merged across."""
        prompt = self._prompt(question)
        token = self.processor.video_token
        tail = prompt[prompt.rindex(token) + len(token):]
        return self.processor.tokenizer(tail, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def _prepare_on_prefix(self, kept: prefixes.VideoPrefix, question: str, decode_s: float = 0.0,
                           decoded: DecodedVideo | None = None) -> Prepared:
        """The inputs of a question about the kept prefix's video: its tokens, then the question's
        (checked against the processor's when the prefix was kept: `prefixes.bridge_inputs`)."""
        start = _sync(self.device)
        inputs = prefixes.extend_inputs(kept.inputs, kept.bridge, self._question_ids(question).to(self.device))
        total = int(inputs["input_ids"].shape[1])
        end = _sync(self.device)
        return Prepared(
            video=kept.video, question=question, inputs=inputs, decode_s=decode_s + (end - start),
            tokens={"video": kept.video_tokens(), "text": total - kept.video_tokens(), "total": total},
            video_ranges=list(kept.video_ranges), sampled_frames=kept.sampled_frames, sampling=kept.sampling,
            prefix_len=kept.length, video_key=kept.key, decoded=decoded,
        )

    def prepare_decoded(self, decoded: DecodedVideo, question: str, count_decode: bool = True,
                        reuse_prefix: bool = True) -> Prepared:
        """Build the model inputs for a question about an already decoded video.

        count_decode: add the video's decode time to this request (False for a video decoded for
        an earlier question, whose frames are reused).
        reuse_prefix: build on the kept prefix of this video when there is one (no processor)."""
        key = prefixes.video_key(decoded.info.path, decoded.sampling, self.frames_device)
        kept = self._prefix_to_build_on(key) if reuse_prefix else None
        if kept is not None:
            return self._prepare_on_prefix(kept, question, decoded.decode_s if count_decode else 0.0, decoded)
        start = _sync(self.device)
        prompt = self._prompt(question)
        frames = decoded.frames(self.frames_device)
        with collapsed_runs(self.processor):  # the same ids; the video placeholder's runs tokenized once
            inputs = self.processor(
                text=[prompt], videos=[frames], video_metadata=[decoded.sampled.metadata], do_resize=False,
                do_sample_frames=False, return_tensors="pt", **self.processor_device(),
            )
        inputs = prefixes.pixels_for(self.model, dict(inputs))
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        ids = inputs["input_ids"][0]
        is_video = ids == self.video_token_id
        n_video = int(is_video.sum())
        video_ranges = _runs(is_video)
        end = _sync(self.device)
        return Prepared(
            video=decoded.info, question=question, inputs=inputs,
            decode_s=(decoded.decode_s if count_decode else 0.0) + (end - start),
            decoded_ahead_s=decoded.ahead_s if count_decode else 0.0,
            tokens={"video": n_video, "text": int(ids.numel()) - n_video, "total": int(ids.numel())},
            video_ranges=video_ranges, sampled_frames=int(frames.shape[0]), sampling=decoded.sampling,
            prefix_len=video_ranges[-1][1], video_key=key,
        )

    def prepare(self, video: str, question: str, sampling: Sampling | None = None) -> Prepared:
        """Decode and sample the video and build the model inputs (the decode_video stage). A
        question about the kept prefix's video (same file, unchanged, same sampling) skips that; one
        about the video read by `decode_ahead` takes its frames."""
        self._check_question(question)  # an empty question fails before any decoding
        sampling = sampling or Sampling()
        key = prefixes.video_key(os.fspath(video), sampling, self.frames_device)
        kept = self._prefix_to_build_on(key)
        if kept is not None:
            return self._prepare_on_prefix(kept, question)
        return self.prepare_decoded(self._take_ahead(key) or self.decode(video, sampling), question)

    def follow_up(self, prepared: Prepared, question: str) -> Prepared:
        """Another question about the video of `prepared`: built on its kept prefix when there is
        one (no decoding, no processor), else from its frames or the file."""
        kept = self._prefix_to_build_on(prepared.video_key)
        if kept is not None:
            return self._prepare_on_prefix(kept, question, decoded=prepared.decoded)
        decoded = prepared.decoded or self.decode(prepared.video.path, prepared.sampling)
        return self.prepare_decoded(decoded, question)

    def on_device(self):
        """A context in which the model's GPU is the current CUDA device (nothing on the CPU). Triton
        launches on the current device, which is cuda:0 in a thread that has not set one (the web
        UI's and batch QA's threads included): `run` and `warm_up` run in it (`_on_model_device`),
        so a model on cuda:N gets its kernels launched there directly (`kernels.runtime.Launcher`
        switches device per launch otherwise)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @_on_model_device
    def run(self, prepared: Prepared, attention: str = "sparse", max_new_tokens: int = 32,
            config: FlashPrefillConfig | None = None, dense_layers: int | None = None,
            record_masks: bool = True, fixed_density: float | None = None,
            reuse_prefix: bool | None = None, on_text=None, stop: threading.Event | None = None) -> Answer:
        """Prefill and generate for a prepared request with the chosen attention.

        reuse_prefix: use the kept KV cache of this video's prefix when it was made with the same
        settings, and keep this one's (default `self.prefix_cache`); False computes the prefix
        and keeps nothing, a cold request (what the benchmarks time).
        on_text: called as `on_text(text, ttft_s)` with the answer so far while it is generated,
        from the first token on (`_AnswerStream`); the last call's text is the answer's.
        stop: once set (from another thread), generation ends after the token being made; the
        prefill runs to its end and the first token is always made. `Answer.stopped` says so."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        key, settings = self._settings(attention, config, dense_layers, fixed_density)
        if prepared.prefix_len <= 0:
            prepared.prefix_len = prefixes.prefix_length(prepared.inputs["input_ids"], self.video_token_id)
        reuse = self.prefix_cache if reuse_prefix is None else reuse_prefix
        kept = self._kept_prefix(prepared.video_key) if reuse else None
        state = kept.states.get(key) if kept is not None else None
        if state is not None and not (prepared.prefix_len == kept.length and torch.equal(
                prepared.inputs["input_ids"][:, : kept.length], kept.inputs["input_ids"])):
            state = None  # another prompt before the question (not built by this pipeline)
        if state is None:
            # Free kept KV caches before computing another: all but the newest `prefix_states - 1`
            # of this video's, every one of another video's (or when nothing is to be kept), and
            # every one for a prefix as long as one whose prefill ran out of memory beside them.
            fits = self._states_fit_below is None or prepared.prefix_len < self._states_fit_below
            self._free_states(self.prefix_states - 1 if kept is not None and fits else 0)
            if not any(k in prepared.inputs for k in prefixes.PIXEL_KEYS):
                self._reload(prepared)  # built on a prefix kept for other settings
        else:
            self._warm.add(key)  # the request that made the cache ran with these settings
        if self.warmup:
            self.warm_up(attention, settings.config, settings.dense_layers, fixed_density)
        self._use(attention)
        mask_layers = self.mask_layers if record_masks else ()
        cached = prepared.prefix_len if state else 0

        def attempt():
            # A cold prefix records masks of every mask layer, so that its kept record serves any request.
            recorder = state.recorder.copy(mask_layers) if state else SparsityRecorder(mask_layers=self.mask_layers)
            clock = _StageClock(self.model, self.device)
            try:
                start = _sync(self.device)
                stream = {}
                if on_text is not None:
                    stream["streamer"] = _AnswerStream(
                        self.processor.tokenizer, clock,
                        lambda: prepared.decode_s + (clock.marks["first_token"] - start), on_text)
                criteria = [clock.first_token_stopper()] + ([_stop_when_set(stop)] if stop is not None else [])
                with torch.inference_mode(), request_settings(dataclasses.replace(settings, recorder=recorder)):
                    out, made = self._generate(prepared, key, state, max_new_tokens, criteria, **stream)
                end = _sync(self.device)
            finally:
                clock.close()
            return out, made, recorder, clock, start, end

        try:
            result = attempt()
        except torch.cuda.OutOfMemoryError:
            if state is not None or self._prefix is None or not self._prefix.states:
                raise
            result = None  # (run again below, once the failed attempt's tensors are released)
        if result is None:
            self._free_states(0)  # another setting's KV cache took the memory this prefill needed
            self._states_fit_below = min(self._states_fit_below or prepared.prefix_len, prepared.prefix_len)
            torch.cuda.empty_cache()
            result = attempt()
        out, state, recorder, clock, start, end = result
        if reuse and prepared.video_key is not None:
            self._keep(prepared, state)
        m = clock.marks
        new = out[0, prepared.inputs["input_ids"].shape[1] :]
        text = self.processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        timings = {
            "decode_video_s": prepared.decode_s,
            "vision_s": clock.totals["vision"],
            "prefill_s": clock.totals["prefill"],
            "first_token_s": m["first_token"] - m["prefill_end"],
            "ttft_s": prepared.decode_s + (m["first_token"] - start),
            "total_s": prepared.decode_s + (end - start),
            "decoded_ahead_s": prepared.decoded_ahead_s,
        }
        sparsity = recorder.finish() if attention == "sparse" else _dense_record(self.model)
        if not record_masks:
            sparsity["masks"] = {}
        sparsity["video_ranges"] = prepared.video_ranges
        sparsity["num_tokens"] = prepared.tokens["total"]
        return Answer(
            text=text, attention=attention, model=self.info.name if self.info else "model",
            trained=self.info.trained if self.info else True, timings=timings,
            tokens={**prepared.tokens, "cached": cached}, sparsity=sparsity,
            video={"path": prepared.video.path, "frames": prepared.video.num_frames, "fps": prepared.video.fps,
                   "duration_s": round(prepared.video.duration_s, 3), "sampled_frames": prepared.sampled_frames},
            new_tokens=int(new.numel()), config=dataclasses.asdict(settings.config),
            stopped=stop is not None and stop.is_set() and int(new.numel()) < max_new_tokens,
        )

    def _settings(self, attention: str, config: FlashPrefillConfig | None, dense_layers: int | None,
                  fixed_density: float | None) -> tuple[tuple, RequestSettings]:
        """A request's settings, defaults filled in, and the key of a prefix's KV cache made with them."""
        if attention not in ATTENTION_MODES:
            raise InputError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        config = config or self.config
        if dense_layers is None:
            dense_layers = self.info.dense_layers if self.info else 0
        settings = RequestSettings(config=config, fixed_density=fixed_density, dense_layers=dense_layers)
        if attention == "dense":  # every layer dense: FlashPrefill's settings change nothing, one key for all
            return ("dense", None, 0, None), settings
        return (attention, config, dense_layers, fixed_density), settings

    def _use(self, attention: str) -> None:
        if self._attention != attention:
            set_attention(self.model, attention)
            self._attention = attention

    @_on_model_device
    def warm_up(self, attention: str = "sparse", config: FlashPrefillConfig | None = None,
                dense_layers: int | None = None, fixed_density: float | None = None) -> None:
        """Run a short request with these settings once, untimed, unless one ran: the bundled sample
        video (`WARMUP_SAMPLING`), with FlashPrefill from its first block (min_seq_len 0) and the
        language model's fused residual adds at its length (`models.text.fused_adds_at_every_length`;
        on CUDA also the question's dense attention as kernels.short_query_attention,
        `kernels.flash_prefill.api.split_kv_at_every_length`) and, in sparse mode, once more as
        configured (dense attention below min_seq_len). It pays
        what the first request of a process would otherwise count in its timings: compiling the
        kernels for these settings, CUDA's lazy loading of kernels, the first cuDNN and cuBLAS
        calls, the first use of the decode path (reading, resizing, the video processor). `run`
        calls it when `warmup` is set, and `ask` and `compare` before they decode. Each pass
        prefills in two calls (never `_one_call`): they run what one call runs and the question's
        call over a cache too. On CUDA in sparse mode the first pass runs once more with the pattern
        kernels' plain launches (`kernels.flash_prefill.api.plain_pattern_launches`), the variants of
        prompts past 32K keys, which a short prompt would not compile."""
        key, settings = self._settings(attention, config, dense_layers, fixed_density)
        if key in self._warm:
            return
        if self._warmup_request is None:
            decoded = self.decode(str(sample_video_path()), WARMUP_SAMPLING)
            self._warmup_request = self.prepare_decoded(decoded, DEFAULT_QUESTION, reuse_prefix=False)
        self._use(attention)
        forced = dataclasses.replace(settings.config, min_seq_len=0)
        passes = [(forced, _at_long_lengths if self.device.type == "cuda" else fused_adds_at_every_length)]
        if attention == "sparse" and self.device.type == "cuda":
            passes.append((forced, plain_pattern_launches))
        if attention == "sparse" and settings.config.min_seq_len > 0:
            passes.append((settings.config, contextlib.nullcontext))
        for i, (config, context) in enumerate(passes):
            # The first pass also decodes as an answer does (a graph captured and replayed).
            steps = MIN_NEW_TOKENS if i == 0 and self._graph_decode() else 1
            with torch.inference_mode(), request_settings(dataclasses.replace(settings, config=config)), context():
                self._generate(self._warmup_request, key, None, max_new_tokens=steps, one_call=False,
                               min_new_tokens=steps)
        self._warm.add(key)

    def _graph_decode(self) -> bool:
        """Whether answers decode from CUDA graphs (`graph_decode`, and the model on CUDA)."""
        return self.graph_decode and self.device.type == "cuda"

    def _one_call(self, prepared: Prepared, key: tuple) -> bool:
        """Whether a request that computes its prefix prefills in one call (ONE_CALL_WHEN_DENSE):
        every layer dense over the whole prompt."""
        attention, config, _, fixed_density = key
        return ONE_CALL_WHEN_DENSE and (attention == "dense" or (
            fixed_density is None and config.runs_dense(prepared.inputs["input_ids"].shape[1])))

    def _generate(self, prepared: Prepared, key: tuple, state: prefixes.PrefixState | None, max_new_tokens: int,
                  stopping_criteria=None, one_call: bool | None = None,
                  **generate_kwargs) -> tuple[torch.Tensor, prefixes.PrefixState]:
        """Prefill the prefix into a new KV cache (state None), then generate over the prefix's
        cache from the question's tokens on; the cache is cut back to the prefix afterwards. Both
        calls take the positions `generate` gives the whole prompt, so they are those of one call
        (over a kept prefix, its kept positions and the question's after them:
        `prefixes.positions_over_prefix`).
        Where every layer is dense over the whole prompt, a request without a prefix's cache
        prefills in that one call instead (`_one_call`; `one_call` decides instead when given), and
        its prefix's state is the one two calls would leave: the cache cut back to the prefix, the
        prefix's dense record."""
        options = dict(do_sample=False, stopping_criteria=stopping_criteria,
                       pad_token_id=self.processor.tokenizer.pad_token_id, **generate_kwargs)
        decoding = graph_decoding(self.model, max_new_tokens, enabled=self._graph_decode())
        if state is None and (self._one_call(prepared, key) if one_call is None else one_call):
            with decoding:
                out, cache = prefixes.generate_whole(self.model, prepared.inputs, prepared.prefix_len,
                                                     max_new_tokens=max_new_tokens, **options)
            settings = current_settings()
            prefix_record = (settings.recorder.causal_prefix(prepared.prefix_len, settings.dense_layers)
                             if settings.recorder is not None else SparsityRecorder())
            return out, prefixes.PrefixState(settings=key, cache=cache, recorder=prefix_record)
        if state is None:
            positions = prefixes.prompt_positions(self.model, prepared.inputs)
            cache = prefixes.prefill_prefix(self.model, prepared.inputs, prepared.prefix_len, positions)
            recorder = current_settings().recorder
            state = prefixes.PrefixState(settings=key, cache=cache,
                                         recorder=recorder.copy() if recorder is not None else SparsityRecorder(),
                                         positions=prefixes.kept_positions(positions, prepared.prefix_len))
        else:
            positions = prefixes.positions_over_prefix(self.model, prepared.inputs, prepared.prefix_len, state)
        with decoding:
            out = prefixes.generate_over_prefix(self.model, prepared.inputs, prepared.prefix_len, state.cache,
                                                positions, max_new_tokens=max_new_tokens, **options)
        return out, state

    def _reload(self, prepared: Prepared) -> None:
        """Give a request built on a kept prefix its pixels (decoding the video again unless its
        frames came with it)."""
        decoded = prepared.decoded or self.decode(prepared.video.path, prepared.sampling)
        fresh = self.prepare_decoded(decoded, prepared.question, count_decode=prepared.decoded is None,
                                     reuse_prefix=False)
        prepared.inputs, prepared.prefix_len = fresh.inputs, fresh.prefix_len
        prepared.decode_s += fresh.decode_s

    def _keep(self, prepared: Prepared, state: prefixes.PrefixState) -> None:
        kept = self._prefix
        if kept is None or kept.key != prepared.video_key:
            prefix_inputs, _ = prefixes.split_inputs(prepared.inputs, prepared.prefix_len)
            kept = prefixes.VideoPrefix(
                key=prepared.video_key, length=prepared.prefix_len,
                inputs={k: v for k, v in prefix_inputs.items() if k not in prefixes.PIXEL_KEYS},
                bridge=prefixes.bridge_inputs(prepared.inputs, prepared.prefix_len,
                                              self._question_ids(prepared.question)),
                video=prepared.video, sampling=prepared.sampling, sampled_frames=prepared.sampled_frames,
                video_ranges=list(prepared.video_ranges),
            )
        kept.states.pop(state.settings, None)
        kept.states[state.settings] = state  # the newest last
        self._prefix = kept

    def _free_states(self, keep: int) -> None:
        """Drop the kept prefix's KV caches, oldest first, until at most `keep` remain."""
        states = self._prefix.states if self._prefix is not None else {}
        while len(states) > max(keep, 0):
            del states[next(iter(states))]

    def forget_prefix(self) -> None:
        """Drop the kept prefix and its KV caches (GPU memory back to the allocator)."""
        self._prefix = None

    def ask(self, video: str, question: str = DEFAULT_QUESTION, attention: str = "sparse",
            sampling: Sampling | None = None, max_new_tokens: int = 32,
            config: FlashPrefillConfig | None = None, on_text=None) -> Answer:
        """Answer `question` about `video`. Raises InputError (VideoError) for bad input.
        on_text: the answer so far while it is generated (`run`)."""
        self._check_question(question)
        if self.warmup:
            self.warm_up(attention, config)  # before decoding: the decode path is warmed too
        return self.run(self.prepare(video, question, sampling), attention, max_new_tokens, config,
                        on_text=on_text)

    def compare(self, video: str, question: str = DEFAULT_QUESTION, sampling: Sampling | None = None,
                max_new_tokens: int = 32, config: FlashPrefillConfig | None = None, on_text=None) -> dict:
        """Dense and sparse on the same decoded inputs: both answers, TTFT speed-up, agreement.
        on_text: `on_text(mode, text, ttft_s)` with each answer so far while it is generated (`run`)."""
        self._check_question(question)
        if self.warmup:
            for attention in ("dense", "sparse"):
                self.warm_up(attention, config)
        prepared = self.prepare(video, question, sampling)

        def stream(mode):
            return None if on_text is None else lambda text, ttft_s: on_text(mode, text, ttft_s)

        dense = self.run(prepared, "dense", max_new_tokens, config, on_text=stream("dense"))
        sparse = self.run(prepared, "sparse", max_new_tokens, config, on_text=stream("sparse"))
        return {
            "runs": {"sparse": sparse, "dense": dense},
            "ttft_speedup": dense.timings["ttft_s"] / sparse.timings["ttft_s"],
            "prefill_speedup": dense.timings["prefill_s"] / sparse.timings["prefill_s"],
            "answers_agree": sparse.text == dense.text,
        }


def _runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous runs of True as (start, end) token ranges."""
    idx = flags.nonzero().flatten().tolist()
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _dense_record(model) -> dict:
    layers = model.config.text_config.num_hidden_layers
    heads = model.config.text_config.num_attention_heads
    return {"density": 1.0, "per_layer": [1.0] * layers, "per_head": [[1.0] * heads for _ in range(layers)],
            "layers": list(range(layers)), "masks": {}, "block_size": None}


__all__ = ["ATTENTION_MODES", "Answer", "DEFAULT_QUESTION", "InputError", "Prepared", "VideoError", "VideoQA"]
