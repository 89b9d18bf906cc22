"""The second half of a Qwen2.5-VL-7B block at 131K video tokens, `h = h + attn; h + mlp(norm(h))`,
as PyTorch runs it (the add, `F.rms_norm`, the fused MLP forward, the add) against
`models.fused.norm_and_mlp_residuals` (the add and norm in one kernel, the MLP's down projection
adding its product into the sum in place), for both towers: vision (524,160 patch tokens, width
1280, MLP width 3456 as `models.vision` pads it, biases) and language (131,102 tokens, width
3584, MLP width 18,944, no biases). Random bf16 weights. Time per call (triton.testing.do_bench),
and the outputs' difference. Also, for the vision shape, the MLP alone and `add_into` alone. A
development script for a lead (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_mlp_residual.py
"""

import torch
import torch.nn.functional as F
import triton
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP

from models.fused import add_into, adds_into, fuse_mlp_activations, norm_and_mlp_residuals


class RMSNorm(torch.nn.Module):
    """What norm_and_mlp_residuals reads of an RMSNorm: its weight and epsilon."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(width) + 0.5)
        self.variance_epsilon = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.variance_epsilon)


def block_parts(tokens: int, width: int, hidden: int, bias: bool):
    """A block's MLP (activation fused) and post-attention RMSNorm with random bf16 weights, and
    random (tokens, width) hidden states and attention output, on CUDA."""
    config = Qwen2_5_VLVisionConfig(hidden_size=width, intermediate_size=hidden, hidden_act="silu")
    torch.manual_seed(0)
    mlp = Qwen2_5_VLMLP(config, bias=bias).to("cuda", torch.bfloat16).eval()
    for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        torch.nn.init.normal_(layer.weight, std=width**-0.5)
        if bias:
            torch.nn.init.normal_(layer.bias, std=0.02)
    norm = RMSNorm(width, 1e-6).to("cuda", torch.bfloat16)
    assert fuse_mlp_activations(mlp) == 1
    h = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    return mlp, norm, h, torch.randn_like(h)


def stock_second_half(h, attn, norm, mlp):
    """`h = h + attn; h + mlp(norm(h))` as PyTorch runs it (add, `F.rms_norm`, fused MLP, add)."""
    total = h + attn
    return total + mlp(F.rms_norm(total, (h.shape[-1],), norm.weight, norm.variance_epsilon))


def second_half(name: str, tokens: int, width: int, hidden: int, bias: bool) -> None:
    mlp, norm, h, attn = block_parts(tokens, width, hidden, bias)

    def stock():
        return stock_second_half(h, attn, norm, mlp)

    def fused():  # writes over its attn argument: a fresh copy each call would add a pass, so the
        return norm_and_mlp_residuals(h, scratch, norm, mlp)  # scratch's values drift; the time does not

    with torch.inference_mode():
        assert adds_into(mlp, h, h)
        ref = stock()
        out = norm_and_mlp_residuals(h, attn.clone(), norm, mlp)
        diff = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        scratch = attn.clone()
        t_stock = triton.testing.do_bench(stock)
        t_fused = triton.testing.do_bench(fused)
        print(f"{name}, {tokens} x {width}, MLP {hidden}: stock {t_stock:.3f} ms, fused {t_fused:.3f} ms, "
              f"{t_stock - t_fused:.3f} ms less per block; relative L2 from stock {diff:.2e}")
        if name == "vision":
            target = h.clone()
            t_mlp = triton.testing.do_bench(lambda: mlp(h))
            t_into = triton.testing.do_bench(lambda: add_into(mlp, h, target))
            print(f"  the MLP alone {t_mlp:.3f} ms, add_into alone {t_into:.3f} ms")


if __name__ == "__main__":
    second_half("vision", 524160, 1280, 3456, True)
    second_half("language", 131102, 3584, 18944, False)
