"""First questions about one video file with the vision encoder run after the frames are read
and while they are read (videoprefill.streaming), on the Qwen2.5-VL-7B architecture (random bf16
weights), from the file to the first token; and the read alone, in one piece per thread and in
pieces.

    PYTHONPATH=$PWD python3 scripts/gpu_stream_profile.py VIDEO --max-pixels 200704 --fixed-density 0.05

One untimed request per mode and way first; then the two ways alternate, `--repeats` times per
mode, and the fastest of each is kept.
"""

from __future__ import annotations

import argparse
import time

import torch


def _read_times(entry: dict, patch_size: int, repeats: int) -> list[dict]:
    from videoprefill import streaming
    from videoprefill.video import plan_frames, read_planned, read_threads

    threads = read_threads()
    rows = []
    for label, piece in (("one run per thread", None), (f"pieces of at most {streaming.PIECE_FRAMES}",
                                                       streaming.PIECE_FRAMES)):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            plan = plan_frames(entry, patch_size)
            read_planned(plan, threads, piece=piece, align=2)
            best = min(best, time.perf_counter() - start)
        rows.append({"read": label, "threads": threads, "seconds": best})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video")
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--max-frames", type=int, default=2048)
    parser.add_argument("--max-pixels", type=int, default=448 * 448)
    parser.add_argument("--fixed-density", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from kernels import FlashPrefillConfig
    from videoprefill.bench import build_7b, markdown_table
    from videoprefill.pipeline import VideoQA
    from videoprefill.video import Sampling

    model, processor = build_7b()
    qa = VideoQA(model, processor, mask_layers=(), warmup=True)
    sampling = Sampling(fps=args.fps, max_frames=args.max_frames, max_pixels=args.max_pixels,
                        total_pixels=args.max_frames * args.max_pixels)  # as scripts/gpu_decode_profile.py
    read_rows = _read_times(sampling.video_entry(args.video), processor.video_processor.patch_size, args.repeats)
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    from videoprefill import pipeline

    plain = pipeline.read_threads
    spared = plain() + 1  # the streamed prepare reads on one thread fewer than this
    ways = {"after reading": None, f"while reading, {plain() - 1} reading threads": plain,
            f"while reading, {plain()} reading threads": lambda: spared}
    rows = []
    for mode, fixed in (("sparse", args.fixed_density), ("dense", None)):
        label = mode if fixed is None else f"sparse, fixed {fixed:.0%} (benchmark only)"
        best: dict = {}
        for repeat in range(args.repeats + 1):  # the first round is untimed
            for way, threads in ways.items():
                qa.forget_prefix()
                qa.stream_vision = threads is not None
                pipeline.read_threads = threads or plain
                torch.cuda.reset_peak_memory_stats()
                answer = qa.run(qa.prepare(args.video, "Describe this video.", sampling), mode, max_new_tokens=2,
                                config=config, fixed_density=fixed)
                t = answer.timings
                row = {"attention": label, "vision": way,
                       "video tokens": answer.tokens["video"], "decode": t["decode_video_s"],
                       "vision_s": t["vision_s"], "prefill": t["prefill_s"], "ttft": t["ttft_s"],
                       "peak GiB": torch.cuda.max_memory_allocated() / 2**30, "answer": answer.text,
                       "repeat": repeat}
                print(row, flush=True)
                if repeat and (way not in best or row["ttft"] < best[way]["ttft"]):
                    best[way] = row
        rows += [best[way] for way in ways]
    print(markdown_table(read_rows, [("read", "read", ""), ("threads", "threads", "d"), ("s", "seconds", ".3f")]))
    print(markdown_table(rows, [("attention", "attention", ""), ("vision encoder", "vision", ""),
                                ("video tokens", "video tokens", "d"), ("decode video s", "decode", ".3f"),
                                ("vision s", "vision_s", ".3f"), ("LLM prefill s", "prefill", ".3f"),
                                ("TTFT s", "ttft", ".3f"), ("peak GiB", "peak GiB", ".2f"),
                                ("answer", "answer", "")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
