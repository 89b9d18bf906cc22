"""The vision tower over a whole video with its cu_seqlens layouts read once per tensor (as kept,
`models.vision._layout`) and read again in every layer (as before), alternating: time and the
host synchronisations per forward (PyTorch's sync-debug mode counts them). Qwen2.5-VL-7B
architecture, random bf16 weights, the frames of VIDEO prepared as the pipeline prepares them.

    PYTHONPATH=$PWD python3 scripts/gpu_vision_syncs.py VIDEO --max-pixels 200704
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video")
    parser.add_argument("--max-pixels", type=int, default=448 * 448)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import models.vision as vision
    from videoprefill.bench import build_7b, markdown_table
    from videoprefill.video import Sampling, read_frames

    model, processor = build_7b()
    visual = model.model.visual
    sampling = Sampling(fps=2.0, max_frames=2048, max_pixels=args.max_pixels, total_pixels=2048 * args.max_pixels)
    sampled = read_frames(sampling.video_entry(args.video), processor.video_processor.patch_size)
    pixels = processor.video_processor(videos=[sampled.resized("cuda")], do_resize=False, do_sample_frames=False,
                                       return_tensors="pt", device="cuda")
    x = pixels["pixel_values_videos"].to(dtype=visual.dtype)
    grid = pixels["video_grid_thw"].to("cuda")
    kept = vision._layout
    ways = {"read once per tensor (kept)": kept, "read in every layer (before)": lambda cu: vision._Layout(cu.tolist())}

    @torch.inference_mode()
    def forward():
        return visual(x, grid_thw=grid)

    rows = {way: {"way": way, "seconds": float("inf"), "syncs": 0} for way in ways}
    outputs = {}
    for repeat in range(args.repeats + 1):  # the first round is untimed
        for way, layout in ways.items():
            vision._layout = layout
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = forward()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if repeat:
                rows[way]["seconds"] = min(rows[way]["seconds"], seconds)
            outputs[way] = out.pooler_output if hasattr(out, "pooler_output") else out
    for way, layout in ways.items():
        vision._layout = layout
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            forward()
            torch.cuda.set_sync_debug_mode("default")
        rows[way]["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
    vision._layout = kept
    a, b = outputs.values()
    print(f"outputs identical: {torch.equal(a, b)}; video tokens {a.shape[0]}")
    print(markdown_table(list(rows.values()), [("cu_seqlens layout", "way", ""), ("vision tower s", "seconds", ".3f"),
                                               ("host synchronisations per forward", "syncs", "d")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
