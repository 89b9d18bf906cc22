"""FlashPrefill as a transformers attention function, with per-request settings and recording.

Registered once under ATTENTION_NAME (no "flash" in it: transformers treats such names as
flash-attn), beside the dense mode's function under DENSE_NAME (transformers' SDPA attention with
its short queries kept off cuDNN, below). The text tower uses them, the vision tower stays on
SDPA. The sparse function receives query (B, HQ, Tq, D) and key/value (B, H, Tk, D) views with
mRoPE applied and KV heads unexpanded, and returns (B, Tq, HQ, D). Prefill goes to
kernels.flash_prefill; decode (one query token), the first `dense_layers` layers and anything
non-causal go to dense SDPA. A padded batch (a 4-D mask, since sdpa_mask is registered for the
name) runs each row on its own valid token range. Per-request settings travel in a context
variable set around `generate`.

Where SDPA runs a query shorter than its keys (a decoding step; a question over a kept prefix
runs as kernels' dense attention, one flash-attention call, in the dense mode too), in both modes,
its cuDNN backend is excluded (kernels.flash_prefill.api.SHORT_QUERY_BACKENDS): cuDNN
builds an execution plan the first time it sees a shape, 53-65 ms on an H200, and every decoding
step has a new key length; flash needs no plan and took 0.07 / 0.18 ms per step's call over 16K /
131K keys, against cuDNN's 0.19 / 0.25 ms even at a length just run. A step of a user's request
(a prompt length not decoded before) went from 55-64 to 17-22 ms (BENCHMARKS.md, fourteenth
session). A prefill (queries = keys) keeps SDPA's own choice. A decoding step replayed from a CUDA
graph (models.decode) runs within `decode_lengths`: kernels.decode_attention over the reserved
cache, its length read on the GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from kernels import (
    BlockSparsePattern,
    FlashPrefillConfig,
    block_sparse_attention,
    dense_attention,
    find_pattern,
    flash_prefill,
)
from kernels.decode_attention import decode_attention
from kernels.flash_prefill.api import SHORT_QUERY_BACKENDS
from kernels.flash_prefill.api import runs_dense as flash_runs_dense
from kernels.flash_prefill.reference import causal_pattern
from kernels.testing import random_pattern

from .host import ReadOnce

ATTENTION_NAME = "videoprefill_sparse"
DENSE_NAME = "videoprefill_dense"


@dataclass
class SparsityRecorder:
    """Collects, per language-model layer, the density per query head and chosen block masks.

    Everything stays on the device while a request runs (no host sync in the timed path);
    `finish()` moves it to the CPU once.
    """

    mask_layers: tuple[int, ...] = ()
    mask_size: int = 256
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> kept blocks per head (HQ,)
    visible: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> visible blocks per head (HQ,)
    # layer -> bool (HQ, NQB, NKB) kept blocks of batch row 0, query blocks counted from block 0; a
    # query chunk right after the keys recorded so far (a prompt prefilled in two calls) adds its rows.
    masks: dict[int, torch.Tensor] = field(default_factory=dict)
    mask_tokens: dict[int, int] = field(default_factory=dict)  # layer -> keys its mask covers
    block_size: int | None = None
    num_tokens: int | None = None

    def _add(self, layer: int, kept: torch.Tensor, visible: torch.Tensor) -> None:
        # Rows of a padded batch arrive one pattern each: accumulate.
        self.kept[layer] = self.kept[layer] + kept if layer in self.kept else kept
        self.visible[layer] = self.visible[layer] + visible if layer in self.visible else visible

    def record(self, layer: int, pattern: BlockSparsePattern) -> None:
        batch, heads = pattern.kv_num_blocks.shape[:2]
        visible = pattern.causal_blocks().to(torch.float32).sum() * batch
        self._add(layer, pattern.kv_num_blocks.to(torch.float32).sum((0, 2)), visible.expand(heads))
        self.block_size, self.num_tokens = pattern.block_size, pattern.kv_len
        if layer in self.mask_layers:
            self._record_mask(layer, pattern)

    def _record_mask(self, layer: int, pattern: BlockSparsePattern) -> None:
        kept = self.masks.get(layer)
        if kept is not None and self.mask_tokens[layer] != pattern.kv_len - pattern.q_len:
            return  # not the chunk after the recorded keys (another row of a padded batch)
        new = pattern.to_dense()[0]
        heads, nq, nk = new.shape
        q0 = pattern.first_q_block
        if kept is None and q0 == 0:
            merged = new
        else:
            merged = torch.zeros(heads, q0 + nq, nk, dtype=torch.bool, device=new.device)
            if kept is not None:
                merged[:, : kept.shape[1], : kept.shape[2]] = kept
            merged[:, q0:] |= new
        self.masks[layer] = merged
        self.mask_tokens[layer] = pattern.kv_len

    def record_causal(self, layer: int, batch: int, num_heads: int, q_len: int, kv_len: int, block_size: int,
                      device) -> None:
        """What `record` records for the pattern of every causal block (a call that ran dense below
        min_seq_len), counted on the host: no pattern built, one small tensor."""
        nkb = -(-kv_len // block_size)
        first = (kv_len - q_len) // block_size
        nqb = nkb - first
        visible = torch.full((num_heads,), float(batch * (nqb * first + nqb * (nqb + 1) // 2)), device=device)
        self._add(layer, visible, visible)
        self.block_size, self.num_tokens = block_size, kv_len

    def record_dense(self, layer: int, num_heads: int, num_tokens: int, device) -> None:
        ones = torch.ones(num_heads, device=device)
        self._add(layer, ones, ones)
        self.num_tokens = num_tokens

    def causal_prefix(self, length: int, dense_layers: int = 0) -> SparsityRecorder:
        """A new recorder with this one's mask layers, holding what one call over a prompt's first
        `length` tokens records at each of this one's layers when it runs dense (below min_seq_len),
        as sparse_attention_forward records it: `record_dense` for the first `dense_layers` layers,
        every causal block for the others (`record_causal`; the pattern itself at a mask layer).
        What a video prefix prefilled alone records, for a prompt prefilled in one call
        (videoprefill.pipeline.ONE_CALL_WHEN_DENSE)."""
        out = SparsityRecorder(mask_layers=self.mask_layers, mask_size=self.mask_size)
        for layer, kept in self.kept.items():
            heads, device = kept.shape[0], kept.device
            if layer < dense_layers:
                out.record_dense(layer, heads, length, device)
            elif layer in self.mask_layers:
                out.record(layer, causal_pattern(1, heads, length, length, self.block_size, device))
            else:
                out.record_causal(layer, 1, heads, length, length, self.block_size, device)
        return out

    def copy(self, mask_layers: tuple[int, ...] | None = None) -> SparsityRecorder:
        """A recorder holding what this one has recorded (its tensors shared, never written in
        place), recording on from there; masks only of `mask_layers` (default: this one's)."""
        layers = self.mask_layers if mask_layers is None else mask_layers
        return SparsityRecorder(mask_layers=layers, mask_size=self.mask_size, kept=dict(self.kept),
                                visible=dict(self.visible),
                                masks={i: m for i, m in self.masks.items() if i in layers},
                                mask_tokens={i: n for i, n in self.mask_tokens.items() if i in layers},
                                block_size=self.block_size, num_tokens=self.num_tokens)

    def finish(self) -> dict:
        """{"density": float, "per_layer": [...], "per_head": [[...]], "masks": {layer: (HQ, n, m) kept
        fraction, n, m <= mask_size}}."""
        layers = sorted(self.kept)
        if layers:  # one copy from the device, not a few per layer
            kept_all = torch.stack([self.kept[i] for i in layers]).cpu()
            visible_all = torch.stack([self.visible[i] for i in layers]).cpu()
        else:
            kept_all = visible_all = torch.zeros(0, 0)
        per_head = kept_all / visible_all
        kept = float(kept_all.sum())
        visible = float(visible_all.sum())
        return {
            "density": kept / visible if visible else 1.0,
            "per_layer": per_head.mean(1).tolist() if layers else [],
            "per_head": per_head.tolist(),
            "layers": layers,
            "masks": {i: downsample_mask(m, self.mask_size).cpu() for i, m in self.masks.items()},
            "block_size": self.block_size,
            "num_tokens": self.num_tokens,
        }


def downsample_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(HQ, NQB, NKB) bool -> (HQ, <=size, <=size) fraction of kept blocks, by average pooling."""
    h, nq, nk = mask.shape
    x = mask.to(torch.float32)[:, None]
    if nq > size or nk > size:
        x = F.adaptive_avg_pool2d(x, (min(nq, size), min(nk, size)))
    return x[:, 0]


@dataclass
class RequestSettings:
    """What one request asks of the attention function."""

    config: FlashPrefillConfig = field(default_factory=FlashPrefillConfig)
    dense_layers: int = 0
    recorder: SparsityRecorder | None = None
    backend: str = "auto"
    # Benchmarks only: layer -> relative error of the sparse attention output against dense
    # attention on the same q, k, v, over every prefill call of the request (a video prefix and
    # its question: costs a dense attention per layer and call; error_sums holds the squared norms).
    output_errors: dict[int, float] | None = None
    error_sums: dict[int, list[float]] = field(default_factory=dict)
    # Benchmarks only: run pattern discovery for its cost, then attend over random blocks at this
    # density instead (to read speed at the densities trained checkpoints select).
    fixed_density: float | None = None


_SETTINGS: contextvars.ContextVar[RequestSettings | None] = contextvars.ContextVar(
    "videoprefill_settings", default=None
)
_DEFAULTS = RequestSettings()


@contextlib.contextmanager
def request_settings(settings: RequestSettings):
    """Use `settings` for every attention call made inside the block (e.g. around generate)."""
    token = _SETTINGS.set(settings)
    try:
        yield settings
    finally:
        _SETTINGS.reset(token)


_DECODE_LENGTHS: contextvars.ContextVar[tuple[torch.Tensor, torch.Tensor] | None] = contextvars.ContextVar(
    "videoprefill_decode_lengths", default=None
)


@contextlib.contextmanager
def decode_lengths(lengths: torch.Tensor, table: torch.Tensor):
    """Within the block, a one-token query attends to the first lengths[b] positions of the cache
    reserved ahead that `table` (kernels.decode_attention.fill_table) holds in its layer's row (the
    attention module's `layer_idx`); the keys and values it is given only describe that cache
    (kernels.decode_attention; models.decode's steps)."""
    token = _DECODE_LENGTHS.set((lengths, table))
    try:
        yield
    finally:
        _DECODE_LENGTHS.reset(token)


def set_default_settings(settings: RequestSettings) -> None:
    """Settings used outside any request_settings block (a model loaded with a config)."""
    global _DEFAULTS
    _DEFAULTS = settings


def current_settings() -> RequestSettings:
    return _SETTINGS.get() or _DEFAULTS


def dense_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dense mode (DENSE_NAME), and the sparse mode's dense calls: transformers' SDPA attention,
    short queries kept off cuDNN (the signature is transformers' attention interface, as
    sparse_attention_forward's). A question over a cached prompt (several queries, fewer than the
    keys, causal, one unpadded row) runs as kernels' `dense_attention` instead, as the sparse mode's
    runs: one flash-attention call with the KV heads grouped and bottom-right causal alignment,
    where SDPA needs an explicit mask, which rules out its flash backend (BENCHMARKS.md,
    twenty-sixth session). A decoding step within `decode_lengths` runs kernels.decode_attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, tq, tk = query.shape[0], query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    step = _DECODE_LENGTHS.get()
    if step is not None and tq == 1:  # a decoding step over a reserved cache (`decode_lengths`)
        lengths, table = step
        return decode_attention(query[:, :, 0], key, value, lengths, scale, table=table,
                                layer=module.layer_idx)[:, None], None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if 1 < tq < tk and causal and b == 1 and (attention_mask is None or _key_ranges(attention_mask, tk)[0] == (0, tk)):
        return dense_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale), None
    # a decoding step or a question over a cache: no cuDNN (module docstring)
    short = sdpa_kernel(SHORT_QUERY_BACKENDS) if query.shape[2] < key.shape[2] else contextlib.nullcontext()
    with short:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)


