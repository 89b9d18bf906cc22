"""The vision tower per kernel of its windowed and frame attention, over the same video sampled at
several frame counts (each a new set of attention shapes: the windows' batch sizes): the
variable-length flash kernel (models.vision.VARLEN_FLASH), with or without the windowed layers in the fused
window kernel (models.vision.FUSED_WINDOWS), the blocks' middle residual add and norm in one kernel
(models.vision.fuse_block_adds) and their last residual add done by the MLP's down projection
(models.vision.ACCUMULATE_MLP; all four on by default), and SDPA per chunk length with its cuDNN
backend (PyTorch's choice on the H200) or its flash backend. Per kernel and frame count, the first
call at those shapes and the one after it (the median of --repeats after it), the peak of allocated
memory (the model's weights included), and the output's difference from SDPA's cuDNN backend. An
untimed call with SDPA's memory-efficient backend at the largest count comes first (the allocator's
growth, cuBLAS's first products). Qwen2.5-VL-7B architecture, random bf16 weights, the frames of
VIDEO prepared as the pipeline prepares them.

    PYTHONPATH=$PWD python3 scripts/gpu_vision_backends.py VIDEO --max-pixels 200704 --frames 1040 1024 992 \
        [--synthetic 131072 122880]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from videoprefill.bench import add_file_arguments, file_sampling

# name: (models.vision.VARLEN_FLASH, FUSED_WINDOWS, the blocks' middle add and norm fused
# (fuse_block_adds), the MLP's residual add in its down projection (ACCUMULATE_MLP), SDPA backend)
KERNELS = {
    "SDPA cuDNN": (False, False, False, False, SDPBackend.CUDNN_ATTENTION),
    "SDPA flash": (False, False, False, False, SDPBackend.FLASH_ATTENTION),
    "varlen flash": (True, False, False, False, None),
    "fused windows, varlen flash": (True, True, False, False, None),
    "fused windows and adds, varlen flash": (True, True, True, False, None),
    "fused windows and adds, MLP adding into the residual, varlen flash": (True, True, True, True, None),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_file_arguments(parser)
    parser.add_argument("--frames", type=int, nargs="+", default=[1040, 1024, 992],
                        help="sample at most this many frames, one video per count")
    parser.add_argument("--synthetic", type=int, nargs="+", default=[], metavar="TOKENS",
                        help="also the bench's synthetic videos of this many video tokens (448 x 448 frames: "
                             "windows of one size)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="calls after the first; 'second call' is their median")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS,
                        help="the attention kernels to compare (the first, SDPA cuDNN, is the outputs' reference)")
    args = parser.parse_args()
    args.kernels = ["SDPA cuDNN", *args.kernels]

    import models.vision as vision
    from videoprefill.bench import build_7b, markdown_table, synthetic_request
    from videoprefill.pipeline import VideoQA
    from videoprefill.prefix import pixels_for
    from videoprefill.video import read_frames

    model, processor = build_7b()
    visual = model.model.visual
    videos = {}
    for frames in args.frames:
        sampling = dataclasses.replace(file_sampling(args), max_frames=frames)
        sampled = read_frames(sampling.video_entry(args.video), processor.video_processor.patch_size)
        inputs = processor.video_processor(videos=[sampled.resized("cuda")], do_resize=False,
                                           do_sample_frames=False, return_tensors="pt", device="cuda")
        videos[f"file, {frames} frames"] = (pixels_for(model, dict(inputs))["pixel_values_videos"],
                                            inputs["video_grid_thw"].cuda())
    for tokens in args.synthetic:
        inputs = synthetic_request(VideoQA(model, processor, mask_layers=(), warmup=False), tokens).inputs
        videos[f"synthetic, {tokens} tokens"] = (inputs["pixel_values_videos"], inputs["video_grid_thw"])

    peaks = []

    def forward(video):
        x, grid = videos[video]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.inference_mode():
            out = visual(x, grid_thw=grid)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        return time.perf_counter() - start, out.pooler_output if hasattr(out, "pooler_output") else out

    vision.VARLEN_FLASH = vision.FUSED_WINDOWS = False
    vision.fuse_block_adds(model, enabled=False)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        forward(max(videos, key=lambda video: videos[video][0].shape[0]))
    rows, outputs = [], {}
    for name, (varlen, windows, adds, accumulate, backend) in KERNELS.items():
        if name not in args.kernels:
            continue
        vision.VARLEN_FLASH, vision.FUSED_WINDOWS, vision.ACCUMULATE_MLP = varlen, windows, accumulate
        vision.fuse_block_adds(model, enabled=adds)
        for video in videos:
            with sdpa_kernel([backend]) if backend else contextlib.nullcontext():
                first, out = forward(video)
                second = statistics.median(forward(video)[0] for _ in range(args.repeats))
            outputs[name, video] = out.cpu()  # not held on the GPU through the next rows' peaks
            rows.append({"backend": name, "video": video, "tokens": videos[video][0].shape[0],
                         "first": first, "second": second, "peak": peaks[-1]})
            print(rows[-1], flush=True)
    for row in rows:
        out, ref = outputs[row["backend"], row["video"]].float(), outputs["SDPA cuDNN", row["video"]].float()
        row["diff"] = ((out - ref).norm() / ref.norm()).item()
    print(markdown_table(rows, [("attention kernel", "backend", ""), ("video", "video", ""),
                                ("patch tokens", "tokens", "d"), ("first call s", "first", ".3f"),
                                ("second call s", "second", ".3f"), ("peak allocated GiB", "peak", ".2f"),
                                ("relative L2 difference from SDPA cuDNN", "diff", ".2e")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
