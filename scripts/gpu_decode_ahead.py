"""A first question about a video file, asked with its frames read ahead (`VideoQA.decode_ahead`, as
the web UI does on upload) or not, on the Qwen2.5-VL-7B architecture (random bf16 weights).

    PYTHONPATH=$PWD python3 scripts/gpu_decode_ahead.py VIDEO --max-pixels 200704 --fixed-density 0.05

One untimed request first (compiles and warms the model and the decode path). Then, alternating,
--repeats times each: the question with nothing read ahead, and the question asked --typing seconds
after `decode_ahead`. Every request computes the video's prefix (no kept prefix between them).
"""

from __future__ import annotations

import argparse
import time

from videoprefill.bench import add_file_arguments, file_sampling


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_file_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--typing", type=float, default=3.0, help="seconds between the upload and the question")
    args = parser.parse_args()

    from kernels import FlashPrefillConfig
    from videoprefill.bench import build_7b, markdown_table
    from videoprefill.pipeline import VideoQA

    model, processor = build_7b()
    qa = VideoQA(model, processor, mask_layers=(), warmup=True)
    sampling = file_sampling(args)
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    question = "Describe this video."

    def ask(ahead: bool) -> dict:
        qa.forget_prefix()
        if ahead:
            qa.decode_ahead(args.video, sampling)
            time.sleep(args.typing)
        answer = qa.run(qa.prepare(args.video, question, sampling), "sparse", max_new_tokens=2, config=config,
                        fixed_density=args.fixed_density)
        t = answer.timings
        return {"frames": "read ahead" if ahead else "read by the question", "video tokens": answer.tokens["video"],
                "ahead": t["decoded_ahead_s"], "decode": t["decode_video_s"], "vision": t["vision_s"],
                "prefill": t["prefill_s"], "ttft": t["ttft_s"]}

    ask(False)  # untimed
    rows = []
    for _ in range(args.repeats):
        for ahead in (False, True):
            rows.append(ask(ahead))
            print(rows[-1], flush=True)
    print(f"sparse, fixed {args.fixed_density:.0%} (benchmark only); {args.typing:.0f} s between upload and question")
    print(markdown_table(rows, [("frames", "frames", ""), ("video tokens", "video tokens", ""),
                                ("read ahead s", "ahead", ".3f"), ("decode video s", "decode", ".3f"),
                                ("vision s", "vision", ".3f"), ("LLM prefill s", "prefill", ".3f"),
                                ("TTFT s", "ttft", ".3f")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
