"""Test settings: offline hub, and Triton's interpreter on machines without CUDA.

TRITON_INTERPRET is read when the kernel modules are imported, so it is set here, first.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")
# The demo model is built once per test session, away from the user's cache.
if "VIDEOPREFILL_HOME" not in os.environ:
    os.environ["VIDEOPREFILL_HOME"] = tempfile.mkdtemp(prefix="videoprefill-test-home-")
    atexit.register(shutil.rmtree, os.environ["VIDEOPREFILL_HOME"], ignore_errors=True)

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


@pytest.fixture(scope="session")
def sample_video(tmp_path_factory):
    """A small deterministic mp4: 4 s at 8 fps, 112 x 112."""
    from videoprefill.video import write_test_video

    return str(write_test_video(tmp_path_factory.mktemp("video") / "clip.mp4", seconds=4, fps=8, size=(112, 112)))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Folders of small locally built Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints."""
    from models.tiny import FAMILIES, build_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {family: str(build_tiny(family, root / family, seed=1)) for family in FAMILIES}
