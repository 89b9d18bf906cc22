"""The CPU-side part of `python -m kernels.bench` (the timings themselves need a CUDA GPU)."""

import pytest
import torch

from kernels.bench import main


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "4096", "0"], "--lengths must be at least 1 token, got 0"),
    (["--densities", "0.05", "1.5"], "--densities must be in (0, 1], got 1.5"),
    (["--kv-heads", "0"], "--kv-heads must be at least 1, got 0"),
    (["--q-heads", "28", "--kv-heads", "5"], "--q-heads (28) must be a multiple of --kv-heads (5)"),
    (["--block-size", "100"], "block_size must be a power of two in [16, 256], got 100"),
    (["--alpha", "-1"], "alpha must be in [0, 1], got -1.0"),
])
def test_bad_options_end_in_one_line(argv, message, capsys):
    """Checked before the GPU is looked for, so the message is the same on any machine."""
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


def test_without_a_gpu_it_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["--lengths", "4096"]) == 2
    assert capsys.readouterr().err.strip() == "kernels.bench needs a CUDA GPU"
