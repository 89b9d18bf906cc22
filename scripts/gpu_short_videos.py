"""First questions about short videos, whose prompts fall under FlashPrefill's `min_seq_len` so that
the sparse mode runs them dense: that dense attention as the Hopper kernel over every causal block
(`kernels.flash_prefill.api.DENSE_ON_HOPPER_KERNEL`, as kept) against SDPA (before), alternated in
one process. Synthetic requests on the Qwen2.5-VL-7B architecture (random weights,
`videoprefill.bench.cold_qa`), sparse mode, one new token: the language model's prefill and TTFT
without decoding, at prompt lengths never run before (a user's video; `--repeats` lengths, 256
video tokens apart, each run by both ways, which go first in turn: nothing of the kernel's way
depends on the length, and SDPA's cuDNN meets each length first in its own run), then each way
once more at the last length (a batch of alike videos).
A development script (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_short_videos.py [--video-tokens 1024 2048 4096]
"""

import argparse
import statistics

from kernels import FlashPrefillConfig
from kernels.flash_prefill import api
from videoprefill.bench import cold_qa, synthetic_request

WAYS = {"Hopper kernel (kept)": True, "SDPA (before)": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video-tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    qa = cold_qa()
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    print("| requested video tokens | last prompt tokens | way | lengths | LLM prefill s, each | median "
          "| TTFT s (no decode), each | median |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in args.video_tokens:
        results = {(way, where): ([], []) for way in WAYS for where in ("new", "just run")}
        for repeat in range(args.repeats):
            request = synthetic_request(qa, tokens + 256 * (repeat + 1))
            if request.tokens["total"] >= config.min_seq_len:
                raise SystemExit(f"{tokens} video tokens give a prompt over min_seq_len: ask for fewer")
            order = list(WAYS.items()) if repeat % 2 == 0 else list(WAYS.items())[::-1]
            for way, on in order:
                api.DENSE_ON_HOPPER_KERNEL = on
                answer = qa.run(request, "sparse", max_new_tokens=1, config=config)
                t = answer.timings
                results[way, "new"][0].append(t["prefill_s"])
                results[way, "new"][1].append(t["ttft_s"] - t["decode_video_s"])
        for way, on in WAYS.items():
            api.DENSE_ON_HOPPER_KERNEL = on
            answer = qa.run(request, "sparse", max_new_tokens=1, config=config)
            t = answer.timings
            results[way, "just run"][0].append(t["prefill_s"])
            results[way, "just run"][1].append(t["ttft_s"] - t["decode_video_s"])
        api.DENSE_ON_HOPPER_KERNEL = True
        for (way, where), (prefill, ttft) in results.items():
            print(f"| {tokens} | {request.tokens['total']} | {way} | {where} | "
                  f"{', '.join(f'{v:.3f}' for v in prefill)} | {statistics.median(prefill):.3f} | "
                  f"{', '.join(f'{v:.3f}' for v in ttft)} | {statistics.median(ttft):.3f} |", flush=True)


if __name__ == "__main__":
    main()
