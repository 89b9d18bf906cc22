"""Kernels and the pipeline on a GPU other than the current one (`--device cuda:1`; skipped with
fewer than two GPUs). Triton launches on the current device: before `kernels.runtime.Launcher`
switched to the tensors' device, FlashPrefill on cuda:1 failed ("invalid resource handle"), and a
launch prepared on cuda:0 and made again with cuda:1's tensors was an illegal memory access."""

from __future__ import annotations

import threading

import pytest
import torch

from kernels import FlashPrefillConfig, dense_attention, flash_prefill
from kernels.activation import silu_mul
from kernels.rms_norm import add_rms_norm
from kernels.rope import rope
from kernels.testing import structured_qkv
from kernels.window_attention import window_attention

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs two CUDA GPUs"),
]


def _kernel_outputs(device: str) -> list[torch.Tensor]:
    """FlashPrefill (pattern kernels and attention), dense attention and the model-side kernels on
    `device`, inputs made on the CPU from fixed seeds; outputs on the CPU."""
    cfg = FlashPrefillConfig(alpha=0.1, min_seq_len=0)
    q, k, v = (x.to(device) for x in structured_qkv(1, 4096, 4096, 28, 4, 128, cfg.block_size,
                                                    dtype=torch.bfloat16, device="cpu"))
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(64, 1280, generator=g).to(torch.bfloat16).to(device) for _ in range(2))
    weight = (torch.rand(1280, generator=g) + 0.5).to(torch.bfloat16).to(device)
    rq, rk, rv = (torch.randn(256, 16, 80, generator=g).to(torch.bfloat16).to(device) for _ in range(3))
    angles = torch.randn(256, 80, generator=g)
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    offsets = torch.tensor([0, 64, 100, 164, 228, 256], dtype=torch.int32, device=device)  # (chunks <= 64)
    outputs = [flash_prefill(q, k, v, config=cfg), dense_attention(q, k, v, 128**-0.5),
               *add_rms_norm(x, y, weight, 1e-6), silu_mul(x, y), *rope(rq, rk, cos, sin),
               window_attention(rq, rk, rv, offsets, 80**-0.5, cos, sin)]
    torch.cuda.synchronize(device)
    return [o.cpu() for o in outputs]


def test_kernels_on_another_device_give_the_current_devices_results():
    """With cuda:0 current, every kernel on cuda:1 tensors gives what it gives on cuda:0 (the same
    GPU model: bit for bit), in this thread and in a new one (the web UI's answers run in one)."""
    assert torch.cuda.current_device() == 0
    expected = _kernel_outputs("cuda:0")
    found = {}
    thread = threading.Thread(target=lambda: found.update(thread=_kernel_outputs("cuda:1")))
    thread.start()
    thread.join()
    found["main"] = _kernel_outputs("cuda:1")
    for where, outputs in found.items():
        assert len(outputs) == len(expected), where
        for i, (a, b) in enumerate(zip(outputs, expected)):
            assert torch.equal(a, b), (where, i)
    assert torch.cuda.current_device() == 0  # left as it was


def test_the_demo_model_answers_on_another_device():
    """The pipeline on cuda:1 answers as on cuda:0 (bf16 both), FlashPrefill from the first block, from
    this thread and from another (dense), and leaves the current device alone. A long answer
    (the demo model answers "Describe this video." at length) decodes from a CUDA graph captured on
    the model's device (models.decode)."""
    import dataclasses

    from models import load
    from videoprefill.pipeline import VideoQA
    from videoprefill.synthetic import DEMO_QUESTION
    from videoprefill.video import sample_video_path

    video = str(sample_video_path())
    answers = {}
    for device in ("cuda:0", "cuda:1"):
        qa = VideoQA(*load("demo", device=device), warmup=False)
        sparse = dataclasses.replace(qa.config, min_seq_len=0)
        answers[device] = qa.ask(video, DEMO_QUESTION, "sparse", config=sparse).text
        found = {}
        thread = threading.Thread(target=lambda qa=qa, found=found: found.update(
            text=qa.ask(video, DEMO_QUESTION, "dense").text))
        thread.start()
        thread.join()
        answers[device + ", dense in a thread"] = found["text"]
        long = qa.ask(video, "Describe this video.", "sparse", config=sparse, max_new_tokens=8)
        assert long.new_tokens == 8
        answers[device + ", graph-decoded"] = long.text
    assert answers["cuda:1"] == answers["cuda:0"] != ""
    assert answers["cuda:1, graph-decoded"] == answers["cuda:0, graph-decoded"] != ""
    assert answers["cuda:1, dense in a thread"] == answers["cuda:0, dense in a thread"] != ""
    assert torch.cuda.current_device() == 0
