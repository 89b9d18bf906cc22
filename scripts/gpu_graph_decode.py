"""Decoding steps replayed from a CUDA graph (models.decode) against transformers' decoding, on the
Qwen2.5-VL-7B architecture (random bf16 weights, `videoprefill.bench.cold_qa`).

1. The attention of one decoding step: kernels.decode_attention over a cache reserved 64 positions
   past the length, against SDPA's flash kernel over exactly the length (what a step ran before),
   28 query / 4 KV heads, head dim 128; and their largest difference. The GPU time of
   decode_attention from CUDA graphs, given the cache and reading it from a table (as a step does).
2. Whole requests of `--video-tokens` (sparse at a fixed density, benchmark only; dense at the
   first length), graph decoding on and off alternated `--rounds` times: ms per decoding step,
   (total - TTFT) / (new tokens - 1), the TTFT, whether both ways chose the same token ids, a
   graph's replay timed alone (GPU time of a step), the peak memory allocated, and the floor a step
   cannot beat (the language model's weights and the KV cache read once from HBM).
3. `--sweep`: decode_attention's launch settings; `--combine`: its combine kernel as it was and as
   it is; `--compare TOKENS`: token ids and scores three
   ways (transformers' decoding, the steps without a graph, with one); `--profile TOKENS`: the GPU
   kernels of a decoding step; `--host-listing TOKENS`: where a replayed step's host time goes.

A development script (results go to BENCHMARKS.md):

    PYTHONPATH=$PWD python3 scripts/gpu_graph_decode.py [--video-tokens 16384 65536 131072] [--new-tokens 33]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import models.decode as decode
from videoprefill import prefix as prefixes
from videoprefill.bench import cold_qa, markdown_table, synthetic_request


def attention_table(lengths) -> str:
    import triton.testing
    from torch.nn.attention import sdpa_kernel

    from kernels.decode_attention import TABLE_COLUMNS, decode_attention, fill_table
    from kernels.flash_prefill.api import SHORT_QUERY_BACKENDS

    def ours(q, k, v, lengths_t):
        return decode_attention(q[:, :, 0], k, v, lengths_t, 128**-0.5)

    def sdpa(q, k, v, n):
        with sdpa_kernel(SHORT_QUERY_BACKENDS):
            return torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], enable_gqa=True)

    rows = []
    for n in lengths:
        q = torch.randn(1, 28, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 4, n + 64, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lengths_t = torch.tensor([n], device="cuda")
        diff = (ours(q, k, v, lengths_t).float() - sdpa(q, k, v, n)[:, :, 0].float()).abs().max().item()
        t_ours = triton.testing.do_bench(lambda: ours(q, k, v, lengths_t))  # noqa: B023 (called at once)
        t_sdpa = triton.testing.do_bench(lambda: sdpa(q, k, v, n))  # noqa: B023
        gbs = 2 * 4 * n * 128 * 2 / (t_ours * 1e-3) / 1e9
        table = fill_table(torch.empty(1, TABLE_COLUMNS, dtype=torch.long, device="cuda"), [(k, v)])
        from_table = decode_attention(q[:, :, 0], k, v, lengths_t, 128**-0.5, table=table)
        assert torch.equal(from_table, ours(q, k, v, lengths_t)), "the table's attention differs"
        given_gpu = graph_ms(lambda: ours(q, k, v, lengths_t))  # noqa: B023
        table_gpu = graph_ms(lambda: decode_attention(q[:, :, 0], k, v, lengths_t, 128**-0.5, table=table))  # noqa: B023
        rows.append({"keys": n, "ours": t_ours * 1e3, "sdpa": t_sdpa * 1e3, "gbs": gbs, "diff": diff,
                     "given_gpu": given_gpu * 1e3, "table_gpu": table_gpu * 1e3})
    return markdown_table(rows, [("keys", "keys", "d"), ("decode_attention us", "ours", ".1f"),
                                 ("SDPA flash us (exact length)", "sdpa", ".1f"),
                                 ("decode_attention GB/s (K, V read)", "gbs", ".0f"),
                                 ("max abs difference", "diff", ".2e"),
                                 ("GPU us, cache given", "given_gpu", ".1f"),
                                 ("GPU us, from a table", "table_gpu", ".1f")])


def graph_ms(fn, reps: int = 20) -> float:
    """GPU time of one `fn()` call, from a CUDA graph of `reps` calls replayed 5 times (median):
    no host time in it."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin()
        for _ in range(reps):
            fn()
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def sweep(lengths) -> str:
    """kernels.decode_attention's launch settings against SDPA's flash kernel, GPU time only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.decode_attention import decode_attention

    rows = []
    for n in lengths:
        q = torch.randn(1, 28, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 4, n + 64, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lengths_t = torch.tensor([n], device="cuda")
        kn, vn = k[:, :, :n], v[:, :, :n]
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            flash = graph_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, kn, vn, enable_gqa=True))  # noqa: B023
        for block_n in (64, 128):
            for per_sm in (4, 8, 16):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        ms = graph_ms(lambda: decode_attention(  # noqa: B023
                            q[:, :, 0], k, v, lengths_t, 0.088, block_n=block_n, programs_per_sm=per_sm,  # noqa: B023
                            num_warps=warps, num_stages=stages))  # noqa: B023
                        rows.append({"keys": n, "block_n": block_n, "per_sm": per_sm, "warps": warps,
                                     "stages": stages, "us": ms * 1e3, "flash": flash * 1e3,
                                     "gbs": 2 * 4 * n * 128 * 2 / (ms * 1e-3) / 1e9})
        best = min((r for r in rows if r["keys"] == n), key=lambda r: r["us"])
        print("best", best, flush=True)
    return markdown_table(rows, [("keys", "keys", "d"), ("BLOCK_N", "block_n", "d"), ("programs per SM", "per_sm", "d"),
                                 ("warps", "warps", "d"), ("stages", "stages", "d"), ("us", "us", ".1f"),
                                 ("GB/s", "gbs", ".0f"), ("SDPA flash us", "flash", ".1f")])


def combine_table(lengths) -> str:
    """decode_attention with the combine as it was (one program per query head, 16 spans a load) and
    as it is (COMBINE_DIMS dims a program, COMBINE_SPANS spans a load), at 4 and 8 programs per SM,
    GPU time only."""
    from kernels.decode_attention import decode_attention

    rows = []
    for n in lengths:
        q = torch.randn(1, 28, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 4, n + 64, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lengths_t = torch.tensor([n], device="cuda")
        for per_sm in (4, 8):
            row = {"keys": n, "per_sm": per_sm}
            for name, dims, spans in (("before", 128, 16), ("now", None, None)):
                tuning = {} if dims is None else {"combine_dims": dims, "combine_spans": spans}
                row[name] = 1e3 * graph_ms(lambda: decode_attention(  # noqa: B023 (called at once)
                    q, k, v, lengths_t, 0.088, programs_per_sm=per_sm, **tuning))  # noqa: B023
            rows.append(row)
            print(row, flush=True)
    return markdown_table(rows, [("keys", "keys", "d"), ("programs per SM", "per_sm", "d"),
                                 ("us, combine before", "before", ".1f"), ("us, combine now", "now", ".1f")])


def compare(qa, tokens: int, new_tokens: int, fixed: float) -> None:
    """The token ids and scores of one request three ways: transformers' decoding, the steps over the
    reserved cache without a graph, and replayed from a graph; where the first two part, the top
    two scores of each at that step."""
    import functools

    import videoprefill.pipeline as pipeline
    from kernels import FlashPrefillConfig
    from models.attention import request_settings

    prepared = synthetic_request(qa, tokens)
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    outs = {}
    for way, graphs in (("transformers", False), ("steps, no graph", "eager"), ("graph", True)):
        qa.graph_decode = bool(graphs)
        pipeline.graph_decoding = functools.partial(decode.graph_decoding, capture=False) if graphs == "eager" \
            else decode.graph_decoding
        for mode, fixed_density in (("sparse", fixed), ("dense", None)):
            key, settings = qa._settings(mode, config, None, fixed_density)
            qa._use(mode)
            with torch.inference_mode(), request_settings(settings):
                out, _ = qa._generate(prepared, key, None, new_tokens, output_scores=True, return_dict_in_generate=True,
                                      min_new_tokens=new_tokens)
            outs[way, mode] = (out.sequences[0, -new_tokens:].tolist(), torch.stack(out.scores)[:, 0].float())
    pipeline.graph_decoding = decode.graph_decoding
    qa.graph_decode = True
    for mode in ("sparse", "dense"):
        base_ids, base_scores = outs["transformers", mode]
        for way in ("steps, no graph", "graph"):
            ids, scores = outs[way, mode]
            same = next((i for i, (a, b) in enumerate(zip(ids, base_ids)) if a != b), None)
            upto = len(ids) if same is None else same + 1
            finite = base_scores[:upto].isfinite()  # (the minimum length's -inf at the end of text)
            diff = (scores[:upto] - base_scores[:upto])[finite].abs().max().item()
            spread = (base_scores[0].max() - base_scores[0].median()).item()
            line = f"{mode}: {way} vs transformers: first differing token {same}, max |score diff| to there {diff:.3g}"
            if same is not None:
                top = [s[same].topk(2).values.tolist() for s in (scores, base_scores)]
                line += f"; top two scores at that step: {top[0]} (this way), {top[1]} (transformers)"
            print(line + f"; score spread (max - median) {spread:.3g}", flush=True)
        (graph_ids, graph_scores), (eager_ids, eager_scores) = outs["graph", mode], outs["steps, no graph", mode]
        print(f"{mode}: graph vs steps without one: ids equal {graph_ids == eager_ids}, "
              f"scores equal {torch.equal(graph_scores, eager_scores)}", flush=True)


def profile(qa, tokens: int, new_tokens: int, fixed: float) -> None:
    """The GPU kernels of the decoding steps of one sparse request (steps run without a graph, the
    same launches a graph replays, its GEMVs and fused adds among them): a request with
    `new_tokens` profiled minus the same with 3, per step, the largest first, with launches per
    step."""
    import collections
    import functools

    import videoprefill.pipeline as pipeline
    from kernels import FlashPrefillConfig

    sys_path_scripts()
    from gpu_decode_steps import kernel_ms

    prepared = synthetic_request(qa, tokens)
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    pipeline.graph_decoding = functools.partial(decode.graph_decoding, capture=False, gemv=True)
    run = functools.partial(qa.run, prepared, "sparse", config=config, fixed_density=fixed)
    run(max_new_tokens=new_tokens)
    whole_n, first_n = collections.Counter(), collections.Counter()
    whole = kernel_ms(lambda: run(max_new_tokens=new_tokens), whole_n)
    first = kernel_ms(lambda: run(max_new_tokens=3), first_n)
    pipeline.graph_decoding = decode.graph_decoding
    steps = new_tokens - 3
    per_step = {k: (v - first.get(k, 0.0)) / steps for k, v in whole.items()}
    launches = {k: (whole_n[k] - first_n.get(k, 0)) / steps for k in whole}
    total = sum(v for v in per_step.values() if v > 0)
    rows = [{"kernel": k[:90], "ms": v, "share": v / total, "n": launches[k]}
            for k, v in sorted(per_step.items(), key=lambda kv: -kv[1]) if v > 0][:25]
    print(f"GPU kernels per decoding step ({steps} steps, {tokens} video tokens): {total:.2f} ms in all, "
          f"{sum(n for n in launches.values() if n > 0):.0f} launches")
    print(markdown_table(rows, [("kernel", "kernel", "s"), ("launches per step", "n", ".1f"),
                                ("ms per step", "ms", ".3f"), ("share", "share", ".1%")]))


def host_listing(qa, tokens: int, new_tokens: int, fixed: float) -> None:
    """Where a replayed step's host time goes: a sparse request with 5 and with `new_tokens` new
    tokens under cProfile (both reserve, capture and replay), per function the difference of their
    own time per step, the largest first (`gpu_decode_steps.host_per_step`)."""
    from kernels import FlashPrefillConfig

    sys_path_scripts()
    from gpu_decode_steps import host_per_step, print_host_rows

    prepared = synthetic_request(qa, tokens)
    config = FlashPrefillConfig.for_model("qwen2.5-vl")

    def run(count: int) -> None:
        answer = qa.run(prepared, "sparse", max_new_tokens=count, config=config, fixed_density=fixed)
        assert answer.new_tokens == count, "the request ended early"

    run(new_tokens)
    rows, steps = host_per_step(run, 5, new_tokens)
    print_host_rows(rows, steps, "replayed step", count=30)


def record_chosen_ids(chosen: dict) -> None:
    """From now on, `chosen["ids"]` holds the token ids of the pipeline's last `generate` call (the
    prompt and the answer)."""
    def recording(original):
        def recorded(*a, **k):
            out = original(*a, **k)
            chosen["ids"] = (out[0] if isinstance(out, tuple) else out).tolist()
            return out
        return recorded

    for name in ("generate_whole", "generate_over_prefix"):
        setattr(prefixes, name, recording(getattr(prefixes, name)))


def replay_time(graph, replays: int = 10) -> float:
    """ms of GPU time per replay of a step's CUDA graph, `replays` back to back (the replays write
    the last step's key and value again, the same values at the same position)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def timed_step_graphs(made: list, replay_ms: list) -> type:
    """A `decode.StepGraphs` that adds each instance to `made` and, before its graph is released,
    its replay's GPU time (`replay_time`) to `replay_ms`."""
    class Timed(decode.StepGraphs):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

        def close(self):
            if self.graph is not None:
                replay_ms.append(replay_time(self.graph))
            super().close()

    return Timed


