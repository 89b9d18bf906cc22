"""The pipeline's KV caches with room (models.cache: layers grow in place; graph decoding reserves the
answer in the same buffers) against transformers' concatenating cache, on the Qwen2.5-VL-7B
architecture (random bf16 weights, `videoprefill.bench.build_7b`): sparse requests of
`--video-tokens` at a fixed density (benchmark only), `--new-tokens` new tokens.

Each round asks, each way in turn (`--consecutive`: each way's rounds in a row; `--both-orders`:
both, one after the other), a first question (the video prefix computed) and `--later` later ones
over the kept prefix (the same prompt). Per answer: TTFT, the time after the first token, graph
decoding's reservation (`StepGraphs._reserve`, timed with the GPU synchronised around it), the
vision encoder's and the language model's prefill calls' time, the peak memory allocated during
the answer and the caching allocator's cudaMalloc calls in it. Medians over `--rounds` rounds
after an untimed one.

A development script (results go to BENCHMARKS.md):

    PYTHONPATH=$PWD python3 scripts/gpu_kv_room.py [--video-tokens 16384 131072] [--new-tokens 33] [--both-orders]
"""

from __future__ import annotations

import statistics

import torch
from gpu_answer_timeline import timed  # (this script's folder is on the path)
from gpu_graph_decode import decoding_parser

import models.cache as room_cache
import models.decode as decode
import videoprefill.prefix as prefixes
from videoprefill.bench import build_7b, markdown_table, synthetic_request, warm_up

WAYS = {"with room": room_cache.with_room, "concatenating": lambda cache: cache}


def main() -> None:
    parser = decoding_parser(__doc__.splitlines()[0])
    parser.add_argument("--consecutive", action="store_true", help="each way's rounds in a row, not alternated")
    parser.add_argument("--both-orders", action="store_true", help="alternated, then consecutive")
    parser.add_argument("--later", type=int, default=1, help="later questions after each first one")
    args = parser.parse_args()

    from kernels import FlashPrefillConfig
    from videoprefill.pipeline import VideoQA

    phases: dict = {}
    timed(decode.StepGraphs, "_reserve", phases)
    model, processor = build_7b()
    qa = VideoQA(model, processor, mask_layers=(), warmup=False)
    warm_up(qa)
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    rows = []
    orders = ["consecutive" if args.consecutive else "alternated"]
    if args.both_orders:
        orders = ["alternated", "consecutive"]
    for order_name in orders:
        for tokens in args.video_tokens:
            prepared = synthetic_request(qa, tokens)
            seen = {(way, question): [] for way in WAYS for question in ("first", "later")}
            if order_name == "consecutive":  # each way's rounds in a row, an untimed one first
                order = [(r, way) for way in WAYS for r in range(args.rounds + 1)]
            else:  # the ways alternated in each round, round 0 untimed
                order = [(r, way) for r in range(args.rounds + 1) for way in WAYS]
            for r, way in order:
                prefixes.with_room = WAYS[way]
                qa.forget_prefix()
                for question in ("first",) + ("later",) * args.later:
                    answer = None
                    phases.clear()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    mallocs = torch.cuda.memory_stats().get("num_device_alloc", 0)
                    answer = qa.run(prepared, "sparse", max_new_tokens=args.new_tokens, config=config,
                                    fixed_density=args.fixed_density)
                    assert answer.new_tokens == args.new_tokens, "the request ended early"
                    assert (answer.tokens["cached"] > 0) == (question == "later")
                    t = answer.timings
                    if r:
                        seen[way, question].append({
                            "ttft": 1e3 * t["ttft_s"], "after_first": 1e3 * (t["total_s"] - t["ttft_s"]),
                            "reserve": phases.get("_reserve", 0.0), "vision": 1e3 * t["vision_s"],
                            "prefill": 1e3 * t["prefill_s"], "peak": torch.cuda.max_memory_allocated() / 2**30,
                            "mallocs": torch.cuda.memory_stats().get("num_device_alloc", 0) - mallocs})
            for (way, question), runs in seen.items():
                median = {k: statistics.median(s[k] for s in runs) for k in runs[0]}
                rows.append({"order": order_name, "tokens": tokens, "way": way, "question": question, **median})
                print(rows[-1], flush=True)
    prefixes.with_room = WAYS["with room"]
    print(markdown_table(rows, [
        ("ways", "order", "s"), ("video tokens", "tokens", "d"), ("KV cache", "way", "s"),
        ("question", "question", "s"),
        ("TTFT ms", "ttft", ".1f"), ("vision ms", "vision", ".1f"), ("LLM prefill ms", "prefill", ".1f"),
        ("after the first token ms", "after_first", ".1f"),
        ("reserve ms", "reserve", ".1f"), ("peak allocated GiB", "peak", ".2f"),
        ("cudaMalloc calls", "mallocs", ".0f")]))


if __name__ == "__main__":
    main()
