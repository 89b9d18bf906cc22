"""Test settings: offline hub, and Triton's interpreter on machines without CUDA.

TRITON_INTERPRET is read when the kernel modules are imported, so it is set here, first.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; run on the GPU machine")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("cuda") and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; run on the GPU machine"))
