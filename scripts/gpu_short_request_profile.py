"""Where a short video's first question spends its time before the first token: the vision tower,
the language model's calls (one over the whole prompt where every layer is dense; else the video
prefix, then the question's tokens over its KV cache) and what `generate` does around them, each
as wall time against the GPU's kernel time inside it, with the GPU's idle time attributed to the
host code that launched the kernel after each gap.

Synthetic requests on the Qwen2.5-VL-7B architecture (random weights, `videoprefill.bench.cold_qa`),
sparse mode, one new token. Each length is run once untimed, then `--repeats` times timed (the
pipeline's own stage clock), then once under torch.profiler with Python stacks (which slows the
host, so the profiled gaps are an upper bound; the timed runs give the real figures). With
`--ways kept options-as-kwargs two-calls before` the timed runs alternate in one process the kept
code (one call where the whole prompt is dense, generate's options on a generation config), its
options as keyword arguments (`videoprefill.prefix.generation_options` bypassed), then that with
two calls (`videoprefill.pipeline.ONE_CALL_WHEN_DENSE` off) and with the question's dense
attention through SDPA too, as before the twenty-second session
(`kernels.flash_prefill.api.SHORT_QUERY_FLASH` off); the first way is the one profiled.
A development script (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_short_request_profile.py [--video-tokens 1024 2048 4096]
        [--ways kept options-as-kwargs two-calls before] [--out DIR]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import statistics

import torch

from kernels.flash_prefill import api
from videoprefill import pipeline
from videoprefill import prefix as prefixes
from videoprefill.bench import cold_qa, synthetic_request

KEPT_OPTIONS = prefixes.generation_options


def _setting(one_call: bool, short_query_flash: bool, generation_config: bool = True):
    def apply():
        pipeline.ONE_CALL_WHEN_DENSE = one_call
        api.SHORT_QUERY_FLASH = short_query_flash
        prefixes.generation_options = KEPT_OPTIONS if generation_config else (lambda model, options: options)
    return apply


# --ways: settings timed against each other (alternated in one process); the first is profiled.
WAYS = {
    "kept": _setting(True, True),
    # generate's options as keyword arguments, no generation config passed (so it checks the model's)
    "options-as-kwargs": _setting(True, True, generation_config=False),
    "two-calls": _setting(False, True, generation_config=False),  # the question's call over the cache, a flash call
    "before": _setting(False, False, generation_config=False),  # ... through SDPA (before the twenty-second session)
}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Ranges:
    """record_function ranges around the vision tower's and the language model's forwards."""

    def __init__(self, model):
        self.count = collections.Counter()
        self.open = {}
        self.handles = []
        for name, module in (("vision", model.model.visual), ("lm", model.model.language_model)):
            self.handles.append(module.register_forward_pre_hook(self._start(name)))
            self.handles.append(module.register_forward_hook(self._end(name)))

    def _start(self, name):
        def hook(module, args):
            label = f"range:{name}{self.count[name]}"
            self.count[name] += 1
            rf = torch.profiler.record_function(label)
            rf.__enter__()
            self.open[name] = rf
        return hook

    def _end(self, name):
        def hook(module, args, output):
            self.open.pop(name).__exit__(None, None, None)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _frame_site(name: str) -> str | None:
    """A python_function event's 'path(line): function' when the file is this project's or
    transformers' (the profiler names files relative to their sys.path entry)."""
    name = name[len(ROOT) + 1:] if name.startswith(ROOT) else name
    for part in ("transformers/", "videoprefill/", "models/", "kernels/"):
        if name.startswith(part) or f"site-packages/{part}" in name:
            return part + name.split(part, 1)[1]
    return None


def _outside(python, start: float, end: float, covered: list[tuple[float, float]]) -> list:
    """Host time of each function of this project or transformers inside [start, end] but outside
    the `covered` (disjoint) ranges, inclusive of what it calls: the 25 largest (site, us)."""
    spent = collections.Counter()
    for begin, finish, site in python:
        lo, hi = max(begin, start), min(finish, end)
        if hi <= lo:
            continue
        spent[site] += (hi - lo) - sum(max(0.0, min(hi, e) - max(lo, s)) for s, e in covered)
    return [(site, us) for site, us in spent.most_common(25) if us > 0]


