"""On the GPU: where the vision encoder's time goes (Qwen2.5-VL-7B architecture, random weights).

`python3 scripts/gpu_vision_profile.py [--video-tokens 131072] [--json FILE]`: the vision tower
on a synthetic video of that many LLM tokens, as transformers runs it and with each step of
models.vision added in turn (the last, the fused MLP activation, from models.fused), timed per
stage (patch embedding, rotary and window set-up, the blocks, the merger; forward hooks that
synchronise and read the host clock); each variant's
output against the tower run in fp32; then a torch.profiler table of the top GPU kernels of the
tower as models.load prepares it. A development script (results go to BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import models.vision as vision
from models.fused import fuse_mlp_activations
from models.vision import align_mlp_width, batch_vision_attention
from videoprefill.bench import build_7b, synthetic_request
from videoprefill.pipeline import VideoQA


def stage_times(visual, pixels, grid) -> tuple[dict, torch.Tensor]:
    """Seconds per stage of one vision forward (synchronised at each stage boundary), and its output."""
    marks: dict[str, float] = {}

    def pre(name):
        def hook(module, args):  # returns None: the inputs stay as they are
            torch.cuda.synchronize()
            marks.setdefault(f"{name}0", time.perf_counter())
        return hook

    def post(name):
        def hook(module, args, output):
            torch.cuda.synchronize()
            marks[f"{name}1"] = time.perf_counter()
        return hook

    stages = {"patch_embed": visual.patch_embed, "blocks": visual.blocks[0], "merger": visual.merger}
    handles = [m.register_forward_pre_hook(pre(n)) for n, m in stages.items()]
    handles += [m.register_forward_hook(post(n)) for n, m in stages.items() if n != "blocks"]
    handles.append(visual.blocks[-1].register_forward_hook(post("blocks")))
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = visual(pixels, grid_thw=grid)
    torch.cuda.synchronize()
    end = time.perf_counter()
    for h in handles:
        h.remove()
    return {
        "whole_s": end - start,
        "patch_embed_s": marks["patch_embed1"] - marks["patch_embed0"],
        "setup_s": marks["blocks0"] - marks["patch_embed1"],  # rotary positions, window order, cu_seqlens
        "blocks_s": marks["blocks1"] - marks["blocks0"],
        "merger_s": marks["merger1"] - marks["merger0"],
    }, out.pooler_output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video-tokens", type=int, default=131072)
    parser.add_argument("--json")
    args = parser.parse_args()
    model, processor = build_7b()
    qa = VideoQA(model, processor, mask_layers=(), warmup=False)
    prepared = synthetic_request(qa, args.video_tokens)
    pixels = prepared.inputs["pixel_values_videos"].to(torch.bfloat16)
    grid = prepared.inputs["video_grid_thw"]
    visual = model.model.visual
    result = {"video_tokens": prepared.tokens["video"], "patches": int(pixels.shape[0])}
    outputs = {}
    # As transformers runs it; with the attention batched per chunk length (on CUDA one
    # variable-length flash call); with the MLP widths aligned too; with the fused rotary
    # embedding too (and with it the window kernel in the windowed layers, FUSED_WINDOWS); with
    # the fused RMSNorms and the patch matmul too; with the fused MLP activation too (what
    # models.load does).
    variants = (("stock", 0), ("batched", 1), ("batched_aligned", 2), ("batched_aligned_rope", 3),
                ("batched_aligned_rope_norms_patch", 4), ("prepared", 5))
    for name, steps in variants:
        batch_vision_attention(model, enabled=steps >= 1)
        align_mlp_width(model, enabled=steps >= 2)
        vision.FUSED_ROPE = steps >= 3
        vision.fuse_norms(model, enabled=steps >= 4)
        vision.patch_embed_as_matmul(model, enabled=steps >= 4)
        fuse_mlp_activations(visual, enabled=steps >= 5)
        stage_times(visual, pixels, grid)  # warm-up
        result[name], outputs[name] = stage_times(visual, pixels, grid)
        print(name, {k: round(v, 3) for k, v in result[name].items()}, flush=True)
    # The bf16 rounding scale: each bf16 output against the tower run in fp32 (no TF32) as
    # transformers computes it but for the batched attention (bit-identical to per-chunk SDPA).
    vision.prepare_vision_tower(model, enabled=False)
    vision.FUSED_ROPE = False
    batch_vision_attention(model)
    reference = copy.deepcopy(visual).float()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    _, exact = stage_times(reference, pixels.float(), grid)
    exact = exact.double()
    del reference
    for name, *_ in variants:
        stock = (outputs[name].double() - outputs["stock"].double()).norm() / outputs["stock"].double().norm()
        fp32 = (outputs[name].double() - exact).norm() / exact.norm()
        result[f"{name}_relative_error"] = {"to_stock": stock.item(), "to_fp32": fp32.item()}
        print(f"{name}: output's relative L2 error to stock {stock.item():.2e}, to fp32 {fp32.item():.2e}")
    vision.prepare_vision_tower(model)
    vision.FUSED_ROPE = True
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof, torch.no_grad():
        visual(pixels, grid_thw=grid)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70)
    print(table)
    result["kernels"] = table
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