def _valid_ranges(key_valid: torch.Tensor) -> list[tuple[int, int] | None]:
    """Per row of a (B, T) bool mask, (start, end) if its True entries are one contiguous run,
    else None; read from the device in one copy."""
    t = key_valid.shape[1]
    valid = key_valid.to(torch.int32)
    count = valid.sum(1)
    start = valid.argmax(1)  # the first True (argmax gives the first of equal maxima)
    end = t - valid.flip(1).argmax(1)
    stats = torch.stack([count, start, end]).tolist()
    return [(s, e) if c > 0 and e - s == c else None for c, s, e in zip(*stats)]


_MASK_READS = ReadOnce()


def _key_ranges(attention_mask: torch.Tensor, tk: int) -> list[tuple[int, int] | None]:
    """Per batch row, the contiguous run of its last `tk` keys that the last query sees
    (`_valid_ranges`), from a 2-D or 4-D mask; read once per mask (models.host: transformers hands
    every layer the same mask)."""

    def read() -> list[tuple[int, int] | None]:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        key_valid = mask[:, 0, -1, :] if mask.dim() == 4 else mask
        return _valid_ranges(key_valid[:, -tk:])

    return _MASK_READS.get(attention_mask, read, key=tk)


def sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    settings = current_settings()
    layer = getattr(module, "layer_idx", None)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    b, hq, tq, _ = query.shape
    tk = key.shape[2]
    recorder = settings.recorder
    if tq == 1 or not causal or layer is None or layer < settings.dense_layers:
        if recorder is not None and layer is not None and tq > 1:
            recorder.record_dense(layer, hq, tk, query.device)
        return dense_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                       is_causal=is_causal, **kwargs)

    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    ranges = None
    if attention_mask is not None:
        ranges = _key_ranges(attention_mask, tk)
        if b == 1 and ranges[0] == (0, tk):
            attention_mask = None  # causal and no padding: a question's tokens over a cached prefix
    if settings.fixed_density is not None and attention_mask is None:
        find_pattern(q, k, settings.config, scaling, settings.backend)
        pattern = random_pattern(b, hq, tk, settings.config.block_size, settings.fixed_density, q.device,
                                 seed=layer, q_len=tq)
        if recorder is not None:
            recorder.record(layer, pattern)
        return block_sparse_attention(q, k, v, pattern, scaling, settings.backend,
                                      settings.config.mean_correction), None
    if attention_mask is None:
        # Where the call runs dense (below min_seq_len, or a question in the last full blocks),
        # flash_prefill builds the causal pattern it would return (device work and host time at
        # every layer): there it is asked for only for a layer whose mask is recorded, and the
        # others' counts come from the shapes.
        runs_dense = flash_runs_dense(settings.config, tq, tk)
        want = recorder is not None and not (runs_dense and layer not in recorder.mask_layers)
        out = flash_prefill(q, k, v, config=settings.config, scale=scaling, backend=settings.backend,
                            return_pattern=want)
        if want:
            out, pattern = out
            recorder.record(layer, pattern)
        elif recorder is not None:
            recorder.record_causal(layer, b, hq, tq, tk, settings.config.block_size, q.device)
        if settings.output_errors is not None:
            dense = dense_attention(q, k, v, scaling if scaling is not None else q.shape[-1] ** -0.5).float()
            sums = settings.error_sums.setdefault(layer, [0.0, 0.0])
            sums[0] += float((out.float() - dense).square().sum())
            sums[1] += float(dense.square().sum())
            settings.output_errors[layer] = (sums[0] / max(sums[1], 1e-60)) ** 0.5
        return out, None

    # Padded batch: each row attends within its own contiguous run of valid keys.
    if any(r is None or r[1] != tk for r in ranges):
        # Not left padding (the last query must see every valid key): dense with the mask.
        return dense_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                       is_causal=is_causal, **kwargs)
    out = torch.zeros(b, tq, hq, q.shape[-1], dtype=q.dtype, device=q.device)
    for i, (start, end) in enumerate(ranges):
        first_query = max(start, tk - tq)
        rows = slice(first_query - (tk - tq), tq)
        row_out = flash_prefill(
            q[i : i + 1, rows], k[i : i + 1, start:end], v[i : i + 1, start:end],
            config=settings.config, scale=scaling, backend=settings.backend, return_pattern=recorder is not None,
        )
        if recorder is not None:
            row_out, pattern = row_out
            recorder.record(layer, pattern)
        out[i, rows] = row_out[0]
    return out, None


_registered = False


def register() -> str:
    """Register the attention functions of both modes (with SDPA's mask function) with
    transformers; idempotent. Returns the sparse mode's name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION_NAME, sparse_attention_forward)
        AttentionInterface.register(DENSE_NAME, dense_attention_forward)
        for name in (ATTENTION_NAME, DENSE_NAME):
            AttentionMaskInterface.register(name, sdpa_mask)
        _registered = True
    return ATTENTION_NAME


def set_attention(model, mode: str) -> None:
    """Switch the text tower between "sparse" (FlashPrefill) and "dense" (SDPA, DENSE_NAME) without
    reloading."""
    if mode not in ("sparse", "dense"):
        raise ValueError(f"attention must be 'sparse' or 'dense', got {mode!r}")
    sparse = register()  # both modes' functions
    name = sparse if mode == "sparse" else DENSE_NAME
    model.set_attn_implementation({"text_config": name, "vision_config": "sdpa"})
