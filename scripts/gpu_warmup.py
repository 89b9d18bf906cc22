"""The first requests of a process, warmed on the bundled sample ("sample", as kept: `VideoQA.warm_up`
before decoding, as `ask` does) against warmed on the request itself ("request", as before: its
prefill run once untimed with one new token, after decoding). Each way in fresh processes, by
default in the order sample, request, sample (`--processes`; the first fills Triton's cache on
disk): the Qwen2.5-VL-7B architecture (random bf16 weights) asked about VIDEO at a fixed density
in sparse mode, then dense, then both again (steady state; no prefix kept). Per request: the wall
time from the call to the answer, warm-up included, the warm-up's part and the request's own
timings.

    PYTHONPATH=$PWD python3 scripts/gpu_warmup.py VIDEO --max-pixels 200704 --fixed-density 0.05
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from videoprefill.bench import add_file_arguments, file_sampling


def child(args) -> None:
    from kernels import FlashPrefillConfig
    from models.attention import request_settings
    from videoprefill.bench import build_7b
    from videoprefill.pipeline import VideoQA

    model, processor = build_7b()
    qa = VideoQA(model, processor, mask_layers=(), warmup=args.way == "sample")
    qa.prefix_cache = False
    sampling = file_sampling(args)
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    warmed = set()
    for n, (mode, fixed) in enumerate((("sparse", args.fixed_density), ("dense", None)) * 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        warm_s = 0.0
        if args.way == "sample":
            qa.warm_up(mode, config, fixed_density=fixed)
            torch.cuda.synchronize()
            warm_s = time.perf_counter() - start
        prepared = qa.prepare(args.video, "Describe this video.", sampling)
        if args.way == "request" and mode not in warmed:  # the warm-up as it was: the request itself
            t0 = time.perf_counter()
            key, settings = qa._settings(mode, config, None, fixed)
            qa._use(mode)
            with torch.inference_mode(), request_settings(settings):
                qa._generate(prepared, key, None, max_new_tokens=1, one_call=False)
            torch.cuda.synchronize()
            warm_s = time.perf_counter() - t0
            warmed.add(mode)
        answer = qa.run(prepared, mode, max_new_tokens=2, config=config, fixed_density=fixed)
        torch.cuda.synchronize()
        t = answer.timings
        print(json.dumps({"way": args.way, "request": "first" if n < 2 else "steady", "mode": mode,
                          "wall": time.perf_counter() - start, "warm_up": warm_s, "decode": t["decode_video_s"],
                          "vision": t["vision_s"], "prefill": t["prefill_s"], "ttft": t["ttft_s"]}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_file_arguments(parser)
    parser.add_argument("--processes", nargs="+", choices=("sample", "request"),
                        default=["sample", "request", "sample"], help="the way each fresh process warms up, in order")
    parser.add_argument("--way", choices=("sample", "request"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        child(args)
        return 0
    from videoprefill.bench import markdown_table

    rows = []
    for process, way in enumerate(args.processes):
        argv = [args.video, "--fps", str(args.fps), "--max-frames", str(args.max_frames),
                "--max-pixels", str(args.max_pixels), "--fixed-density", str(args.fixed_density), "--way", way]
        out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
        lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        for row in lines:
            row["process"] = process + 1
            print(row, flush=True)
        rows += lines
    print(markdown_table(rows, [("process", "process", "d"), ("warm-up on", "way", ""), ("request", "request", ""),
                                ("attention", "mode", ""), ("wall s (warm-up included)", "wall", ".3f"),
                                ("warm-up s", "warm_up", ".3f"), ("decode s", "decode", ".3f"),
                                ("vision s", "vision", ".3f"), ("LLM prefill s", "prefill", ".3f"),
                                ("TTFT s", "ttft", ".3f")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
