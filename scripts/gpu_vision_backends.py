"""The vision tower over a whole video per SDPA backend of its windowed and frame attention: the
first call at the video's shapes (each backend's first, in this order: flash, cuDNN, after an
untimed call with the memory-efficient one) and the best of three after it, with the output's
difference from the default backend's. Qwen2.5-VL-7B architecture, random bf16 weights, the
frames of VIDEO prepared as the pipeline prepares them.

    PYTHONPATH=$PWD python3 scripts/gpu_vision_backends.py VIDEO --max-pixels 200704
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from videoprefill.bench import add_file_arguments, file_sampling


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_file_arguments(parser)
    args = parser.parse_args()

    from videoprefill.bench import build_7b, markdown_table
    from videoprefill.prefix import pixels_for
    from videoprefill.video import read_frames

    model, processor = build_7b()
    visual = model.model.visual
    sampled = read_frames(file_sampling(args).video_entry(args.video), processor.video_processor.patch_size)
    inputs = processor.video_processor(videos=[sampled.resized("cuda")], do_resize=False, do_sample_frames=False,
                                       return_tensors="pt", device="cuda")
    x = pixels_for(model, dict(inputs))["pixel_values_videos"]
    grid = inputs["video_grid_thw"].to("cuda")

    def forward():
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = visual(x, grid_thw=grid)
        torch.cuda.synchronize()
        return time.perf_counter() - start, out.pooler_output if hasattr(out, "pooler_output") else out

    # One untimed call with the memory-efficient backend first: the allocator's growth, cuBLAS's
    # first products and the other kernels' loading are paid before any row.
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        forward()
    rows, outputs = [], {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION),
                          ("memory-efficient (after the untimed call)", SDPBackend.EFFICIENT_ATTENTION),
                          ("default (PyTorch's choice)", None)):
        try:
            with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                first, out = forward()
                best = min(forward()[0] for _ in range(3))
        except RuntimeError as err:
            print(f"{name}: {str(err).splitlines()[0]}")
            continue
        outputs[name] = out
        rows.append({"backend": name, "first": first, "best": best})
        print(rows[-1], flush=True)
    ref = outputs.get("default (PyTorch's choice)")
    for row in rows:
        out = outputs[row["backend"]].float()
        row["diff"] = ((out - ref.float()).norm() / ref.float().norm()).item() if ref is not None else float("nan")
    print(f"patch tokens {x.shape[0]}")
    print(markdown_table(rows, [("SDPA backend", "backend", ""), ("first call s", "first", ".3f"),
                                ("best of 3 s", "best", ".3f"),
                                ("relative L2 difference from default", "diff", ".2e")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