def analyse(trace_path: str, windows=("lm0", "lm1", "vision0", "generate", "run")) -> dict:
    with open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    host_calls = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launches = {e["args"].get("correlation"): e for e in host_calls if "correlation" in e.get("args", {})}
    python = sorted(((e["ts"], e["ts"] + e["dur"], site) for e in events if e.get("cat") == "python_function"
                     and (site := _frame_site(e["name"])) is not None), key=lambda p: p[0])
    ranges = {e["name"].split(":", 1)[1]: e for e in events  # (host ranges; the GPU's copies are another category)
              if e.get("cat") == "user_annotation" and e.get("name", "").startswith("range:")}
    syncs = [e for e in host_calls if any(s in e["name"] for s in ("Synchronize", "Memcpy"))]

    def site_at(ts: float) -> str:
        """The innermost frames of this project or transformers enclosing host time ts."""
        inner = [site for begin, finish, site in python[: bisect.bisect_right(python, (ts, float("inf")))]
                 if finish >= ts]
        return " <- ".join(reversed(inner[-2:])) or "?"

    out = {}
    for name in windows:
        r = ranges.get(name)
        if r is None:
            continue
        start, end = r["ts"], r["ts"] + r["dur"]
        inside = [k for k in kernels
                  if (launch := launches.get(k["args"].get("correlation"))) is not None
                  and start <= launch["ts"] <= end]
        busy = 0.0
        gaps = collections.Counter()
        gap_total = 0.0
        last_end = None
        for k in inside:
            if last_end is not None and k["ts"] > last_end:
                gap = k["ts"] - last_end
                gap_total += gap
                if gap > 20:
                    gaps[site_at(launches[k["args"]["correlation"]]["ts"])] += gap
            busy += k["dur"]
            last_end = max(last_end or 0.0, k["ts"] + k["dur"])
        by_kernel, count = collections.Counter(), collections.Counter()
        for k in inside:
            by_kernel[k["name"][:90]] += k["dur"]
            count[k["name"][:90]] += 1
        first_gpu = inside[0]["ts"] - start if inside else None
        out[name] = {
            "wall_us": r["dur"], "kernels": len(inside), "kernel_us": busy, "idle_between_us": gap_total,
            "host_before_first_kernel_us": first_gpu,
            "gpu_tail_after_host_us": (last_end - end) if inside else None,
            "syncs": sum(1 for s in syncs if start <= s["ts"] <= end),
            "sync_us": sum(s["dur"] for s in syncs if start <= s["ts"] <= end),
            "syncs_by_site_us": sorted(((s["dur"], s["name"], site_at(s["ts"])) for s in syncs
                                        if start <= s["ts"] <= end), reverse=True)[:8],
            "top_kernels_us": by_kernel.most_common(12),
            "kernel_counts": count.most_common(40),
            "gaps_by_site_us": gaps.most_common(15),
        }
    if "run" in ranges:
        r = ranges["run"]
        covered = [(c["ts"], c["ts"] + c["dur"]) for n, c in ranges.items() if n.startswith(("vision", "lm"))]
        out["run"]["outside_towers_us"] = _outside(python, r["ts"], r["ts"] + r["dur"], covered)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video-tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ways", nargs="+", default=["kept"], choices=list(WAYS))
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    qa = cold_qa()
    summary = []
    for tokens in args.video_tokens:
        prepared = synthetic_request(qa, tokens)
        timed = {way: [] for way in args.ways}
        for way in args.ways:
            WAYS[way]()
            qa.run(prepared, "sparse", max_new_tokens=1)
        for _ in range(args.repeats):
            for way in args.ways:
                WAYS[way]()
                timed[way].append(qa.run(prepared, "sparse", max_new_tokens=1).timings)
        meds = {way: {k: statistics.median(t[k] for t in runs) for k in ("vision_s", "prefill_s", "ttft_s")}
                for way, runs in timed.items()}
        WAYS[args.ways[0]]()
        ranges = Ranges(qa.model)
        original_generate = qa.model.generate

        def generate(*a, original=original_generate, **k):
            with torch.profiler.record_function("range:generate"):
                return original(*a, **k)

        qa.model.generate = generate
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA],
                                        with_stack=True) as prof:
                with torch.profiler.record_function("range:run"):
                    profiled = qa.run(prepared, "sparse", max_new_tokens=1).timings
        finally:
            ranges.close()
            del qa.model.generate
        path = os.path.join(args.out, f"trace_{tokens}.json")
        prof.export_chrome_trace(path)
        windows = analyse(path)
        os.remove(path)
        row = {"video_tokens": tokens, "prompt_tokens": prepared.tokens["total"], "timed_median": meds,
               "profiled": {k: profiled[k] for k in ("vision_s", "prefill_s", "ttft_s")}, "windows": windows}
        summary.append(row)
        with open(os.path.join(args.out, f"short_request_{tokens}.json"), "w") as f:
            json.dump(row, f, indent=1)
        print(f"\n== {tokens} video tokens ({prepared.tokens['total']} prompt tokens), profiled way {args.ways[0]}",
              flush=True)
        for way, m in meds.items():
            print(f"  timed medians, {way}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in m.items())
                  + f"; TTFT outside the towers {(m['ttft_s'] - m['vision_s'] - m['prefill_s']) * 1e3:.1f} ms")
        for name, w in windows.items():
            print(f"  {name}: wall {w['wall_us'] / 1e3:.2f} ms, {w['kernels']} kernels {w['kernel_us'] / 1e3:.2f} ms, "
                  f"idle between {w['idle_between_us'] / 1e3:.2f} ms, first kernel after "
                  f"{(w['host_before_first_kernel_us'] or 0) / 1e3:.2f} ms, syncs {w['syncs']} "
                  f"({w['sync_us'] / 1e3:.2f} ms)")
            for k, us in w["top_kernels_us"][:6]:
                print(f"      kernel {us / 1e3:7.2f} ms  {k}")
            if name == "lm1":
                print("      kernels per layer: " + ", ".join(f"{n[:40]} x{c / 28:.1f}" for n, c in w["kernel_counts"]))
            for site, us in w["gaps_by_site_us"][:8]:
                print(f"      gap    {us / 1e3:7.2f} ms  {site}")
            for us, call, site in w["syncs_by_site_us"][:4]:
                print(f"      sync   {us / 1e3:7.2f} ms  {call} at {site}")
            for site, us in w.get("outside_towers_us", [])[:25]:
                print(f"      outside the towers {us / 1e3:7.2f} ms  {site}")
    print(f"\n| video tokens | prompt | way | vision ms | LLM prefill ms | TTFT ms | (medians of {args.repeats})")
    print("|---|---|---|---|---|---|")
    for r in summary:
        for way, m in r["timed_median"].items():
            print(f"| {r['video_tokens']} | {r['prompt_tokens']} | {way} | {m['vision_s'] * 1e3:.1f} "
                  f"| {m['prefill_s'] * 1e3:.1f} | {m['ttft_s'] * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
