"""A decoding step's share of the language model's fused elementwise kernels: at 1 token (and at a
question's few tokens), the host time of each fused op (a Triton launch) against the stock PyTorch
ops it replaces, in the Qwen2.5-VL-7B text shapes (width 3,584, 28 query / 4 KV heads of 128, MLP
18,944, bf16). A decoding step is host-bound (BENCHMARKS.md, fourteenth session), so a way that
costs the host less makes the step faster by as much, 28 times (once per layer).

- rotary embedding: the modeling file's `apply_rotary_pos_emb` with models.text's fused one in
  place (the fit checks and kernels.rope) against the stock function it keeps;
- MLP activation: kernels.activation.silu_mul written over gate against `F.silu(gate) * up`;
- RMSNorm: F.rms_norm (what models.fused runs) against transformers' module forward.

Host microseconds per call as gpu_host_profile.host_us measures them (the mean over back-to-back
calls, unsynchronised; the GPU work of each is a few microseconds), the ways alternated
`--repeats` times, the median kept. A development script (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_one_token_ops.py [--tokens 1 16 64]
"""

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from gpu_host_profile import host_us

from kernels.activation import silu_mul
from models.text import _STOCK_ROPE, fuse_text_rope

WIDTH, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 3584, 28, 4, 128, 18944


def _model():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from videoprefill.bench import QWEN25_VL_7B

    small = dict(QWEN25_VL_7B["text"], num_hidden_layers=1)
    config = Qwen2_5_VLConfig(text_config=small, vision_config=dict(QWEN25_VL_7B["vision"], depth=1))
    with torch.device("cuda"):
        return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()


def ways(tokens: int, model) -> dict:
    dev = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, tokens, HEADS, HEAD_DIM, **dev).transpose(1, 2)  # views of the projections
    k = torch.randn(1, tokens, KV_HEADS, HEAD_DIM, **dev).transpose(1, 2)
    cos, sin = torch.randn(1, tokens, HEAD_DIM, **dev), torch.randn(1, tokens, HEAD_DIM, **dev)
    layer = model.model.language_model.layers[0]
    modeling = sys.modules[type(layer.self_attn).__module__]
    fuse_text_rope(model)
    fused_rope, stock_rope = modeling.apply_rotary_pos_emb, getattr(modeling, _STOCK_ROPE)
    gate, up = torch.randn(1, tokens, HIDDEN, **dev), torch.randn(1, tokens, HIDDEN, **dev)
    norm = layer.input_layernorm
    h = torch.randn(1, tokens, WIDTH, **dev)
    eps = norm.variance_epsilon
    return {
        "rotary embedding": {"stock": lambda: stock_rope(q, k, cos, sin),
                             "fused": lambda: fused_rope(q, k, cos, sin)},
        "MLP activation": {"stock": lambda: F.silu(gate) * up, "fused": lambda: silu_mul(gate, up, out=gate)},
        "RMSNorm": {"stock": lambda: type(norm).forward(norm, h),
                    "fused": lambda: F.rms_norm(h, (WIDTH,), norm.weight, eps)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args()
    model = _model()
    print("| tokens | op | stock host us | fused host us | fused - stock us | x 28 layers ms |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for tokens in args.tokens:
            for op, fns in ways(tokens, model).items():
                times = {name: [] for name in fns}
                for _ in range(args.repeats):
                    for name, fn in fns.items():
                        times[name].append(host_us(fn, args.calls))
                stock, fused = statistics.median(times["stock"]), statistics.median(times["fused"])
                print(f"| {tokens} | {op} | {stock:.1f} | {fused:.1f} | {fused - stock:+.1f} | "
                      f"{28 * (fused - stock) / 1e3:+.3f} |", flush=True)


if __name__ == "__main__":
    main()
