"""Where the time of the vision encoder in pieces goes, with the frames already read: the resize,
the video processor and the vision tower over the whole video, and over pieces of N frames (one
stream and two), host time and wall time; on the Qwen2.5-VL-7B architecture (random bf16 weights).

    PYTHONPATH=$PWD python3 scripts/gpu_stream_pieces.py VIDEO --max-pixels 200704
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video")
    parser.add_argument("--max-pixels", type=int, default=448 * 448)
    parser.add_argument("--pieces", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--read-threads", type=int, nargs="+", default=[4, 8, 15])
    args = parser.parse_args()

    from videoprefill.bench import build_7b, markdown_table
    from videoprefill.video import Sampling, read_frames

    model, processor = build_7b()
    vp = processor.video_processor
    visual = model.model.visual
    sampling = Sampling(fps=2.0, max_frames=2048, max_pixels=args.max_pixels, total_pixels=2048 * args.max_pixels)
    sampled = read_frames(sampling.video_entry(args.video), vp.patch_size)
    raw = sampled.raw
    n = raw.shape[0]
    kw = {"do_resize": False, "do_sample_frames": False, "return_tensors": "pt", "device": "cuda"}

    def piece_work(frames_raw, times):
        t0 = time.perf_counter()
        x = frames_raw.pin_memory().to("cuda", non_blocking=True)
        frames = sampled.__class__(x, sampled.size, sampled.metadata, sampled.sample_fps).resized()
        t1 = time.perf_counter()
        px = vp(videos=[frames], **kw)
        t2 = time.perf_counter()
        out = visual(px["pixel_values_videos"].to(dtype=visual.dtype), grid_thw=px["video_grid_thw"].to("cuda"))
        t3 = time.perf_counter()
        times["resize"] += t1 - t0
        times["processor"] += t2 - t1
        times["tower"] += t3 - t2
        return out

    rows = []

    @torch.inference_mode()
    def run(label, piece, streams):
        best = None
        for _ in range(3):
            times = {"resize": 0.0, "processor": 0.0, "tower": 0.0}
            ss = [torch.cuda.Stream() for _ in range(streams)] if streams > 1 else []
            torch.cuda.synchronize()
            start = time.perf_counter()
            outs = []
            for k, a in enumerate(range(0, n, piece)):
                ctx = torch.cuda.stream(ss[k % len(ss)]) if ss else contextlib.nullcontext()
                with ctx:
                    outs.append(piece_work(raw[a:a + piece], times))
            host = time.perf_counter() - start
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
            row = {"way": label, "pieces": -(-n // piece), "wall": wall, "host": host, **times}
            if best is None or wall < best["wall"]:
                best = row
            del outs
        rows.append(best)
        print(best, flush=True)

    run("whole video", n, 1)
    for piece in args.pieces:
        run(f"pieces of {piece}, one stream", piece, 1)
        run(f"pieces of {piece}, two streams", piece, 2)
    from videoprefill import streaming
    from videoprefill.video import plan_frames

    for threads in args.read_threads:
        for piece in args.pieces:
            best = None
            for _ in range(2):
                torch.cuda.synchronize()
                start = time.perf_counter()
                plan = plan_frames(sampling.video_entry(args.video), vp.patch_size)
                _, vision = streaming.encode_while_reading(model, processor, plan, threads, torch.device("cuda"),
                                                           {"device": "cuda"}, piece=piece)
                torch.cuda.synchronize()
                wall = time.perf_counter() - start
                row = {"way": f"while reading, {threads} threads, pieces of {piece}", "pieces": -(-n // piece),
                       "wall": wall, "host": vision.seconds, "resize": 0.0, "processor": 0.0, "tower": 0.0}
                if best is None or wall < best["wall"]:
                    best = row
            rows.append(best)
            print(best, flush=True)
    print("while reading: 'host s' is the vision window (first piece's start to last piece's end)")
    print(markdown_table(rows, [("way", "way", ""), ("pieces", "pieces", "d"), ("wall s", "wall", ".3f"),
                                ("host s", "host", ".3f"), ("resize host s", "resize", ".3f"),
                                ("processor host s", "processor", ".3f"), ("tower host s", "tower", ".3f")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
