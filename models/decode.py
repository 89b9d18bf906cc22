"""A language model's decoding steps replayed from a CUDA graph (`graph_decoding`).

After the prefill, `generate` runs the model once per new token. On the 7B model on an H200 such
a step took 17-30 ms where its GPU work is 6-8 ms: the rest is the host running some 20 modules
and launching some 20 kernels per layer (BENCHMARKS.md, fourteenth, fifteenth and twenty-eighth
sessions). Within
`graph_decoding(model, max_new_tokens)`, `generate` still drives the answer (its logits
processors, stopping criteria, streamer and end of text are untouched), and the model's forward
takes the decoding steps:

- At the first step each layer of the KV cache moves into buffers reserved for the prompt and the
  answer (its keys and values copied once; a step then appends nothing), or, where the layer's
  keys and values already lead buffers with room for the answer (models.cache, as the pipeline's
  caches), stays in them with no copy. The cache's layers hold
  views of the buffers' first positions, one longer after each step, so the cache reads as
  transformers' own to everything else (`generate`, the pipeline's kept prefix). Where the
  buffers lie (their addresses, head stride and capacity) goes into a small device table
  (kernels.decode_attention.fill_table).
- A step writes its key and value at the next position, a device tensor, into the buffers its
  table holds (kernels.decode_attention.write_kv), and attends to the positions up to it
  (models.attention.decode_lengths: kernels.decode_attention reads the length and the buffers on
  the device). So every step makes the same launches, whatever the answer's cache: the first runs
  them as they are, the second captures them into a CUDA graph, and every later step copies its
  token and position into the graph's inputs and replays it.
- The graph is kept for the model's next answers (`_KEPT`, one per language model): an answer
  fills the table with its own buffers and replays from its first step, with no capture (15-35 ms
  on the 7B model, BENCHMARKS.md, thirtieth and thirty-first sessions). The graph holds no cache:
  the buffers belong to the answer's cache, as transformers' tensors would. Where the model's
  weights (replaced, not updated in place), attention implementation or cache shape changed since,
  the answer captures its first step again.
- A step runs what the model's forward runs for one token: the embedding, the rotary embedding of
  its position (the positions `generate` passes, as the language model reads them), every decoder
  layer (attention mask none: the token sees every cached position), the final norm and the head.
  Captured, its projections run as Triton GEMVs (models.fused.one_token_gemvs; q, k and v in one
  launch, gate, up and the activation in one) and its layers' RMSNorms and residual adds inside
  those launches (models.text.fused_adds_at_every_length, `_one_token_layer`): kernels whose
  launch costs more host time than cuBLAS's, paid once in the capture, and whose GPU time is
  shorter.

Within it `generate` also checks for its stop a step behind on CUDA (models.stop_check): the host
queues the next step while the GPU runs this one, instead of waiting for each token.

A call it does not take goes to the model's own forward: the prefill, a batch, a cache of another
kind, embeddings given instead of ids, positions not given in a form the language model reads, a
reservation that runs out of memory (logged). A capture that fails is logged and the steps go on
without a graph.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import weakref

import torch
from transformers.cache_utils import DynamicLayer

from kernels.decode_attention import TABLE_ALIGN, TABLE_COLUMNS, fill_table, write_kv

from . import text as _text
from .attention import ATTENTION_NAME, DENSE_NAME, decode_lengths
from .cache import RoomyLayer, move_into_room, room
from .fused import one_token_gemvs, tower
from .stop_check import step_ahead
from .text import fused_adds_at_every_length

logger = logging.getLogger(__name__)

# Fewest new tokens for which `graph_decoding` takes the steps: a graph pays off from its first
# replay, the third token.
MIN_NEW_TOKENS = 3
# Language models whose decoding step was captured before (the warm-ups decode as an answer does):
# their next answers capture the first step, every kernel of a step having run eagerly once.
_CAPTURED: weakref.WeakSet = weakref.WeakSet()
# Whether a step's layers run their residual adds fused where it runs its projections as GEMVs.
FUSED_ADDS_WITH_GEMVS = True
# Language models' captured steps, kept for their next answers (module docstring): language model ->
# _KeptStep. An answer takes its model's out while it decodes and puts it (or its own) back at its end.
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _KeptStep:
    """A captured decoding step and the tensors it reads and writes, but for the cache: its table."""

    def __init__(self, steps: StepGraphs, key: tuple):
        self.key = key
        self.graph, self.ids, self.positions, self.index = steps.graph, steps.ids, steps.positions, steps.index
        self.table, self.logits = steps.table, steps.logits


@contextlib.contextmanager
def graph_decoding(model, max_new_tokens: int, enabled: bool = True, capture: bool | None = None,
                   ahead: bool | None = None, gemv: bool | None = None):
    """Within the block, the decoding steps of `model.generate` (batch 1) run as described in the
    module docstring; yields the `StepGraphs` (None when not enabled or fewer than MIN_NEW_TOKENS).
    capture: record and replay a CUDA graph (default: on CUDA); False runs every step's launches as
    they are over the reserved cache (what the CPU tests check against `generate`).
    ahead: `generate` checks for its stop a step behind, so the host queues the next step while the
    GPU runs this one (models.stop_check; default: the model on CUDA). `StepGraphs.ahead` says
    whether it does. gemv: a step's projections as GEMVs and its residual adds fused (default: in
    captured steps; True: in every step, as the CPU tests check them)."""
    if not enabled or max_new_tokens < MIN_NEW_TOKENS:
        yield None
        return
    steps = StepGraphs(model, max_new_tokens, capture, gemv)
    had_own = "forward" in model.__dict__
    own = model.__dict__.get("forward")
    model.forward = steps.wrap(model.forward)
    try:
        with step_ahead(model.device.type == "cuda" if ahead is None else ahead) as steps.ahead:
            yield steps
    finally:
        if had_own:
            model.forward = own
        else:
            del model.forward
        steps.close()


class _StepCache:
    """What the decoder layers are given as their cache inside a step: `update` writes the step's
    key and value at position `index` (a (1,) device tensor) of the layer's reserved buffers, as
    `table` holds them, and returns the buffers (the attention reads its layer's first index + 1
    positions from the table, `decode_lengths`)."""

    def __init__(self, buffers: list[tuple[torch.Tensor, torch.Tensor]], index: torch.Tensor, table: torch.Tensor):
        self.buffers, self.index, self.table = buffers, index, table

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        write_kv(key_states, value_states, self.index, self.table, layer_idx)
        return self.buffers[layer_idx]


def _reservable(buffer: torch.Tensor) -> bool:
    """Whether a layer's buffer can be a reservation (kernels.decode_attention.fill_table's rules)."""
    return buffer.is_contiguous() and buffer.data_ptr() % TABLE_ALIGN == 0


def _cache_keyword(module: torch.nn.Module) -> str:
    """The keyword under which this transformers version's decoder layer takes the KV cache."""
    return "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"


