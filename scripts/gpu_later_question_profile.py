"""On the GPU: where a later question's time to first token goes, over a kept prefix.

The 7B architecture (random bf16 weights, `scripts/gpu_full_rows.seven_b_qa`): a first sparse
question about a synthetic video of each of `--video-tokens`, then `--rounds` later questions over
its kept prefix, timed (TTFT, LLM prefill, and the rest of TTFT) two ways alternated: the
positions built from the prefix's kept ones (`videoprefill.prefix.positions_over_prefix`, "kept")
and computed over the whole prompt each time as before ("whole"). Then one more question under
cProfile, whose listing (own time and cumulative time, the top `--top` functions each) goes to the
output, and the host time of `videoprefill.prefix.prompt_positions` over the whole prompt alone.
A development script (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_later_question_profile.py [--video-tokens 16384 131072] [--rounds 4]
        [--top 30] [--json F]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch

from kernels import FlashPrefillConfig
from scripts.gpu_full_rows import seven_b_qa
from videoprefill import prefix as prefixes
from videoprefill.bench import markdown_table, synthetic_request

QUESTION = "What happens at the end of this video?"


def listing(profile: cProfile.Profile, key: str, top: int) -> str:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats(key).print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video-tokens", type=int, nargs="+", default=[16384, 131072])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    qa, config = seven_b_qa(), FlashPrefillConfig.for_model("qwen2.5-vl")
    kept = prefixes.positions_over_prefix
    ways = {"kept": kept, "whole": lambda model, inputs, length, state: prefixes.prompt_positions(model, inputs)}
    rows = []
    for tokens in args.video_tokens:
        qa.forget_prefix()
        prepared = synthetic_request(qa, tokens, question=QUESTION)
        qa.run(prepared, "sparse", max_new_tokens=2, config=config)
        runs, texts = {way: [] for way in ways}, {way: set() for way in ways}
        for _ in range(args.rounds):
            for way, fn in ways.items():
                prefixes.positions_over_prefix = fn
                answer = qa.run(prepared, "sparse", max_new_tokens=2, config=config)
                assert answer.tokens["cached"] > 0
                runs[way].append(answer.timings)
                texts[way].add(answer.text)
        prefixes.positions_over_prefix = kept
        profile = cProfile.Profile()
        profile.enable()
        qa.run(prepared, "sparse", max_new_tokens=2, config=config)
        profile.disable()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            prefixes.prompt_positions(qa.model, prepared.inputs)
        torch.cuda.synchronize()
        positions_ms = 1e3 * (time.perf_counter() - start) / 5
        for way, timings in runs.items():
            ttft = statistics.median(1e3 * t["ttft_s"] for t in timings)
            prefill = statistics.median(1e3 * t["prefill_s"] for t in timings)
            row = {"tokens": tokens, "way": way, "question": prepared.tokens["total"] - prepared.prefix_len,
                   "ttft": ttft, "prefill": prefill,
                   "first token": statistics.median(1e3 * t["first_token_s"] for t in timings), "rest": ttft - prefill,
                   "positions": positions_ms, "same answers": str(texts["kept"] == texts["whole"])}
            rows.append(row)
            print(row, flush=True)
        print(f"## {tokens} video tokens: cProfile of one later question, by own time")
        print(listing(profile, "tottime", args.top))
        print(f"## {tokens} video tokens: by cumulative time")
        print(listing(profile, "cumulative", args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown_table(rows, [
        ("video tokens", "tokens", "d"), ("positions", "way", "s"), ("question tokens", "question", "d"),
        ("TTFT ms", "ttft", ".1f"),
        ("LLM prefill ms", "prefill", ".1f"), ("first token ms", "first token", ".1f"),
        ("TTFT - prefill ms", "rest", ".1f"), ("prompt_positions alone ms", "positions", ".1f"),
        ("same answers", "same answers", "s")]))


if __name__ == "__main__":
    main()
