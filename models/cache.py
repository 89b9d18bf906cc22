"""A KV cache whose layers grow in place: transformers' dynamic cache with room past its length.

transformers' `DynamicLayer` appends by concatenation, so every update copies the layer's whole
keys and values. A question over a kept video prefix copied the prefix's cache once that way, and
graph decoding (models.decode) copied it again into buffers reserved for the answer: at 131K video
tokens of the 7B model, 7.5 GB each time. Here:

- `with_room(cache)` gives an empty cache `RoomyLayer`s, dynamic layers whose update keeps their
  keys and values as the leading positions of buffers with `ROOM` more positions, and writes what
  it appends into them. A layer out of room moves into new buffers with room: one copy, as the
  concatenation made. The prefix's prefill, into an empty layer, copies its keys and values once
  either way.
- `room(layer)` says which buffers a layer's keys and values lead, if any; `move_into_room` moves
  them into new buffers with room (also models.decode's reservation where the layer's own buffers
  do not hold the answer).

So a question over a kept prefix writes its keys and values after the prefix's, in place, and its
answer is reserved there too: neither copies the cache. On an H200 with the 7B architecture at
131K video tokens: 7.5 ms less after an answer's first token (graph decoding's reservation 8.7 ->
1.3 ms), a later question's first token 6 ms sooner (64.4 -> 58.3 ms) and its peak memory 31.0 ->
23.8 GiB (BENCHMARKS.md, thirty-second session). Cutting the cache back to the prefix
(`DynamicLayer.crop`) leaves views of the same buffers, so the next question writes over the last
one's positions; nothing else holds them.

A layer's keys and values are then views with the buffers' strides (head stride ROOM or more
positions longer than the length). The attention functions take any strides with a unit last one
(kernels.flash_prefill, kernels' dense attention, SDPA). What replaces a layer's tensors
(`reorder_cache`, `batch_repeat_interleave`, a reservation of its own) leaves the recorded buffers
unused: `room` checks that the layer's keys and values still lead them.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

# Positions past the length a layer's buffers are made with: a question and its answer after a kept
# prefix (57 KB a position in the 7B model: 29 MB).
ROOM = 512
# Buffers hold a multiple of this many positions (as models.decode's reservations).
MULTIPLE = 64
_BUFFERS = "_videoprefill_room"  # (keys buffer, values buffer) of a layer


def room(layer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (keys, values) buffers, (B, H, capacity, D), whose leading positions the layer's keys and
    values are; None where they are not (no buffers recorded, or the tensors replaced since)."""
    buffers = layer.__dict__.get(_BUFFERS)
    if buffers is None:
        return None
    for held, buffer in zip((getattr(layer, "keys", None), getattr(layer, "values", None)), buffers, strict=True):
        if not (isinstance(held, torch.Tensor) and held.dim() == 4 and held.data_ptr() == buffer.data_ptr()
                and held.stride() == buffer.stride() and held.dtype == buffer.dtype
                and held.shape[:2] == buffer.shape[:2] and held.shape[3] == buffer.shape[3]
                and held.shape[2] <= buffer.shape[2]):
            return None
    return buffers


def give_room(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Record (B, H, capacity, D) contiguous buffers whose leading positions the layer's keys and
    values are (or are about to be)."""
    layer.__dict__[_BUFFERS] = (keys, values)


def capacity_for(length: int) -> int:
    """Positions of buffers holding `length` and ROOM more, a multiple of MULTIPLE."""
    return -(-(length + ROOM) // MULTIPLE) * MULTIPLE


def move_into_room(layer, end: int, like: tuple[torch.Tensor, torch.Tensor] | None = None):
    """New (keys, values) buffers of `capacity_for(end)` positions for the layer, with its keys and
    values (none while it is empty) copied to their start, recorded (`give_room`) and returned;
    shaped as `like`'s (key, value) tensors where given, else as the layer's own. The one copy a
    layer out of room makes, as transformers' concatenation."""
    length = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0
    capacity = capacity_for(end)
    buffers = tuple(t.new_empty(*t.shape[:2], capacity, t.shape[3]) for t in (like or (layer.keys, layer.values)))
    if length:
        buffers[0][:, :, :length].copy_(layer.keys)
        buffers[1][:, :, :length].copy_(layer.values)
    give_room(layer, *buffers)
    return buffers


class RoomyLayer(DynamicLayer):
    """transformers' `DynamicLayer` whose update writes into buffers with room (module docstring)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        end = length + key_states.shape[-2]
        buffers = room(self)
        if buffers is not None and not (buffers[0].shape[2] >= end and all(
                b.dtype == s.dtype and b.device == s.device and b.shape[:2] == s.shape[:2] and b.shape[3] == s.shape[3]
                for b, s in zip(buffers, (key_states, value_states)))):
            buffers = None
        if buffers is None:
            buffers = move_into_room(self, end, like=(key_states, value_states))
        buffers[0][:, :, length:end].copy_(key_states)
        buffers[1][:, :, length:end].copy_(value_states)
        self.keys, self.values = buffers[0][:, :, :end], buffers[1][:, :, :end]
        return self.keys, self.values


def with_room(cache):
    """Give an empty cache `RoomyLayer`s in place of its dynamic layers (transformers' `DynamicLayer`,
    not its subclasses); returns the cache. (A new layer object, not a patched method: a layer
    holding its own bound method would keep its buffers until Python's cycle collector ran.)"""
    layers = getattr(cache, "layers", None)
    for i, layer in enumerate(layers or ()):
        if type(layer) is DynamicLayer and not layer.is_initialized:
            layers[i] = RoomyLayer()
    return cache
