"""The compare mode's first and later question about a video file, with one KV cache of its prefix
kept (`prefix_states = 1`, as before) and with both modes' caches (2, the default), on the
Qwen2.5-VL-7B architecture (random bf16 weights).

    PYTHONPATH=$PWD python3 scripts/gpu_compare_later.py VIDEO --max-pixels 200704 --fixed-density 0.05

One untimed request per mode first. Then, per setting: the first question dense then sparse (the
compare mode's order), then a later question the same way; peak GPU memory of each request.
"""

from __future__ import annotations

import argparse

import torch

from videoprefill.bench import add_file_arguments, file_sampling


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_file_arguments(parser)
    args = parser.parse_args()

    from kernels import FlashPrefillConfig
    from videoprefill.bench import build_7b, markdown_table
    from videoprefill.pipeline import VideoQA

    model, processor = build_7b()
    qa = VideoQA(model, processor, mask_layers=(), warmup=True)
    sampling = file_sampling(args)
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    modes = (("dense", None), ("sparse", args.fixed_density))
    for mode, fixed in modes:  # untimed
        qa.forget_prefix()
        qa.run(qa.prepare(args.video, "Describe this video.", sampling), mode, 1, config, fixed_density=fixed)
    rows = []
    for states in (1, 2):
        qa.prefix_states = states
        qa.forget_prefix()
        prepared = qa.prepare(args.video, "Describe this video.", sampling)
        for n, question in enumerate(("Describe this video.", "What happens at the end?")):
            if n:
                prepared = qa.follow_up(prepared, question)
            for mode, fixed in modes:
                torch.cuda.reset_peak_memory_stats()
                answer = qa.run(prepared, mode, 2, config, fixed_density=fixed)
                t = answer.timings
                rows.append({"states": states, "question": "first" if n == 0 else "later",
                             "attention": mode if fixed is None else f"sparse, fixed {fixed:.0%}",
                             "cached": answer.tokens["cached"], "video tokens": answer.tokens["video"],
                             "decode": t["decode_video_s"], "vision": t["vision_s"], "prefill": t["prefill_s"],
                             "ttft": t["ttft_s"], "peak": torch.cuda.max_memory_allocated() / 2**30})
                print(rows[-1], flush=True)
    print(markdown_table(rows, [("caches kept", "states", ""), ("question", "question", ""),
                                ("attention", "attention", ""), ("video tokens", "video tokens", ""),
                                ("cached tokens", "cached", ""), ("decode video s", "decode", ".3f"),
                                ("vision s", "vision", ".3f"), ("LLM prefill s", "prefill", ".3f"),
                                ("TTFT s", "ttft", ".3f"), ("peak GiB", "peak", ".1f")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
