"""A question's attention over a long cached prefix: the two switches of the thirty-fourth session,
`api.SPLIT_KV_SHORT_QUERIES` (kernels.short_query_attention) and `api.SPLIT_FULL_ROWS`, each timed
against what runs without it.

Part 1, the dense call: one attention call of the Qwen2.5-VL-7B shape (bf16, 28 query / 4 KV heads,
head dim 128) for QUERIES queries over KEYS keys, `kernels.short_query_attention` at each launch
setting in `--settings` (block_m / block_n / programs per SM / warps / stages) against PyTorch's
flash-attention kernel (`dense_flash`, what `dense_attention` runs without the switch): GPU time
(median of `triton.testing.do_bench`) and the largest difference between the outputs. The floor
column is the larger of reading the keys and values once at 4.8 TB/s and the matmuls at 700 TFLOPS.
The setting "default" is the kernel's own choice. Then the host's time to enqueue one call of each
(16 queries over `--keys`' first count, the GPU left to run behind).

Part 2, a question longer than the last full blocks: `flash_prefill` with the model's preset for
`--long-queries` queries after each of `--prefixes` keys (off the block grid), on `kernels.testing`'s
structured inputs (FlashPrefill's own selection, a few percent kept) and on random ones (nearly
every block kept), with `SPLIT_FULL_ROWS` off, on (on one stream and on two), and on with
`SPLIT_KV_SHORT_QUERIES` too.

Part 3 (unless --no-pipeline), the pipeline on the 7B architecture (random weights: nearly every
block kept; scripts/gpu_full_rows.py's `later_questions`): later questions with SPLIT_KV_SHORT_QUERIES
on and off alternated (SPLIT_KV_MIN_WORK set to `--min-work`, default 0: the switch's own effect at
every prefix), TTFT and LLM prefill.

    PYTHONPATH=$PWD python3 scripts/gpu_short_query.py [--keys 16384 65536 131072] [--queries 16 64 128 256]
        [--long-queries 150 300] [--prefixes 16368 131056] [--no-split] [--video-tokens 16384 131072]
        [--min-work 0] [--rounds 4] [--no-pipeline] [--json F]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from kernels import FlashPrefillConfig, flash_prefill
from kernels.flash_prefill import api
from kernels.flash_prefill.api import dense_flash
from kernels.short_query_attention import short_query_attention
from kernels.testing import structured_qkv
from scripts.gpu_full_rows import later_questions, random_calls, seven_b_qa
from scripts.gpu_host_profile import host_us
from videoprefill.bench import markdown_table

# block_m / block_n / programs per SM / warps / stages: the default first; each compiles for sm_90 without
# spills (scripts/sm90_resources.py --short-query), where 128/64 with 4 warps and 128/128 or 64/128 spill.
SETTINGS = ["default", "128/64/1/8/3", "128/64/2/8/3", "128/64/4/8/3", "128/64/8/8/3", "64/64/4/4/3",
            "64/64/8/4/3"]
# About 150 tokens with the locally built tokenizer: past the last full blocks of a prefix off the grid.
MULTIPLE_CHOICE = ("Which of these best describes what happens in the video? A. A person walks a dog along a "
                   "beach at sunset. B. Two people cook a meal in a small kitchen. C. A car drives through a city "
                   "at night in the rain. D. Children play football in a park. Answer with the option's letter.")
SCALE = 128**-0.5


def floor_us(tq: int, tk: int) -> float:
    read = 2 * tk * 4 * 128 * 2 / 4.8e12
    flops = 4 * tq * 28 * tk * 128 / 700e12
    return 1e6 * max(read, flops)


def timed(fn) -> float:
    """Microseconds of GPU time, the median of `triton.testing.do_bench`."""
    return 1e3 * triton.testing.do_bench(fn, warmup=20, rep=200)


def dense_calls(keys: list[int], queries: list[int], settings: list[str]) -> list[dict]:
    rows = []
    for tk, tq, q, k, v in random_calls(keys, queries):
        want = dense_flash(q, k, v, SCALE)
        row = {"keys": tk, "queries": tq, "floor us": floor_us(tq, tk),
               "flash us": timed(lambda q=q, k=k, v=v: dense_flash(q, k, v, SCALE))}
        for setting in settings:
            tuning = {}
            if setting != "default":
                bm, bn, pps, warps, stages = (int(x) for x in setting.split("/"))
                tuning = dict(block_m=bm, block_n=bn, programs_per_sm=pps, num_warps=warps, num_stages=stages)
            out = short_query_attention(q, k, v, SCALE, **tuning)
            row[f"{setting} diff"] = float((out.float() - want.float()).abs().max())
            row[f"{setting} us"] = timed(lambda q=q, k=k, v=v, t=tuning: short_query_attention(q, k, v, SCALE, **t))
        best = min(settings, key=lambda s: row[f"{s} us"])
        row["best"], row["speed-up"] = best, row["flash us"] / row[f"{best} us"]
        rows.append(row)
        print(row, flush=True)
    return rows


def host_times(tk: int) -> dict:
    _, tq, q, k, v = next(random_calls([tk], [16]))
    row = {"keys": tk, "queries": tq, "dense_flash host us": host_us(lambda: dense_flash(q, k, v, SCALE)),
           "short_query_attention host us": host_us(lambda: short_query_attention(q, k, v, SCALE))}
    print(row, flush=True)
    return row


# SPLIT_FULL_ROWS, FULL_ROWS_ON_TWO_STREAMS, SPLIT_KV_SHORT_QUERIES
WAYS = {"one call": (False, True, False), "apart, one stream": (True, False, False),
        "apart, two streams": (True, True, False), "apart, two streams, split-KV": (True, True, True)}


def set_switches(apart: bool, streams: bool, split_kv: bool) -> None:
    api.SPLIT_FULL_ROWS, api.FULL_ROWS_ON_TWO_STREAMS, api.SPLIT_KV_SHORT_QUERIES = apart, streams, split_kv


def split_calls(prefixes: list[int], queries: list[int]) -> list[dict]:
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    rows = []
    for prefix in prefixes:
        for tq in queries:
            tk = prefix + tq
            for inputs in ("structured", "random"):
                if inputs == "structured":
                    q, k, v = structured_qkv(1, tq, tk, 28, 4, 128, config.block_size, dtype=torch.bfloat16,
                                             device="cuda")
                else:
                    q = torch.randn(1, tq, 28, 128, device="cuda", dtype=torch.bfloat16)
                    k, v = (torch.randn(1, tk, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
                row = {"keys": tk, "queries": tq, "inputs": inputs, "full rows": config.full_rows(tq, tk)}
                outs = {}
                for way, (apart, streams, split_kv) in WAYS.items():
                    set_switches(apart, streams, split_kv)
                    outs[way], pattern = flash_prefill(q, k, v, config=config, return_pattern=True)
                    row[f"{way} us"] = timed(lambda q=q, k=k, v=v: flash_prefill(q, k, v, config=config))
                    row["density"] = pattern.density()
                row["diff"] = max(float((o.float() - outs["one call"].float()).abs().max()) for o in outs.values())
                rows.append(row)
                print(row, flush=True)
    set_switches(*WAYS["one call"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[16384, 65536, 131072])
    parser.add_argument("--queries", type=int, nargs="+", default=[16, 64, 128, 256])
    parser.add_argument("--settings", nargs="+", default=SETTINGS)
    parser.add_argument("--long-queries", type=int, nargs="+", default=[150, 300])
    parser.add_argument("--prefixes", type=int, nargs="+", default=[16368, 131056])
    parser.add_argument("--video-tokens", type=int, nargs="+", default=[16384, 131072])
    parser.add_argument("--no-split", action="store_true", help="leave part 2 out")
    parser.add_argument("--min-work", type=int, default=0, help="SPLIT_KV_MIN_WORK in part 3")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-pipeline", action="store_true", help="time the attention calls only")
    parser.add_argument("--json", default=None, help="write every row here")
    args = parser.parse_args()
    dense = dense_calls(args.keys, args.queries, args.settings)
    host = host_times(args.keys[0])
    split = [] if args.no_split else split_calls(args.prefixes, args.long_queries)
    later = []
    if not args.no_pipeline:
        api.SPLIT_KV_MIN_WORK = args.min_work
        later = later_questions(args.video_tokens, args.rounds, 8, flag="SPLIT_KV_SHORT_QUERIES",
                                labels=("short_query_attention", "dense_flash"),
                                questions=("Describe this video.", MULTIPLE_CHOICE), qa=seven_b_qa())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense calls": dense, "host": host, "split calls": split, "later questions": later}, f,
                      indent=1)
    columns = [("keys", "keys", "d"), ("queries", "queries", "d"), ("floor us", "floor us", ".0f"),
               ("flash us", "flash us", ".0f"), ("best setting", "best", "s"), ("speed-up", "speed-up", ".2f")]
    columns += [(f"{s} us", f"{s} us", ".0f") for s in args.settings]
    columns += [(f"{s} diff", f"{s} diff", ".1e") for s in args.settings]
    print(markdown_table(dense, columns))
    print(markdown_table([host], [("keys", "keys", "d"), ("queries", "queries", "d")] + [
        (key, key, ".1f") for key in ("dense_flash host us", "short_query_attention host us")]))
    if split:
        print(markdown_table(split, [("keys", "keys", "d"), ("queries", "queries", "d"), ("inputs", "inputs", "s"),
                                     ("full rows", "full rows", "d"), ("density", "density", ".3f")]
                             + [(f"{w} us", f"{w} us", ".0f") for w in WAYS] + [("max difference", "diff", ".1e")]))
    if later:
        print(markdown_table(later, [
            ("video tokens", "tokens", "d"), ("question's attention", "way", "s"), ("question tokens", "question", "d"),
            ("TTFT ms", "ttft", ".1f"), ("LLM prefill ms", "prefill", ".1f"), ("same answers", "same answer", "s")]))


if __name__ == "__main__":
    main()
