"""An answer streamed while it is generated (`VideoQA.run(on_text=...)`, the web UI's answer box,
through `app.ui.streamed`'s thread) against the same request unstreamed, on the Qwen2.5-VL-7B
architecture (random bf16 weights: every answer runs to --max-new-tokens).

    PYTHONPATH=$PWD python3 scripts/gpu_streamed.py VIDEO --max-pixels 200704 --max-frames 1040 \
        --fixed-density 0.05

One untimed request first. Then --rounds alternations of the two ways on a cold sparse request
(its prefix computed): TTFT and total time as the pipeline reports them, the time a decoding step
took after the first token, and for the streamed way when its first text reached the caller's
thread (from the request, as TTFT counts) and how many texts it got.
"""

from __future__ import annotations

import argparse
import statistics
import time

from videoprefill.bench import add_file_arguments, file_sampling


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_file_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    from app.ui import streamed
    from kernels import FlashPrefillConfig
    from videoprefill.bench import build_7b, markdown_table
    from videoprefill.pipeline import VideoQA

    model, processor = build_7b()
    qa = VideoQA(model, processor, mask_layers=(), warmup=True)
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    prepared = qa.prepare(args.video, "Describe this video.", file_sampling(args))
    request = dict(prepared=prepared, attention="sparse", max_new_tokens=args.max_new_tokens, config=config,
                   fixed_density=args.fixed_density, reuse_prefix=False)
    qa.run(**request)  # untimed
    rows = []
    for round_ in range(args.rounds):
        for way in ("plain", "streamed"):
            start = time.perf_counter()
            texts, first_seen = 0, None
            if way == "plain":
                answer = qa.run(**request)
            else:
                stream = streamed(qa.run, **request)
                while True:
                    try:
                        next(stream)
                    except StopIteration as done:
                        answer = done.value
                        break
                    texts += 1
                    if first_seen is None:
                        first_seen = prepared.decode_s + time.perf_counter() - start
            t = answer.timings
            rows.append({"round": round_ + 1, "way": way, "video tokens": answer.tokens["video"],
                         "new tokens": answer.new_tokens, "ttft": t["ttft_s"], "total": t["total_s"],
                         "step ms": (t["total_s"] - t["ttft_s"]) / max(answer.new_tokens - 1, 1) * 1000,
                         "first text": first_seen if first_seen is not None else float("nan"), "texts": texts})
            print(rows[-1], flush=True)
    columns = [("round", "round", ""), ("way", "way", ""), ("video tokens", "video tokens", ""),
               ("new tokens", "new tokens", ""), ("TTFT s", "ttft", ".3f"), ("total s", "total", ".3f"),
               ("decoding step ms", "step ms", ".2f"), ("first text at s", "first text", ".3f"),
               ("texts", "texts", "")]
    print(markdown_table(rows, columns))
    for way in ("plain", "streamed"):
        mine = [r for r in rows if r["way"] == way]
        print(f"{way}: median TTFT {statistics.median(r['ttft'] for r in mine):.3f} s, median step "
              f"{statistics.median(r['step ms'] for r in mine):.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
