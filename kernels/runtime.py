"""Where the Triton kernels run: CUDA tensors, or CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, read when a kernel module is imported; the tests set it on CPU machines)."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Whether Triton's CPU interpreter runs the kernels."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(name: str, device: torch.device) -> None:
    """Raise ValueError unless a Triton kernel can run on tensors on `device`."""
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(f"{name} runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), got {device}")
