"""Where an answer's time after its first token goes, with graph decoding, on the Qwen2.5-VL-7B
architecture (random bf16 weights, `videoprefill.bench.cold_qa`): sparse requests of
`--video-tokens` at a fixed density (benchmark only), `--new-tokens` new tokens.

The time from the first token to the request's end (`total_s - ttft_s`) holds the KV cache's
reservation (`StepGraphs._reserve`), the capture (`_capture`), the graph's release (`close`), each
timed on the host with the GPU synchronised before and after it (which adds waits), and "steps":
the rest, the replayed steps with `generate`'s own work and the cache cut back to the prefix.
Each round runs the answer twice, alternating: with the model's captured step kept from the
answer before (`decode._KEPT`, the default) and with it dropped first, so that the answer captures
its first step as it did before the step was kept ("captured").

A development script (results go to BENCHMARKS.md):

    PYTHONPATH=$PWD python3 scripts/gpu_answer_timeline.py [--video-tokens 16384 131072] [--new-tokens 33]
"""

from __future__ import annotations

import statistics
import time

import torch
from gpu_graph_decode import decoding_parser  # (this script's folder is on the path)

import models.decode as decode
from videoprefill.bench import cold_qa, markdown_table, synthetic_request


def timed(owner, name: str, phases: dict) -> None:
    """Wrap `owner.name` so that each call's wall time, synchronised around it, adds to phases[name]."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.synchronize()
            phases[name] = phases.get(name, 0.0) + 1e3 * (time.perf_counter() - start)

    setattr(owner, name, wrapper)


def profile_capture(qa, prepared, config, args) -> None:
    """One answer's capture under cProfile: the 25 functions with the most own time."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    capture = decode.StepGraphs._capture

    def profiled(self):
        profile.enable()
        try:
            return capture(self)
        finally:
            profile.disable()

    decode.StepGraphs._capture = profiled
    try:
        qa.run(prepared, "sparse", max_new_tokens=args.new_tokens, config=config, fixed_density=args.fixed_density)
    finally:
        decode.StepGraphs._capture = capture
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = decoding_parser(__doc__.splitlines()[0])
    parser.add_argument("--profile-capture", action="store_true",
                        help="also: the host's functions in one capture (cProfile), the largest own time first")
    args = parser.parse_args()

    from kernels import FlashPrefillConfig

    phases: dict = {}
    for name in ("_reserve", "_capture", "close"):
        timed(decode.StepGraphs, name, phases)
    qa = cold_qa()
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    rows = []
    for tokens in args.video_tokens:
        prepared = synthetic_request(qa, tokens)
        seen: dict = {"kept": [], "captured": []}
        for r in range(args.rounds + 1):  # (round 0 untimed)
            for way in seen:
                if way == "captured":
                    decode._KEPT.clear()
                phases.clear()
                answer = qa.run(prepared, "sparse", max_new_tokens=args.new_tokens, config=config,
                                fixed_density=args.fixed_density)
                assert answer.new_tokens == args.new_tokens, "the request ended early"
                t = answer.timings
                after_first = 1e3 * (t["total_s"] - t["ttft_s"])
                row = {"after_first": after_first, **{k.strip("_"): phases.get(k, 0.0)
                                                      for k in ("_reserve", "_capture", "close")}}
                row["steps"] = after_first - row["reserve"] - row["capture"] - row["close"]
                row["ttft"] = 1e3 * t["ttft_s"]
                if r:
                    seen[way].append(row)
        for way, runs in seen.items():
            median = {k: statistics.median(s[k] for s in runs) for k in runs[0]}
            rows.append({"tokens": tokens, "way": way, **median, "per_step": median["steps"] / (args.new_tokens - 1)})
            print(rows[-1], flush=True)
        if args.profile_capture:
            decode._KEPT.clear()
            profile_capture(qa, prepared, config, args)
    print(markdown_table(rows, [
        ("video tokens", "tokens", "d"), ("step graph", "way", "s"), ("TTFT ms", "ttft", ".1f"),
        ("after the first token ms", "after_first", ".1f"),
        ("reserve ms", "reserve", ".1f"), ("capture ms", "capture", ".1f"), ("steps ms", "steps", ".1f"),
        ("steps ms / (new tokens - 1)", "per_step", ".2f"), ("graph release ms", "close", ".1f")]))


if __name__ == "__main__":
    main()
