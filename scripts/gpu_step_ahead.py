"""`generate`'s stop check a step behind (models.stop_check) on the Qwen2.5-VL-7B architecture
(random bf16 weights, `videoprefill.bench.cold_qa`), against graph decoding without it and against
transformers' decoding.

1. Whole requests of `--video-tokens` (sparse at a fixed density, benchmark only), streamed to a
   callback as the web UI streams them, the three ways alternated `--rounds` times: ms per decoding
   step over the answer, (total - TTFT) / (new tokens - 1), which holds the answer's first steps
   (a capture, or an eager step and a capture); ms per step once replaying, from the totals of `--new-tokens` and of
   `--short-tokens` new tokens; the TTFT; whether the ways chose the same token ids. Graph decoding
   captures an answer's first step once the model has captured one (the warm-up); the way "first
   step eager" runs it as it is first, as every answer did before.
2. The host's waits for the GPU per decoding step: the synchronisations torch's sync debug mode
   reports in a request of `--new-tokens` minus those of a 5-token one, per step, each way.

A development script (results go to BENCHMARKS.md):

    PYTHONPATH=$PWD python3 scripts/gpu_step_ahead.py [--video-tokens 16384 131072] [--new-tokens 33]
"""

from __future__ import annotations

import functools
import statistics
import warnings

import torch
from gpu_graph_decode import decoding_parser, record_chosen_ids  # (this script's folder is on the path)

import models.decode as decode
import models.stop_check as stop_check
import videoprefill.pipeline as pipeline
from videoprefill.bench import cold_qa, markdown_table, synthetic_request

WAYS = {  # name -> (graph decoding, the stop check a step behind, the first step captured)
    "graph, step ahead": (True, True, True),
    "graph, step ahead, first step eager": (True, True, False),
    "graph": (True, False, True),
    "transformers": (False, False, False),
}
CAPTURED = decode._CAPTURED


class _NeverCaptured:
    """In the place of models.decode._CAPTURED: every answer's first step runs eagerly."""

    def __contains__(self, item):
        return False

    def add(self, item):
        pass

    def discard(self, item):
        pass


def use(qa, way: str) -> None:
    graphs, ahead, first = WAYS[way]
    qa.graph_decode = graphs
    pipeline.graph_decoding = functools.partial(decode.graph_decoding, ahead=ahead)
    decode._CAPTURED = CAPTURED if first else _NeverCaptured()


def syncs_per_step(qa, prepared, config, fixed: float, new_tokens: int) -> dict:
    """Synchronisations reported by torch's sync debug mode per decoding step, each way."""
    def count(n: int) -> int:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                answer = qa.run(prepared, "sparse", max_new_tokens=n, config=config, fixed_density=fixed)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert answer.new_tokens == n, "the request ended early"
        return sum("synchroniz" in str(w.message) for w in seen)

    out = {}
    for way in WAYS:
        if not WAYS[way][2] and WAYS[way][0]:
            out[way] = float("nan")  # (as the way above it)
            continue
        use(qa, way)
        count(new_tokens)  # (warm)
        out[way] = (count(new_tokens) - count(5)) / (new_tokens - 5)
    return out


def main() -> None:
    parser = decoding_parser(__doc__.splitlines()[0])
    parser.add_argument("--short-tokens", type=int, default=9)
    args = parser.parse_args()

    from kernels import FlashPrefillConfig

    checks, chosen = [], {}

    class Counted(stop_check.StepAheadStopCheck):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            checks.append(self)

    stop_check.StepAheadStopCheck = Counted
    record_chosen_ids(chosen)  # (the token ids each request chose)

    qa = cold_qa()
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    rows = []
    for tokens in args.video_tokens:
        prepared = synthetic_request(qa, tokens)
        steps, steady, ttft = ({way: [] for way in WAYS} for _ in range(3))
        ids, reads = {}, []

        def request(n: int, prepared=prepared):
            streamed = []
            answer = qa.run(prepared, "sparse", max_new_tokens=n, config=config, fixed_density=args.fixed_density,
                            on_text=lambda text, _: streamed.append(text))
            assert answer.new_tokens == n and streamed, "the request ended early"
            return answer.timings

        for r in range(args.rounds + 1):  # (round 0 untimed)
            for way in WAYS:
                use(qa, way)
                checks.clear()
                t = request(args.new_tokens)
                ids[way] = chosen["ids"]
                if WAYS[way][1]:
                    reads.append(checks[-1].reads if checks else -1)
                short = request(args.short_tokens)
                if r:
                    steps[way].append(1e3 * (t["total_s"] - t["ttft_s"]) / (args.new_tokens - 1))
                    steady[way].append(1e3 * ((t["total_s"] - t["ttft_s"]) - (short["total_s"] - short["ttft_s"]))
                                       / (args.new_tokens - args.short_tokens))
                    ttft[way].append(t["ttft_s"])
        syncs = syncs_per_step(qa, prepared, config, args.fixed_density, args.new_tokens)
        for way in WAYS:
            rows.append({"tokens": tokens, "way": way, "new": args.new_tokens,
                         "ms": statistics.median(steps[way]), "all": ", ".join(f"{v:.2f}" for v in steps[way]),
                         "steady": statistics.median(steady[way]),
                         "steady_all": ", ".join(f"{v:.2f}" for v in steady[way]),
                         "ttft": statistics.median(ttft[way]), "same": str(ids[way] == ids["graph"]),
                         "syncs": syncs[way], "reads": str(max(reads)) if WAYS[way][1] else "-"})
            print(rows[-1], flush=True)
    use(qa, "graph, step ahead")
    print(markdown_table(rows, [
        ("video tokens", "tokens", "d"), ("way", "way", "s"), ("new tokens", "new", "d"),
        ("ms/step (median)", "ms", ".2f"), ("ms/step (rounds)", "all", "s"),
        ("ms/step replaying (median)", "steady", ".2f"), ("ms/step replaying (rounds)", "steady_all", "s"),
        ("TTFT s", "ttft", ".3f"),
        ("ids as graph", "same", "s"), ("host syncs per step", "syncs", ".2f"), ("steps read late", "reads", "s"),
    ]))


if __name__ == "__main__":
    main()
