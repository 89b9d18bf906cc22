"""A short query in the last full blocks (a question over a cached prefix, sparse mode) as dense attention
(`kernels.flash_prefill.api.FULL_ROWS_DENSE`) against the pattern stage and the sparse kernels.

Part 1, one attention call of the Qwen2.5-VL-7B shape (bf16, 28 query / 4 KV heads, head dim 128):
`flash_prefill` with the model's preset over KEYS keys for QUERIES queries, each way, GPU time (median
of `triton.testing.do_bench`) and the largest difference between the two outputs.
Part 2, the pipeline on the 7B architecture (random bf16 weights, `videoprefill.bench.build_7b`): a
first sparse question about a synthetic video of `--video-tokens` (FlashPrefill's own selection, no
fixed density), then `--rounds` later questions over its kept prefix with the ways alternated: TTFT
and LLM prefill, medians.

    PYTHONPATH=$PWD python3 scripts/gpu_full_rows.py [--keys 16384 65536 131056 131072] [--queries 16 100 200]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton

from kernels import FlashPrefillConfig, flash_prefill
from kernels.flash_prefill import api
from videoprefill.bench import build_7b, markdown_table, synthetic_request, warm_up


def random_calls(keys: list[int], queries: list[int]):
    """(keys, queries, q, k, v) of the 7B attention shape in bf16, random, for each count of each."""
    for tk in keys:
        k = torch.randn(1, tk, 4, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        for tq in queries:
            yield tk, tq, torch.randn(1, tq, 28, 128, device="cuda", dtype=torch.bfloat16), k, v


def calls(keys: list[int], queries: list[int]) -> list[dict]:
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    rows = []
    for tk, tq, q, k, v in random_calls(keys, queries):
        row, outs = {"keys": tk, "queries": tq, "full": str(config.keeps_every_block(tq, tk))}, {}
        for way in (False, True):
            api.FULL_ROWS_DENSE = way
            outs[way] = flash_prefill(q, k, v, config=config)
            row["dense" if way else "pattern"] = 1e3 * triton.testing.do_bench(
                lambda q=q, k=k, v=v: flash_prefill(q, k, v, config=config), warmup=20, rep=200)
        row["diff"] = float((outs[True].float() - outs[False].float()).abs().max())
        row["ratio"] = row["pattern"] / row["dense"]
        rows.append(row)
        print(row, flush=True)
    api.FULL_ROWS_DENSE = True
    return rows


def seven_b_qa():
    """A VideoQA on the 7B architecture (random bf16 weights), no masks recorded, warmed up."""
    from videoprefill.pipeline import VideoQA

    model, processor = build_7b()
    qa = VideoQA(model, processor, mask_layers=(), warmup=False)
    warm_up(qa)
    return qa


def later_questions(video_tokens: list[int], rounds: int, new_tokens: int, flag: str = "FULL_ROWS_DENSE",
                    labels: tuple[str, str] = ("dense call", "pattern stage + sparse kernel"),
                    questions: tuple[str, ...] = ("Describe this video.",), qa=None) -> list[dict]:
    """Later sparse questions over a kept prefix with `kernels.flash_prefill.api`'s switch `flag` on
    and off, alternated (`labels`: the two ways' names in the table), for each question; on `qa`
    (default: `seven_b_qa()`)."""
    qa = qa or seven_b_qa()
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    saved = getattr(api, flag)
    rows = []
    for tokens in video_tokens:
        qa.forget_prefix()
        for question in questions:
            prepared = synthetic_request(qa, tokens, question=question)
            first = qa.run(prepared, "sparse", max_new_tokens=new_tokens, config=config)
            print({"tokens": tokens, "first question TTFT s": first.timings["ttft_s"],
                   "density": first.sparsity["density"]}, flush=True)
            seen = {way: [] for way in (True, False)}
            texts = {way: set() for way in (True, False)}
            for r in range(rounds + 1):
                for way in (True, False):
                    setattr(api, flag, way)
                    answer = qa.run(prepared, "sparse", max_new_tokens=new_tokens, config=config)
                    assert answer.tokens["cached"] > 0
                    texts[way].add(answer.text)
                    if r:
                        seen[way].append((1e3 * answer.timings["ttft_s"], 1e3 * answer.timings["prefill_s"]))
            for way, runs in seen.items():
                rows.append({"tokens": tokens, "way": labels[0] if way else labels[1],
                             "question": prepared.tokens["total"] - prepared.prefix_len,
                             "ttft": statistics.median(t for t, _ in runs),
                             "prefill": statistics.median(p for _, p in runs),
                             "same answer": str(texts[True] == texts[False])})
                print(rows[-1], flush=True)
    setattr(api, flag, saved)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[16384, 65536, 131056, 131072])
    parser.add_argument("--queries", type=int, nargs="+", default=[16, 100, 200])
    parser.add_argument("--video-tokens", type=int, nargs="+", default=[16384, 131072])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    first = calls(args.keys, args.queries)
    second = later_questions(args.video_tokens, args.rounds, args.new_tokens)
    print(markdown_table(first, [
        ("keys", "keys", "d"), ("queries", "queries", "d"), ("every block kept", "full", "s"),
        ("pattern stage + sparse kernel us", "pattern", ".1f"), ("dense call us", "dense", ".1f"),
        ("ratio", "ratio", ".2f"), ("max difference", "diff", ".2e")]))
    print(markdown_table(second, [
        ("video tokens", "tokens", "d"), ("question's attention", "way", "s"), ("question tokens", "question", "d"),
        ("TTFT ms", "ttft", ".1f"), ("LLM prefill ms", "prefill", ".1f"), ("same answers", "same answer", "s")]))


if __name__ == "__main__":
    main()
