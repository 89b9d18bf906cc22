"""What the host reads from a device tensor, read once per tensor.

transformers builds some tensors once per forward and hands the same one to every layer: the
vision tower's `cu_seqlens`, the language model's attention mask. Reading their values on the
host waits for the GPU and drains its queue, so reading them in every layer leaves the GPU idle
once per layer (BENCHMARKS.md: 100 synchronisations per vision forward cost 0.16 s at 128K video
tokens). `ReadOnce` remembers the last few values read by the tensor's identity (a weak
reference, so a freed tensor never matches, whatever reuses its memory) and version counter (an
in-place write is read again; inference tensors have none, and these are never written after
they are handed out).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch


class ReadOnce:
    def __init__(self, size: int = 4):
        self.size = size
        self._entries: list[tuple[weakref.ref, int | None, Hashable, Any]] = []

    def get(self, tensor: torch.Tensor, read: Callable[[], Any], key: Hashable = None) -> Any:
        """read() the first time `tensor` (with `key`) is seen since it last changed; after that
        what it returned."""
        version = None if tensor.is_inference() else tensor._version
        for ref, seen, seen_key, value in self._entries:
            if ref() is tensor and seen == version and seen_key == key:
                return value
        value = read()
        self._entries.insert(0, (weakref.ref(tensor), version, key, value))
        del self._entries[self.size:]
        return value