def decoding_parser(description: str, video_tokens=(16384, 131072), rounds: bool = True) -> argparse.ArgumentParser:
    """The decoding scripts' parser with their common options: --video-tokens, --new-tokens, --rounds
    (with `rounds`) and --fixed-density (the sparse requests' density, benchmark only)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--video-tokens", type=int, nargs="+", default=list(video_tokens))
    parser.add_argument("--new-tokens", type=int, default=33)
    if rounds:
        parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fixed-density", type=float, default=0.05)
    return parser


def sys_path_scripts() -> None:
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = decoding_parser(__doc__.splitlines()[0], video_tokens=(16384, 65536, 131072))
    parser.add_argument("--hbm-tbs", type=float, default=4.8, help="HBM bandwidth for the floor, TB/s")
    parser.add_argument("--sweep", action="store_true", help="instead: decode_attention's launch settings (sweep)")
    parser.add_argument("--combine", action="store_true", help="instead: decode_attention's combine before and now")
    parser.add_argument("--compare", type=int, default=0, metavar="TOKENS",
                        help="instead: token ids and scores three ways at TOKENS video tokens (compare)")
    parser.add_argument("--profile", type=int, default=0, metavar="TOKENS",
                        help="instead: the GPU kernels of a decoding step at TOKENS video tokens (profile)")
    parser.add_argument("--host-listing", type=int, default=0, metavar="TOKENS",
                        help="instead: where a replayed step's host time goes at TOKENS video tokens (host_listing)")
    args = parser.parse_args()

    from kernels import FlashPrefillConfig

    if args.sweep:
        print(sweep([16384, 65536, 131072]))
        return
    if args.combine:
        print(combine_table([4096, 16384, 65536, 131072]))
        return
    if args.compare:
        compare(cold_qa(), args.compare, args.new_tokens, args.fixed_density)
        return
    if args.profile:
        profile(cold_qa(), args.profile, args.new_tokens, args.fixed_density)
        return
    if args.host_listing:
        host_listing(cold_qa(), args.host_listing, args.new_tokens, args.fixed_density)
        return
    print(attention_table([4096, 16384, 65536, 131072]), flush=True)

    made, chosen, replay_ms = [], {}, []

    decode.StepGraphs = timed_step_graphs(made, replay_ms)
    record_chosen_ids(chosen)
    qa = cold_qa()
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    text = qa.model.config.text_config
    weight_bytes = sum(p.numel() * p.element_size() for n, p in qa.model.named_parameters() if "visual" not in n)
    head_dim = text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2  # K and V, bf16
    rows = []
    for tokens in args.video_tokens:
        prepared = synthetic_request(qa, tokens)
        modes = [("sparse", args.fixed_density)] + ([("dense", None)] if tokens == args.video_tokens[0] else [])
        for mode, fixed in modes:
            steps, ttft, ids, replayed = {True: [], False: []}, {True: [], False: []}, {}, []
            peak = {}
            replay_ms.clear()
            for r in range(args.rounds + 1):  # (round 0 untimed)
                for on in (True, False):
                    qa.graph_decode = on
                    made.clear()
                    torch.cuda.reset_peak_memory_stats()
                    answer = qa.run(prepared, mode, max_new_tokens=args.new_tokens, config=config, fixed_density=fixed)
                    peak[on] = torch.cuda.max_memory_allocated() / 2**30
                    t = answer.timings
                    if r:
                        steps[on].append(1e3 * (t["total_s"] - t["ttft_s"]) / max(1, answer.new_tokens - 1))
                        ttft[on].append(t["ttft_s"])
                    ids[on] = chosen["ids"]
                    if on:
                        replayed.append(made[-1].replayed_steps if made else -1)
            floor = 1e3 * (weight_bytes + kv_per_token * prepared.tokens["total"]) / (args.hbm_tbs * 1e12)
            rows.append({
                "tokens": tokens, "prompt": prepared.tokens["total"],
                "mode": mode if fixed is None else f"sparse, fixed {fixed:.0%} (benchmark only)",
                "new": answer.new_tokens, "on": statistics.median(steps[True]), "off": statistics.median(steps[False]),
                "on_all": ", ".join(f"{v:.2f}" for v in steps[True]),
                "off_all": ", ".join(f"{v:.2f}" for v in steps[False]),
                "ttft_on": statistics.median(ttft[True]), "ttft_off": statistics.median(ttft[False]),
                "same": ids[True] == ids[False], "replayed": max(replayed), "floor": floor,
                "replay": statistics.median(replay_ms), "peak_on": peak[True], "peak_off": peak[False],
            })
            rows[-1]["speedup"] = rows[-1]["off"] / rows[-1]["on"]
            print(rows[-1], flush=True)
    qa.graph_decode = True
    print(markdown_table(rows, [
        ("video tokens", "tokens", "d"), ("prompt tokens", "prompt", "d"), ("attention", "mode", "s"),
        ("new tokens", "new", "d"), ("graph ms/step (rounds)", "on_all", "s"),
        ("eager ms/step (rounds)", "off_all", "s"),
        ("graph median", "on", ".2f"), ("eager median", "off", ".2f"), ("eager / graph", "speedup", ".2f"),
        ("replay alone ms (GPU)", "replay", ".2f"), ("floor ms", "floor", ".2f"),
        ("TTFT s graph", "ttft_on", ".3f"), ("TTFT s eager", "ttft_off", ".3f"),
        ("same token ids", "same", ""), ("steps replayed", "replayed", "d"),
        ("peak GiB graph", "peak_on", ".2f"), ("peak GiB eager", "peak_off", ".2f")]))


if __name__ == "__main__":
    main()
