"""First questions about short videos, whose prompts fall under FlashPrefill's `min_seq_len` so that
the sparse mode runs them dense: that dense attention as the Hopper kernel over every causal block
(`kernels.flash_prefill.api.DENSE_ON_HOPPER_KERNEL`, as kept) against SDPA (before), alternated in
one process; with `--ways launches` (twenty-first session) the kept code against its Hopper kernel
launches built in full at every call (`kernels.runtime.PREPARED_LAUNCHES = 0`) and against
that with, as before that session, each layer's causal pattern built and recorded (the attention
forward asked flash_prefill for it at every layer); it also counts the prepared launches found and
not found. Synthetic requests on the Qwen2.5-VL-7B architecture (random weights,
`videoprefill.bench.cold_qa`), sparse mode, one new token: the language model's prefill and TTFT
without decoding, at prompt lengths never run before (a user's video; `--repeats` lengths, 256
video tokens apart, each run by both ways, which go first in turn: nothing of the kernel's way
depends on the length, and SDPA's cuDNN meets each length first in its own run), then each way
once more at the last length (a batch of alike videos).
A development script (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_short_videos.py [--video-tokens 1024 2048 4096]
"""

import argparse
import collections
import statistics

from kernels import FlashPrefillConfig, runtime
from kernels.flash_prefill import api
from kernels.flash_prefill import sparse_attention_sm90 as hopper_kernels
from models.attention import SparsityRecorder
from videoprefill.bench import cold_qa, synthetic_request

KEPT_RECORD = SparsityRecorder.record_causal


def pattern_recorded(self, layer, batch, heads, q_len, kv_len, block_size, device):
    """What the attention forward did before the twenty-first session: the causal pattern built (as
    flash_prefill returned it) and recorded."""
    self.record(layer, api._causal_pattern(batch, heads, q_len, kv_len, block_size, device))


def setting(hopper: bool = True, prepared: int = runtime.PREPARED_LAUNCHES, record=KEPT_RECORD):
    def apply():
        api.DENSE_ON_HOPPER_KERNEL = hopper
        runtime.PREPARED_LAUNCHES = prepared
        SparsityRecorder.record_causal = record
    return apply


class CountedLaunches(collections.OrderedDict):
    """The prepared launches, counting the lookups that find one."""
    found = missed = 0

    def get(self, key, default=None):
        value = super().get(key, default)
        if value is None:
            CountedLaunches.missed += 1
        else:
            CountedLaunches.found += 1
        return value


WAY_SETS = {
    "sdpa": {"Hopper kernel (kept)": setting(), "SDPA (before)": setting(hopper=False)},
    "launches": {"kept": setting(), "launches built in full": setting(prepared=0),
                 "launches built in full, causal pattern built and recorded per layer":
                     setting(prepared=0, record=pattern_recorded)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video-tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ways", choices=list(WAY_SETS), default="sdpa")
    args = parser.parse_args()
    ways = WAY_SETS[args.ways]
    hopper_kernels._ws_prepared.launches = CountedLaunches()  # (the attention kernel's)
    qa = cold_qa()
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    print("| requested video tokens | last prompt tokens | way | lengths | LLM prefill s, each | median "
          "| TTFT s (no decode), each | median |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in args.video_tokens:
        results = {(way, where): ([], []) for way in ways for where in ("new", "just run")}
        for repeat in range(args.repeats):
            request = synthetic_request(qa, tokens + 256 * (repeat + 1))
            if request.tokens["total"] >= config.min_seq_len:
                raise SystemExit(f"{tokens} video tokens give a prompt over min_seq_len: ask for fewer")
            order = list(ways.items()) if repeat % 2 == 0 else list(ways.items())[::-1]
            for way, apply in order:
                apply()
                answer = qa.run(request, "sparse", max_new_tokens=1, config=config)
                t = answer.timings
                results[way, "new"][0].append(t["prefill_s"])
                results[way, "new"][1].append(t["ttft_s"] - t["decode_video_s"])
        for way, apply in ways.items():
            apply()
            answer = qa.run(request, "sparse", max_new_tokens=1, config=config)
            t = answer.timings
            results[way, "just run"][0].append(t["prefill_s"])
            results[way, "just run"][1].append(t["ttft_s"] - t["decode_video_s"])
        setting()()
        for (way, where), (prefill, ttft) in results.items():
            print(f"| {tokens} | {request.tokens['total']} | {way} | {where} | "
                  f"{', '.join(f'{v:.3f}' for v in prefill)} | {statistics.median(prefill):.3f} | "
                  f"{', '.join(f'{v:.3f}' for v in ttft)} | {statistics.median(ttft):.3f} |", flush=True)
    print(f"prepared launches: found {CountedLaunches.found}, not found {CountedLaunches.missed}")


if __name__ == "__main__":
    main()
