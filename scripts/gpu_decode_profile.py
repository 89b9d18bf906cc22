"""On the GPU machine: where the time before the model goes for a long video file.

`python3 scripts/gpu_decode_profile.py VIDEO [--fps 2] [--max-pixels 200704] [--read-threads 1 2 4 ...]
[--no-model] [--out DIR]`: times reading the sampled frames on each number of threads
(`read_frames`, checked equal to one thread's); reads the frames qwen-vl-utils samples from VIDEO
(`VideoQA.decode`, timed); times their resize on the CPU (qwen-vl-utils' result) and on the GPU,
with the difference; then the resize and the video processor together on the CPU and on the GPU
(`VideoQA.prepare_decoded`, `processor_on_gpu`), with the difference of the pixel values; the
prompt's tokenization with and without the placeholder's runs collapsed; and,
unless --no-model, whole requests from the file (decoding included) with the
Qwen2.5-VL-7B-architecture model (random bf16 weights), dense and FlashPrefill at a fixed 5%
(benchmark only), frames prepared on the CPU and on the GPU. A development script (results go to
BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch


def timed(fn, sync=False):
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video")
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--max-pixels", type=int, default=448 * 448)
    parser.add_argument("--max-frames", type=int, default=2048)
    parser.add_argument("--read-threads", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    parser.add_argument("--no-model", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    from kernels import FlashPrefillConfig
    from videoprefill.bench import build_7b, markdown_table, warm_up
    from videoprefill.pipeline import VideoQA
    from videoprefill.tokens import collapsed_runs
    from videoprefill.video import Sampling, read_frames, read_threads

    sampling = Sampling(fps=args.fps, max_frames=args.max_frames, max_pixels=args.max_pixels,
                        total_pixels=args.max_frames * args.max_pixels)
    result: dict = {"video": args.video, "threads": torch.get_num_threads(), "read_threads_default": read_threads()}
    entry = sampling.video_entry(args.video)
    one = read_frames(entry, 14, threads=1).raw  # also warms the file cache
    result["read_s"] = {}
    for threads in args.read_threads:  # twice each, alternating, the faster kept
        result["read_s"][threads] = float("inf")
    for _ in range(2):
        for threads in args.read_threads:
            frames, seconds = timed(lambda: read_frames(entry, 14, threads=threads).raw)  # noqa: B023
            assert torch.equal(frames, one), f"{threads} threads read different frames"
            result["read_s"][threads] = min(result["read_s"][threads], seconds)
    del one, frames
    print(markdown_table([{"threads": k, "read_s": v} for k, v in result["read_s"].items()],
                         [("threads", "threads", ""), ("read s", "read_s", ".3f")]), flush=True)
    model, processor = build_7b()
    qa = VideoQA(model, processor, mask_layers=(), warmup=False)  # warmed explicitly below
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    warm_up(qa)
    decoded = qa.decode(args.video, sampling)  # warm: file cache, decord, qwen-vl-utils
    decoded = qa.decode(args.video, sampling)
    sampled = decoded.sampled
    result["decode_s"] = decoded.decode_s  # probe + read the sampled frames (decord)
    result["raw_frames"], result["resized_to"] = list(sampled.raw.shape), list(sampled.size)
    cpu, result["resize_cpu_s"] = timed(sampled.resized)
    sampled.resized("cuda")
    gpu, result["resize_gpu_s_with_copy"] = timed(lambda: sampled.resized("cuda"), sync=True)
    diff = (gpu.cpu() - cpu).abs()
    result["resize_gpu_vs_cpu"] = {"max": diff.max().item(), "mean": diff.mean().item(),
                                   "fraction_differing": (diff > 0).float().mean().item()}
    del gpu, cpu, diff
    # Resize + processor on the CPU and on the GPU (prepare_decoded; a fresh DecodedVideo each
    # time, so the resize is not reused).
    times, pixels = {}, {}
    for on_gpu in (False, True, False, True):  # each twice, the second timed
        qa.processor_on_gpu = on_gpu
        fresh = dataclasses.replace(decoded, _resized_on_cpu=None)
        prepared = qa.prepare_decoded(fresh, "Describe this video.", count_decode=False)
        times[on_gpu] = prepared.decode_s
        pixels[on_gpu] = prepared.inputs["pixel_values_videos"].float()
    result["resize_and_processor_cpu_s"], result["resize_and_processor_gpu_s"] = times[False], times[True]
    result["pixel_values_gpu_vs_cpu_max_abs"] = (pixels[True] - pixels[False]).abs().max().item()
    result["video_tokens"] = prepared.tokens["video"]
    del pixels
    # The prompt's tokenization: the processor's expanded text tokenized as it is, and with the
    # video placeholder's runs tokenized once (`videoprefill.tokens`, as prepare_decoded does).
    token = qa.processor.video_token
    text = [qa.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe this video."}]}],
        tokenize=False, add_generation_prompt=True).replace(token, token * result["video_tokens"])]
    ids = {}
    for collapsed in (False, True, False, True):  # each twice, the second timed
        with collapsed_runs(qa.processor) if collapsed else contextlib.nullcontext():
            ids[collapsed], result[f"tokenize_{'collapsed' if collapsed else 'stock'}_s"] = timed(
                lambda: qa.processor.tokenizer(text, return_tensors="pt", padding_side="left")["input_ids"])
    assert torch.equal(ids[False], ids[True]), "collapsed runs gave other ids"
    print(json.dumps(result, indent=1), flush=True)
    if not args.no_model:
        rows = []
        for mode in ("dense", "sparse"):  # first calls at this length (cuDNN plans, autotuning) untimed
            qa.run(prepared, mode, max_new_tokens=2, config=config, fixed_density=0.05 if mode == "sparse" else None)
        for on_gpu in (False, True):
            qa.processor_on_gpu = on_gpu
            for mode, fixed in (("dense", None), ("sparse", 0.05)):
                prepared = qa.prepare(args.video, "Describe this video.", sampling)
                answer = qa.run(prepared, mode, max_new_tokens=2, config=config, fixed_density=fixed)
                t = answer.timings
                rows.append({"frames_prepared_on": "GPU" if on_gpu else "CPU", "attention": mode if fixed is None
                             else "sparse, fixed 5% (benchmark only)", "density": answer.sparsity["density"], **t})
                print(rows[-1], flush=True)
        result["requests"] = rows
        print(markdown_table(rows, [("resize + processor", "frames_prepared_on", ""), ("attention", "attention", ""),
                                    ("density", "density", ".1%"), ("decode video s", "decode_video_s", ".2f"),
                                    ("vision s", "vision_s", ".2f"), ("LLM prefill s", "prefill_s", ".2f"),
                                    ("TTFT s", "ttft_s", ".2f")]))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "decode.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
