"""models.cache: a dynamic KV cache whose layers grow in place, against transformers' concatenation."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import models.cache as room_cache
from models.cache import capacity_for, room, with_room
from models.tiny import build_config, build_tokenizer

HEADS, DIM = 2, 8


@pytest.fixture(scope="module")
def config():
    return build_config("qwen2.5-vl", build_tokenizer())


def states(length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, HEADS, length, DIM, generator=g) for _ in range(2))


def both(config):
    """A cache with room and transformers' own, fed the same updates."""
    return with_room(DynamicCache(config=config)), DynamicCache(config=config)


def update(caches, length: int, seed: int, layer: int = 0):
    key, value = states(length, seed)
    return [cache.update(key, value, layer) for cache in caches]


def test_updates_write_in_place_within_the_room(config):
    """A prefill, then a question and two decoding steps: every update returns transformers' keys and
    values, written into the buffers the first update made, whose length and room they lead."""
    ours, theirs = both(config)
    update((ours, theirs), 40, seed=0)
    layer = ours.layers[0]
    keys, values = room(layer)
    assert keys.shape == (1, HEADS, capacity_for(40), DIM) and capacity_for(40) >= 40 + room_cache.ROOM
    for length, seed in ((7, 1), (1, 2), (1, 3)):
        (k, v), (k_ref, v_ref) = update((ours, theirs), length, seed)
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
        assert k.data_ptr() == keys.data_ptr() and v.data_ptr() == values.data_ptr()
    assert room(layer) == (keys, values) and ours.get_seq_length() == theirs.get_seq_length() == 49
    assert ours.layers[1].get_seq_length() == 0  # (layers apart)


def test_a_cut_back_cache_writes_over_the_last_question(config):
    """Cut back to the prefix (the pipeline's kept prefix), the next question writes after the
    prefix in the same buffers, the prefix's positions untouched."""
    ours, theirs = both(config)
    update((ours, theirs), 30, seed=0)
    update((ours, theirs), 9, seed=1)
    prefix = ours.layers[0].keys[:, :, :30].clone()
    for cache in (ours, theirs):
        cache.crop(-9)
    keys = room(ours.layers[0])[0]
    (k, v), (k_ref, v_ref) = update((ours, theirs), 5, seed=2)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref) and torch.equal(k[:, :, :30], prefix)
    assert k.data_ptr() == keys.data_ptr()


def test_out_of_room_and_replaced_tensors_move_into_new_buffers(config):
    """An update past the room moves the layer into new buffers with room (one copy); so does one
    after the layer's tensors were replaced (as `reorder_cache` does), the buffers left unused."""
    ours, theirs = both(config)
    update((ours, theirs), 10, seed=0)
    first = room(ours.layers[0])[0]
    more = first.shape[2] - 10 + 1
    (k, v), (k_ref, v_ref) = update((ours, theirs), more, seed=1)
    second = room(ours.layers[0])[0]
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert second.data_ptr() != first.data_ptr() and second.shape[2] == capacity_for(10 + more)
    layer = ours.layers[0]
    layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    assert room(layer) is None
    (k, v), (k_ref, v_ref) = update((ours, theirs), 2, seed=2)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert room(layer)[0].data_ptr() not in (first.data_ptr(), second.data_ptr())


def test_room_needs_the_layers_tensors_to_lead_the_buffers(config):
    ours, _ = both(config)
    update((ours,), 12, seed=0)
    layer = ours.layers[0]
    keys, values = room(layer)
    layer.keys = keys[:, :, 1:13]  # another start
    assert room(layer) is None
    layer.keys = keys[:, :1, :12]  # fewer heads
    assert room(layer) is None
    layer.keys = keys[:, :, :12]
    assert room(layer) == (keys, values)


def test_a_dropped_cache_frees_its_buffers_at_once(config):
    """Nothing in a cache with room refers back to itself: its buffers go with its last reference,
    not when Python's cycle collector runs (a KV cache of 7.5 GB at 131K video tokens)."""
    import gc
    import weakref

    ours, _ = both(config)
    update((ours,), 12, seed=0)
    buffer = weakref.ref(room(ours.layers[0])[0])
    gc.disable()
    try:
        del ours
        assert buffer() is None
    finally:
        gc.enable()
