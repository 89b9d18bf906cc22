"""A first and a later question about one video file, on the Qwen2.5-VL-7B architecture (random
bf16 weights), from the file to the first token: the later question reuses the video prefix.

    PYTHONPATH=$PWD python3 scripts/gpu_prefix_from_file.py VIDEO --max-pixels 200704 --fixed-density 0.05

One untimed request per mode first (compiles and warms the model, and the decode path: the
frames' resize and the video processor on the GPU, decord's readers; `--cold-decode` leaves the
decode path cold, as in a process's first request), then per mode: the first question (decoded,
vision encoder, prefix and question prefilled) and two later questions.
"""

from __future__ import annotations

import argparse

import torch

from videoprefill.bench import add_file_arguments, file_sampling


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_file_arguments(parser)
    parser.add_argument("--cold-decode", action="store_true",
                        help="no untimed request first: the first question pays the process's one-time decode costs")
    args = parser.parse_args()

    from kernels import FlashPrefillConfig
    from videoprefill.bench import build_7b, markdown_table
    from videoprefill.pipeline import VideoQA

    model, processor = build_7b()
    qa = VideoQA(model, processor, mask_layers=(), warmup=True)
    sampling = file_sampling(args)
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    questions = ("Describe this video.", "What happens at the end?", "How many people appear?")
    if not args.cold_decode:  # a whole untimed request per mode: the decode path's one-time costs too
        for mode, fixed in (("sparse", args.fixed_density), ("dense", None)):
            qa.forget_prefix()
            qa.run(qa.prepare(args.video, questions[0], sampling), mode, max_new_tokens=1, config=config,
                   fixed_density=fixed)
    rows = []
    for mode, fixed in (("sparse", args.fixed_density), ("dense", None)):
        qa.forget_prefix()
        for n, question in enumerate(questions):
            answer = qa.run(qa.prepare(args.video, question, sampling), mode, max_new_tokens=2, config=config,
                            fixed_density=fixed)
            t = answer.timings
            rows.append({"attention": mode if fixed is None else f"sparse, fixed {fixed:.0%} (benchmark only)",
                         "question": "first" if n == 0 else f"later {n}", "video tokens": answer.tokens["video"],
                         "cached": answer.tokens["cached"], "decode": t["decode_video_s"], "vision": t["vision_s"],
                         "prefill": t["prefill_s"], "ttft": t["ttft_s"],
                         "peak GiB": torch.cuda.max_memory_allocated() / 2**30})
            print(rows[-1], flush=True)
    print(markdown_table(rows, [("attention", "attention", ""), ("question", "question", ""),
                                ("video tokens", "video tokens", ""), ("cached tokens", "cached", ""),
                                ("decode video s", "decode", ".3f"), ("vision s", "vision", ".3f"),
                                ("LLM prefill s", "prefill", ".3f"), ("TTFT s", "ttft", ".3f"),
                                ("peak GiB", "peak GiB", ".1f")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
