"""The cost of prefilling in two calls (video prefix, then the question over its cache) against
one `generate` call over the whole prompt, on the Qwen2.5-VL-7B architecture (random bf16
weights; `videoprefill.bench.build_7b`).

    PYTHONPATH=$PWD python3 scripts/gpu_prefix_profile.py --video-tokens 131072 --repeats 3

Each way is timed from the prepared inputs to the first token (`max_new_tokens=1`, the GPU
synchronised), alternating, and the fastest kept; the first tokens must agree. Sparse runs at
the benchmark-only fixed density (random blocks) so the attention work is the same both ways.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video-tokens", type=int, nargs="+", default=[131072])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fixed-density", type=float, default=0.05)
    args = parser.parse_args()

    from kernels import FlashPrefillConfig
    from models.attention import RequestSettings, request_settings, set_attention
    from videoprefill.bench import cold_qa, markdown_table, synthetic_request

    qa = cold_qa()
    model, processor = qa.model, qa.processor
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    rows = []
    for tokens in args.video_tokens:
        prepared = synthetic_request(qa, tokens)
        for mode, fixed in (("sparse", args.fixed_density), ("dense", None)):
            set_attention(model, mode)
            settings = RequestSettings(config=config, fixed_density=fixed)
            key = (mode, config, 0, fixed)

            def one_call(prepared=prepared):
                return model.generate(**prepared.inputs, max_new_tokens=1, do_sample=False,
                                      pad_token_id=processor.tokenizer.pad_token_id)

            def two_calls(prepared=prepared, key=key):
                out, _ = qa._generate(prepared, key, None, 1, one_call=False)  # (always two calls)
                return out

            best = {"one call": float("inf"), "two calls": float("inf")}
            firsts = {}
            for _ in range(args.repeats):
                for name, fn in (("one call", one_call), ("two calls", two_calls)):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    with torch.inference_mode(), request_settings(settings):
                        out = fn()
                    torch.cuda.synchronize()
                    best[name] = min(best[name], time.perf_counter() - start)
                    firsts.setdefault(name, int(out[0, -1]))
            row = {"video tokens": prepared.tokens["video"], "attention": mode if fixed is None else
                   f"sparse, fixed {fixed:.0%}", "one call s": best["one call"], "two calls s": best["two calls"],
                   "two / one": best["two calls"] / best["one call"],
                   "same first token": firsts["one call"] == firsts["two calls"]}
            print(row, flush=True)
            rows.append(row)
    print(markdown_table(rows, [("video tokens", "video tokens", ""), ("attention", "attention", ""),
                                ("one call s", "one call s", ".3f"), ("two calls s", "two calls s", ".3f"),
                                ("two / one", "two / one", ".3f"), ("same first token", "same first token", "")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
