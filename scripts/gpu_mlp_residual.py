"""One Qwen2.5-VL-7B vision block's MLP and the residual add after it, at 131K video tokens
(524,160 patch tokens, width 1280, hidden width 3456 as `models.vision` pads it; random bf16
weights): `h + mlp(x)` with the fused MLP forward, against `models.fused.add_into`, which adds
the down projection's product into h in place; and the add and norm kernel with and without
the bias it then carries. Times per call (triton.testing.do_bench) and the outputs' difference.
A development script for a lead (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_mlp_residual.py
"""

import torch
import triton
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP

from kernels.rms_norm import add_rms_norm
from models.fused import add_into, adds_into, fuse_mlp_activations

tokens, width, hidden = 524160, 1280, 3456
config = Qwen2_5_VLVisionConfig(hidden_size=width, intermediate_size=hidden, hidden_act="silu")
torch.manual_seed(0)
mlp = Qwen2_5_VLMLP(config, bias=True).to("cuda", torch.bfloat16).eval()
for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
    torch.nn.init.normal_(layer.weight, std=width**-0.5)
    torch.nn.init.normal_(layer.bias, std=0.02)
assert fuse_mlp_activations(mlp) == 1
x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
h = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)

with torch.inference_mode():
    assert adds_into(mlp, x, h)
    separate = h + mlp(x)
    accumulated = add_into(mlp, x, h + mlp.down_proj.bias)
    diff = ((accumulated.float() - separate.float()).norm() / separate.float().norm()).item()
    target = h.clone()
    t_separate = triton.testing.do_bench(lambda: h + mlp(x))
    t_mlp = triton.testing.do_bench(lambda: mlp(x))
    t_accumulated = triton.testing.do_bench(lambda: add_into(mlp, x, target))  # target grows; the time does not
    w = torch.rand(width, device="cuda", dtype=torch.bfloat16) + 0.5
    y = torch.randn_like(h)
    t_norm = triton.testing.do_bench(lambda: add_rms_norm(h, y, w, 1e-6))
    t_norm_bias = triton.testing.do_bench(lambda: add_rms_norm(h, y, w, 1e-6, bias=mlp.down_proj.bias))
print(f"h + mlp(x): {t_separate:.3f} ms (the MLP alone {t_mlp:.3f} ms, so the add {t_separate - t_mlp:.3f})")
print(f"add_into(mlp, x, h): {t_accumulated:.3f} ms: {t_separate - t_accumulated:.3f} ms less per block, "
      f"{32 * (t_separate - t_accumulated):.1f} ms over 32 blocks; relative L2 from h + mlp(x) {diff:.2e}")
print(f"add and norm kernel: {t_norm:.3f} ms, with the bias {t_norm_bias:.3f} ms")
