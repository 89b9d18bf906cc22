"""The video prefix: a video's prompt tokens and their KV cache, kept for the next question.

The prompt puts the video before the question, so every question about one video shares the
prompt up to and including its last video token: the prefix. `VideoQA.run` prefills in two
calls, the prefix (the vision encoder and the language model over its P tokens, into a KV cache)
and then the question's tokens through `generate` over that cache, which attend to the whole
prefix (DESIGN.md: Tq < Tk, bottom-right). Asked first or later, a question is answered the same
way. The last video's prefix and one KV cache of it (one attention setting) are kept, so the
next question about it skips decoding, the vision encoder and the prefix's prefill.

Where every layer attends densely over the whole prompt (the dense mode, or a prompt under
FlashPrefill's `min_seq_len`), the split changes nothing that is computed: the prefix's rows never
see the question's. There a request that computes its prefix prefills in one call instead
(`generate_whole`) and keeps the prefix's part of its cache
(`videoprefill.pipeline.ONE_CALL_WHEN_DENSE`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
from dataclasses import dataclass, field

import torch

from models.attention import SparsityRecorder
from models.cache import with_room
from models.fused import tower

from .video import Sampling, VideoInfo

# Processor outputs with one entry per prompt token, and the value a question's token takes there.
PER_TOKEN_FILL = {"input_ids": None, "attention_mask": 1, "mm_token_type_ids": 0, "token_type_ids": 0}
PIXEL_KEYS = ("pixel_values_videos", "pixel_values")


def video_key(path: str, sampling: Sampling, frames_device: torch.device) -> tuple | None:
    """What identifies a video's prefix: the file (path, size, modification time), how its frames
    are sampled and where they are processed. None when the file cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, sampling, str(frames_device))


def prefix_length(input_ids: torch.Tensor, video_token_id: int) -> int:
    """Tokens through the last video token of a (1, L) prompt."""
    where = (input_ids[0] == video_token_id).nonzero()
    if where.numel() == 0:
        raise ValueError("the prompt holds no video token")
    return int(where[-1]) + 1


def pixels_for(model, inputs: dict) -> dict:
    """`inputs` with the pixels in the vision tower's dtype. The model casts them to it before
    anything else reads them (`get_video_features`), so the values are the same; in bf16 they take
    half the memory of the processor's fp32 (1.25 GB instead of 2.5 at 131K video tokens, held
    through the whole prefill), and the model's cast is no copy."""
    dtype = tower(model, "visual").dtype
    return {k: v.to(dtype) if k in PIXEL_KEYS and v.is_floating_point() else v for k, v in inputs.items()}


def _drop_patch_states(module, args, output):
    if getattr(output, "last_hidden_state", None) is None or getattr(output, "pooler_output", None) is None:
        return None  # a plain tensor or tuple (other transformers versions): left as it is
    return type(output)(**{k: v for k, v in output.items() if k != "last_hidden_state"})


@contextlib.contextmanager
def without_patch_states(model):
    """The vision tower's outputs without their patch states before the merger (`last_hidden_state`:
    4 x the video tokens x the tower's width, 1.3 GB at 131K video tokens). The model's forward may
    hold that output through the language model's prefill (transformers 5.24 does for all three
    families) and never reads those states; it reads the merged tokens (`pooler_output`) and, in
    Qwen3-VL, the deepstack features."""
    handle = tower(model, "visual").register_forward_hook(_drop_patch_states)
    try:
        yield
    finally:
        handle.remove()


def split_inputs(inputs: dict, length: int) -> tuple[dict, dict]:
    """(the prefix's model inputs, the inputs `generate` takes over the prefix's cache): the
    first P tokens with the pixels, and the whole prompt without them."""
    prefix, rest = {}, {}
    for key, value in inputs.items():
        if key in PER_TOKEN_FILL:
            prefix[key] = value[:, :length]
            rest[key] = value
        elif key in PIXEL_KEYS:
            prefix[key] = value
        else:
            prefix[key] = rest[key] = value
    return prefix, rest


def bridge_inputs(inputs: dict, length: int, question_ids: torch.Tensor) -> dict | None:
    """What the processor put between the last video token and the question's own text tokens
    (Qwen3-VL closes its last frame group with a token of its own; Qwen2-VL and Qwen2.5-VL put
    nothing), as per-token inputs; None when the prompt does not end in `question_ids`."""
    tail = inputs["input_ids"][0, length:]
    n = tail.numel() - question_ids.numel()
    if n < 0 or not torch.equal(tail[n:].cpu(), question_ids[0].cpu()):
        return None
    return {key: value[:, length : length + n] for key, value in inputs.items() if key in PER_TOKEN_FILL}


def extend_inputs(prefix_inputs: dict, bridge: dict, question_ids: torch.Tensor) -> dict:
    """The model inputs of a prompt made of a kept prefix, its bridge and a question's (1, n)
    text token ids."""
    out = {}
    for key, value in prefix_inputs.items():
        if key in PIXEL_KEYS:
            continue
        if key in PER_TOKEN_FILL:
            fill = PER_TOKEN_FILL[key]
            tail = question_ids if fill is None else torch.full_like(question_ids, fill)
            out[key] = torch.cat([value, bridge[key], tail.to(device=value.device, dtype=value.dtype)], dim=1)
        else:
            out[key] = value
    return out