def _given_cache(kwargs: dict):
    """The KV cache a forward call was given, under either of transformers' names for it."""
    return next((kwargs[k] for k in ("cache", "past_key_values") if kwargs.get(k) is not None), None)


def _rotary_positions(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The (3, 1, 1) mRoPE positions the language model gives its rotary embedding for one token's
    `position_ids` as `generate` passes them: (3, 1, 1), or (4, 1, 1) with the text positions
    first, or (1, 1) text positions; None where not given."""
    if position_ids is None:
        return None
    if position_ids.dim() == 2:
        position_ids = position_ids[None].expand(3, -1, -1)
    elif position_ids.dim() == 3 and position_ids.shape[0] == 4:
        position_ids = position_ids[1:]
    return position_ids if position_ids.shape == (3, 1, 1) else None


class StepGraphs:
    """The decoding steps of one `generate` call (`graph_decoding`). `eager_steps` and
    `replayed_steps` count the steps run each way (a step queued past the end of the answer, and
    undone, among them); `captures`, the graphs captured (0 where the model's kept step served);
    `ahead`, whether `generate` checked for its stop a step behind."""

    def __init__(self, model, max_new_tokens: int, capture: bool | None = None, gemv: bool | None = None):
        self.text = tower(model, "language_model")
        self.head = model.get_output_embeddings()
        self.max_new_tokens = max_new_tokens
        self.capture = capture
        self.gemv = gemv
        self.layer_cache = _cache_keyword(self.text.layers[0])
        self.calls = 0
        self.off = False
        self.cache = None  # the cache `generate` passes
        self.output = None  # (the forward's output class, the field holding the cache)
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.capacity = 0
        self.graph = None
        self.key = None  # what the captured step depends on besides its table (`_step_key`)
        self.eager_steps = 0
        self.replayed_steps = 0
        self.captures = 0
        self.ahead = False

    def wrap(self, forward):
        @functools.wraps(forward)
        def step_or_forward(*args, **kwargs):
            self.calls += 1
            if self.calls == 1:
                out = forward(*args, **kwargs)
                self._first_call(out, kwargs)
                return out
            if self.off or args or not self._takes(kwargs):
                return forward(*args, **kwargs)
            return self._step(kwargs, forward)

        return step_or_forward

    def _first_call(self, out, kwargs: dict) -> None:
        """The prefill: learn the cache it filled and how the forward returns it."""
        self.cache = _given_cache(kwargs)
        items = out.items() if self.cache is not None and hasattr(out, "items") else ()
        field = next((k for k, v in items if v is self.cache), None)
        if field is None:
            self.off = True
        else:
            self.output = (type(out), field)

    def _takes(self, kwargs: dict) -> bool:
        """Whether a call is a step this can run: one token's id, over the prefill's cache, with no
        pixels; before the first step, a cache of transformers' dynamic layers (or models.cache's)
        of batch 1 (on CUDA where the step is to be captured)."""
        ids = kwargs.get("input_ids")
        if _given_cache(kwargs) is not self.cache or ids is None or ids.shape != (1, 1):
            return False
        if any(kwargs.get(k) is not None for k in ("inputs_embeds", "pixel_values", "pixel_values_videos")):
            return False
        if self.buffers is not None:
            return True  # (the cache's layers checked at the first step, and moved into the buffers)
        capture = ids.is_cuda if self.capture is None else self.capture
        if capture and not ids.is_cuda:
            return False
        layers = getattr(self.cache, "layers", None)
        return bool(layers) and len(layers) == len(self.text.layers) and all(
            type(layer) in (DynamicLayer, RoomyLayer) and getattr(layer, "keys", None) is not None
            and layer.keys.dim() == 4 and layer.keys.shape[0] == 1 for layer in layers)

    def _reserve(self, length: int) -> bool:
        """Give each cache layer's keys and values buffers of at least `length + max_new_tokens`
        positions: the buffers the layers' keys and values already lead where they hold the answer
        (models.cache: a cache with room, as the pipeline's), else new ones the keys and values are
        copied into, with models.cache.ROOM positions more for the next question."""
        need = length + self.max_new_tokens
        buffers = [room(layer) for layer in self.cache.layers]
        if not all(pair is not None and pair[0].shape[2] >= need and pair[0].shape == buffers[0][0].shape
                   and all(_reservable(t) for t in pair) for pair in buffers):
            try:
                buffers = [move_into_room(layer, need) for layer in self.cache.layers]
            except torch.OutOfMemoryError:
                logger.warning("no memory to reserve the KV cache for graph decoding; decoding as transformers does")
                return False
        for layer, (keys, values) in zip(self.cache.layers, buffers, strict=True):
            layer.keys, layer.values = keys[:, :, :length], values[:, :, :length]
        self.capacity = buffers[0][0].shape[2]
        self.buffers = buffers
        device = buffers[0][0].device
        if self.capture is None:  # (default: capture on CUDA)
            self.capture = device.type == "cuda"
        kept = _KEPT.pop(self.text, None) if self.capture else None
        if kept is not None and kept.key == self._step_key():
            self.graph, self.key, self.logits = kept.graph, kept.key, kept.logits
            self.ids, self.positions, self.index, self.table = kept.ids, kept.positions, kept.index, kept.table
        else:
            self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
            self.positions = torch.zeros(3, 1, 1, dtype=torch.long, device=device)
            self.index = torch.zeros(1, dtype=torch.long, device=device)
            self.table = torch.zeros(len(buffers), TABLE_COLUMNS, dtype=torch.long, device=device)
        fill_table(self.table, buffers)
        return True

    def _step_key(self) -> tuple:
        """What a captured step depends on besides its table: how it was captured (GEMVs, fused
        adds, norms in the GEMVs), the device, the attention implementation (ours, in the sparse or
        the dense mode, or another), the cache's shape and dtype, and where every weight and buffer
        of the language model and the head lies (a weight replaced, not updated in place, gives
        another key)."""
        keys = self.buffers[0][0]
        attention = getattr(getattr(self.text, "config", None), "_attn_implementation", None)
        if attention in (ATTENTION_NAME, DENSE_NAME):
            attention = ATTENTION_NAME  # (both modes run a step's attention alike: the compare mode keeps one graph)
        # (each module's own tensors: about 0.6 ms for the 7B model on the H200 machine, a third of what
        # `parameters()` takes, BENCHMARKS.md, thirty-first session)
        weights = tuple(t.data_ptr() for module in itertools.chain(self.text.modules(), (self.head,))
                        for held in (module._parameters, module._buffers) for t in held.values() if t is not None)
        return (self.gemv is not False, FUSED_ADDS_WITH_GEMVS, _text.NORMS_IN_GEMVS, str(keys.device), attention,
                len(self.buffers), keys.shape[1], keys.shape[3], keys.dtype, weights)

    def _step(self, kwargs: dict, forward):
        length = self.cache.get_seq_length()
        positions = _rotary_positions(kwargs.get("position_ids"))
        if positions is None or (self.buffers is None and not self._reserve(length)) or length >= self.capacity:
            self.off = True
            return forward(**kwargs)
        self.ids.copy_(kwargs["input_ids"])
        self.positions.copy_(positions)
        self.index.fill_(length)
        if self.graph is None and self.capture and (self.eager_steps > 0 or self.text in _CAPTURED):
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            self.replayed_steps += 1
        else:
            self._run(gemv=bool(self.gemv))
            self.eager_steps += 1
        for layer, (keys, values) in zip(self.cache.layers, self.buffers):
            layer.keys, layer.values = keys[:, :, : length + 1], values[:, :, : length + 1]
        kind, field = self.output
        return kind(logits=self.logits.clone(), **{field: self.cache})

    def _run(self, gemv: bool) -> None:
        """One step's launches: the token at `ids`, its positions `positions`, written at `index`;
        with `gemv`, its projections as GEMVs and its residual adds fused."""
        text = self.text
        adds = fused_adds_at_every_length() if gemv and FUSED_ADDS_WITH_GEMVS else contextlib.nullcontext()
        with decode_lengths(self.index + 1, self.table), one_token_gemvs(gemv), adds:
            hidden = text.embed_tokens(self.ids)
            rotary = text.rotary_emb(hidden, self.positions)
            cache = _StepCache(self.buffers, self.index, self.table)
            for layer in text.layers:
                out = layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=None,
                            use_cache=True, **{self.layer_cache: cache})
                hidden = out[0] if isinstance(out, tuple) else out
            self.logits = self.head(text.norm(hidden))

    def _capture(self) -> None:
        """Record `_run` into a CUDA graph on a side stream; on failure, decode on without one (or,
        at the first step, try again after it)."""
        first = self.eager_steps == 0
        current = torch.cuda.current_stream(self.ids.device)
        stream = torch.cuda.Stream(self.ids.device)
        stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self._run(gemv=self.gemv is not False)
                finally:
                    graph.capture_end()
        except RuntimeError as error:
            if first:
                _CAPTURED.discard(self.text)
                logger.info("the first decoding step could not be captured (%s); capturing the second", error)
                return
            logger.warning("decoding steps could not be captured in a CUDA graph (%s); decoding without one", error)
            self.capture = False
            return
        finally:
            current.wait_stream(stream)
        self.graph, self.key = graph, self._step_key()
        self.captures += 1
        _CAPTURED.add(self.text)

    def close(self) -> None:
        """Keep the captured step for the model's next answer (`_KEPT`) and release the rest here:
        the cache keeps its views of the buffers, which the kept step does not hold."""
        if self.graph is not None:
            _KEPT[self.text] = _KeptStep(self, self.key)
        self.graph = self.buffers = self.cache = None
        self.__dict__.pop("logits", None)