def cache_argument(model) -> str:
    """The name under which this transformers version's models (and so `generate`) take a KV
    cache: `cache` from 5.24 on, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def prompt_positions(model, inputs: dict) -> torch.Tensor:
    """The position ids `generate` gives the whole prompt (mRoPE: text and 3-D vision positions),
    computed by the model's own method, for the prefix's call and the question's alike. (With a
    cache passed in, `generate` would instead continue from the stored rope deltas, which for Qwen-VL
    put text after a video at the wrong positions.)"""
    kwargs = {k: v for k, v in inputs.items() if k != "input_ids" and k not in PIXEL_KEYS}
    return model._prepare_position_ids_for_generation(inputs["input_ids"], kwargs)


def new_cache(model):
    """An empty KV cache for the model whose layers grow in place (models.cache): a question over a
    kept prefix, and its answer's reservation for graph decoding, copy none of the prefix's keys and
    values."""
    from transformers import DynamicCache

    return with_room(DynamicCache(config=model.config))


def crop(cache, length: int) -> None:
    """Drop every position from `length` on (what a question added to a kept prefix)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # a negative count removes that many positions on every version


def prefill_prefix(model, inputs: dict, length: int, positions: torch.Tensor):
    """The vision encoder and the language model over the prompt's first `length` tokens, into a
    new KV cache (returned). `positions`: `prompt_positions` of the whole prompt."""
    prefix_inputs, _ = split_inputs(inputs, length)
    cache = new_cache(model)
    with without_patch_states(model):
        model.model(**prefix_inputs, position_ids=positions[..., :length], **{cache_argument(model): cache},
                    use_cache=True)
    return cache


def generate_over_prefix(model, inputs: dict, length: int, cache, positions: torch.Tensor, **generate_kwargs):
    """`generate` from the prompt's token `length` on, over `cache` holding the first `length`
    positions; the cache is cut back to them afterwards."""
    _, rest = split_inputs(inputs, length)
    try:
        return model.generate(**rest, position_ids=positions, **{cache_argument(model): cache},
                              **generation_options(model, generate_kwargs))
    finally:
        crop(cache, length)


def generation_options(model, options: dict) -> dict:
    """`generate`'s keyword arguments with the generation options among `options` (max_new_tokens,
    do_sample, pad_token_id, ...) set on a copy of the model's generation config, passed as
    `generation_config`; as given when they hold one. Without it, `generate` checks the model's
    config for generation options at every call, which transformers 5.17 does by building a default
    config of the model's class: 7.5-13 ms of a short video's time to first token with Qwen2.5-VL on
    the H200 machine (BENCHMARKS.md, twenty-second session, run 10)."""
    if "generation_config" in options:
        return options
    config = copy.deepcopy(model.generation_config)
    rest = config.update(**options)  # (returns what is not a generation option)
    return {"generation_config": config, **rest}


def generate_whole(model, inputs: dict, length: int, **generate_kwargs):
    """`generate` over the whole prompt in one call, into a new KV cache cut back to the prompt's
    first `length` positions afterwards: (generate's output, that cache)."""
    cache = new_cache(model)
    try:
        with without_patch_states(model):
            out = model.generate(**inputs, **{cache_argument(model): cache},
                                 **generation_options(model, generate_kwargs))
    finally:
        crop(cache, length)
    return out, cache


def kept_positions(positions: torch.Tensor, length: int) -> torch.Tensor:
    """What a prefix's state keeps of a prompt's `prompt_positions`: its first `length` positions (the
    prefix's) and the first one after them (`positions_over_prefix`)."""
    return positions[..., : length + 1]


def positions_over_prefix(model, inputs: dict, length: int, state: PrefixState) -> torch.Tensor:
    """`prompt_positions` of a prompt whose first `length` tokens are the prefix of `state`, without
    the model's method over the whole prompt (19 ms of a later question's 42 ms TTFT over 131K video
    tokens on the H200 machine, BENCHMARKS.md thirty-fifth session): the prefix's positions and the
    first one after it are kept in the state, and the tokens after the prefix (it ends at the last
    video token) are text, one position more per token in every row. The method gives text positions
    so in each family, and a prefix's positions and the first one after it do not depend on what
    follows. Where the state keeps none yet (a prefix prefilled in one call, or whose prompt ended
    with it) they are computed whole and kept."""
    if state.positions is None or state.positions.shape[-1] <= length:
        positions = prompt_positions(model, inputs)
        state.positions = kept_positions(positions, length)
        return positions
    kept, total = state.positions, inputs["input_ids"].shape[1]
    tail = kept[..., length:] + torch.arange(total - length, device=kept.device, dtype=kept.dtype)
    return torch.cat([kept[..., :length], tail], dim=-1)


@dataclass
class PrefixState:
    """One KV cache of a prefix, for one attention setting; `positions`: `prompt_positions` of the
    prefix and of the first token after it (`positions_over_prefix`), None until known."""

    settings: tuple
    cache: object
    recorder: SparsityRecorder
    positions: torch.Tensor | None = None


@dataclass
class VideoPrefix:
    """The kept prefix of the last video: its inputs (no pixels) and its KV caches, one per
    attention setting, oldest first (`VideoQA.prefix_states` bounds how many)."""

    key: tuple
    length: int
    inputs: dict
    bridge: dict | None  # None: later questions are built by the processor (see bridge_inputs)
    video: VideoInfo
    sampling: Sampling
    sampled_frames: int
    video_ranges: list[tuple[int, int]]
    states: dict[tuple, PrefixState] = field(default_factory=dict, repr=False)

    def video_tokens(self) -> int:
        return sum(end - start for start, end in self.video_ranges)
