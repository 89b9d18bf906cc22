"""The answer's tokens after the first: the time per decoding step over a long video prompt, on the
Qwen2.5-VL-7B architecture (random bf16 weights, `videoprefill.bench.cold_qa`), for synthetic
requests of `--video-tokens`, sparse at a fixed density (benchmark only) and dense. Each request
is run once with 2 new tokens (untimed), then with `--new-tokens`; the time per step is (total -
TTFT) / (new tokens - 1), with the floor a step cannot beat beside it: the weights and the KV cache
read once from HBM at `--hbm-tbs`. Also a torch.profiler table of the GPU kernels of the
decoding steps of one sparse request at the largest length (its prefill's kernels subtracted: the same
request profiled with 2 new tokens). Instead, `--host-profile TOKENS`: decoding steps under
cProfile in an order that separates the attention mode from new key lengths (`host_profile`);
`--ab TOKENS`: SDPA's cuDNN backend excluded from decoding steps (as kept) against allowed,
alternated in one process (`backends_ab`); `--fused-ab TOKENS`: the language model's fused ops
against the stock model in decoding steps (`fused_ab`); `--step-listing TOKENS`: where a decoding
step's host time goes, per function (`step_listing`); `--prepared-ab TOKENS`: prepared launches
against launches built in full (`prepared_ab`). A development script (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_decode_steps.py [--video-tokens 16384 131072] [--new-tokens 33]
    PYTHONPATH=$PWD python3 scripts/gpu_decode_steps.py --ab 16384
"""

from __future__ import annotations

import contextlib
import cProfile
import pstats
from collections import Counter

import torch
from gpu_graph_decode import decoding_parser  # (this script's folder is on the path)

from videoprefill.bench import cold_qa, synthetic_request


def kernel_ms(fn, counts: Counter | None = None) -> Counter:
    """GPU ms per kernel name over `fn()`; with `counts`, each kernel's launches added there."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    if counts is not None:
        counts.update({e.key: e.count for e in events})
    return Counter({e.key: e.device_time_total / 1e3 for e in events})


def _profiled(qa, prepared, mode, fixed, config, new_tokens, backends=None) -> dict:
    """One request under cProfile: ms per decoding step, and the SDPA calls' host time."""
    from torch.nn.attention import sdpa_kernel

    profile = cProfile.Profile()
    context = sdpa_kernel(backends) if backends else contextlib.nullcontext()
    with context:
        profile.enable()
        answer = qa.run(prepared, mode, max_new_tokens=new_tokens, config=config, fixed_density=fixed)
        profile.disable()
    stats = pstats.Stats(profile).stats
    sdpa = [v for k, v in stats.items() if "scaled_dot_product_attention" in k[2]]
    calls, seconds = (sdpa[0][1], sdpa[0][2]) if sdpa else (0, 0.0)
    t = answer.timings
    steps = max(1, answer.new_tokens - 1)
    return {"ms_per_step": 1e3 * (t["total_s"] - t["ttft_s"]) / steps, "sdpa_calls": calls,
            "sdpa_host_us": 1e6 * seconds / max(1, calls), "new_tokens": answer.new_tokens}


def host_profile(qa, config, args) -> None:
    """Decoding steps under cProfile, in an order that separates the attention mode from whether
    the request's key lengths were decoded before in this process: a first request at its length
    (sparse, fixed density), the same again, the same length dense and sparse, then a new length
    dense, the same again, and the new length with SDPA limited to its flash and memory-efficient
    kernels (no cuDNN)."""
    from torch.nn.attention import SDPBackend

    first = synthetic_request(qa, args.host_profile)
    other = synthetic_request(qa, args.host_profile + 1024)
    no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    fixed = args.fixed_density
    runs = [("A", first, "sparse", fixed, None), ("A again", first, "sparse", fixed, None),
            ("A", first, "dense", None, None), ("A", first, "sparse", None, None),
            ("B (new length)", other, "dense", None, None), ("B again", other, "dense", None, None),
            ("C (new length), no cuDNN", synthetic_request(qa, args.host_profile + 2048), "dense", None, no_cudnn),
            ("C again, no cuDNN", None, "dense", None, no_cudnn)]
    print("| request | prompt tokens | attention | new tokens | ms per step | SDPA calls | SDPA host us per call |")
    print("|---|---|---|---|---|---|---|")
    last = None
    for label, prepared, mode, fixed_density, backends in runs:
        prepared = prepared or last
        last = prepared
        r = _profiled(qa, prepared, mode, fixed_density, config, args.new_tokens, backends)
        name = mode if fixed_density is None else f"sparse, fixed {fixed_density:.0%}"
        print(f"| {label} | {prepared.tokens['total']} | {name} | {r['new_tokens']} | {r['ms_per_step']:.2f} | "
              f"{r['sdpa_calls']} | {r['sdpa_host_us']:.0f} |", flush=True)


def backends_ab(qa, config, args) -> None:
    """Decoding steps with cuDNN excluded (as kept, kernels.flash_prefill.api.SHORT_QUERY_BACKENDS) and allowed,
    alternated in one process, at a length decoded just before (cuDNN's plans built) and at new
    lengths (256 more video tokens each time), sparse at the fixed density."""
    from torch.nn.attention import SDPBackend

    from kernels.flash_prefill import api

    kept = list(api.SHORT_QUERY_BACKENDS)
    ways = {"cuDNN excluded (kept)": kept, "cuDNN allowed": [SDPBackend.CUDNN_ATTENTION] + kept}
    repeated = synthetic_request(qa, args.ab)
    fixed = args.fixed_density
    qa.run(repeated, "sparse", max_new_tokens=args.new_tokens, config=config, fixed_density=fixed)
    print("| lengths | backends | ms per step, repeats | median |")
    print("|---|---|---|---|")
    results = {(where, way): [] for where in ("decoded before", "new") for way in ways}
    fresh = 0
    for _ in range(3):
        for way, backends in ways.items():
            api.SHORT_QUERY_BACKENDS[:] = backends
            for where in ("decoded before", "new"):
                if where == "new":
                    fresh += 1
                prepared = repeated if where == "decoded before" else synthetic_request(qa, args.ab + 256 * fresh)
                answer = qa.run(prepared, "sparse", max_new_tokens=args.new_tokens, config=config, fixed_density=fixed)
                t = answer.timings
                results[where, way].append(1e3 * (t["total_s"] - t["ttft_s"]) / max(1, answer.new_tokens - 1))
    api.SHORT_QUERY_BACKENDS[:] = kept
    for (where, way), values in results.items():
        print(f"| {where} | {way} | {', '.join(f'{v:.2f}' for v in values)} | {sorted(values)[1]:.2f} |")


def prepared_ab(qa, config, args) -> None:
    """Decoding steps and the LLM prefill with every launch site's prepared launches (as kept,
    kernels.runtime.PREPARED_LAUNCHES) against launches built in full, alternated three times in one
    process on one request (twenty-first session)."""
    from kernels import runtime

    kept = runtime.PREPARED_LAUNCHES
    ways = {"prepared (kept)": kept, "built in full": 0}
    request = synthetic_request(qa, args.prepared_ab)
    fixed = args.fixed_density
    qa.run(request, "sparse", max_new_tokens=args.new_tokens, config=config, fixed_density=fixed)
    steps = {way: [] for way in ways}
    prefill = {way: [] for way in ways}
    for _ in range(3):
        for way, size in ways.items():
            runtime.PREPARED_LAUNCHES = size
            answer = qa.run(request, "sparse", max_new_tokens=args.new_tokens, config=config, fixed_density=fixed)
            t = answer.timings
            steps[way].append(1e3 * (t["total_s"] - t["ttft_s"]) / max(1, answer.new_tokens - 1))
            prefill[way].append(1e3 * t["prefill_s"])
    runtime.PREPARED_LAUNCHES = kept
    print(f"{request.tokens['total']} prompt tokens, {answer.new_tokens} new tokens")
    print("| launches | ms per step, repeats | median | LLM prefill ms, repeats | median |")
    print("|---|---|---|---|---|")
    for way in ways:
        print(f"| {way} | {', '.join(f'{v:.2f}' for v in steps[way])} | {sorted(steps[way])[1]:.2f} | "
              f"{', '.join(f'{v:.1f}' for v in prefill[way])} | {sorted(prefill[way])[1]:.1f} |")


def fused_ab(qa, config, args) -> None:
    """Decoding steps with the language model's fused ops (models.text.prepare_language_model, as
    kept) against the stock language model, alternated three times in one process at new lengths
    (256 more video tokens each time), sparse at the fixed density."""
    from models.text import prepare_language_model

    fixed = args.fixed_density
    results = {"fused (kept)": [], "stock": []}
    for i in range(3):
        for j, way in enumerate(results):
            prepare_language_model(qa.model, enabled=way != "stock")
            prepared = synthetic_request(qa, args.fused_ab + 256 * (2 * i + j + 1))
            answer = qa.run(prepared, "sparse", max_new_tokens=args.new_tokens, config=config, fixed_density=fixed)
            t = answer.timings
            results[way].append(1e3 * (t["total_s"] - t["ttft_s"]) / max(1, answer.new_tokens - 1))
    prepare_language_model(qa.model)
    print("| language model | ms per step, new lengths | median |")
    print("|---|---|---|")
    for way, values in results.items():
        print(f"| {way} | {', '.join(f'{v:.2f}' for v in values)} | {sorted(values)[1]:.2f} |")


def host_per_step(run, fewer: int, more: int) -> tuple[list[tuple[float, float, float, str]], int]:
    """`run(new_tokens)` with `fewer` and with `more` new tokens under cProfile; per function, the
    difference of the two runs' own time (us), calls and cumulative time (us) per step (`more -
    fewer` steps), the largest own time first: (rows, steps)."""
    stats = {}
    for tokens in (fewer, more):
        profile = cProfile.Profile()
        profile.enable()
        run(tokens)
        profile.disable()
        stats[tokens] = pstats.Stats(profile).stats
    steps = more - fewer
    rows = []
    for key, (_, calls, tottime, cumtime, _) in stats[more].items():
        _, calls_before, tottime_before, cumtime_before, _ = stats[fewer].get(key, (0, 0, 0.0, 0.0, None))
        name = f"{key[0].split('site-packages/')[-1]}:{key[1]}({key[2]})"
        rows.append((1e6 * (tottime - tottime_before) / steps, (calls - calls_before) / steps,
                     1e6 * (cumtime - cumtime_before) / steps, name))
    return sorted(rows, reverse=True), steps


def print_host_rows(rows, steps: int, what: str, count: int = 45) -> None:
    total = sum(r[0] for r in rows)
    print(f"host time per {what} under cProfile: {total / 1e3:.2f} ms ({steps} steps)")
    print("| function | calls per step | own us per step | cumulative us per step |")
    print("|---|---|---|---|")
    for own, calls, cumulative, name in rows[:count]:
        print(f"| {name[-100:]} | {calls:.1f} | {own:.0f} | {cumulative:.0f} |")


def step_listing(qa, config, args) -> None:
    """Where a decoding step's host time goes: a sparse request (fixed density) at a new length,
    run once untimed, then the same with 2 and with `--new-tokens` new tokens under cProfile; per
    function, the difference of the two runs' internal time per decoding step, the largest first."""
    fixed = args.fixed_density
    prepared = synthetic_request(qa, args.step_listing)
    qa.run(prepared, "sparse", max_new_tokens=2, config=config, fixed_density=fixed)
    rows, steps = host_per_step(
        lambda tokens: qa.run(prepared, "sparse", max_new_tokens=tokens, config=config, fixed_density=fixed),
        2, args.new_tokens)
    print_host_rows(rows, steps, "decoding step")


def main() -> None:
    parser = decoding_parser(__doc__.splitlines()[0], rounds=False)
    parser.add_argument("--host-profile", type=int, default=0, metavar="TOKENS",
                        help="instead: decoding steps under cProfile around TOKENS video tokens (host_profile)")
    parser.add_argument("--ab", type=int, default=0, metavar="TOKENS",
                        help="instead: cuDNN excluded against allowed in decoding steps, around TOKENS video tokens")
    parser.add_argument("--fused-ab", type=int, default=0, metavar="TOKENS",
                        help="instead: the fused language model against the stock one in decoding steps")
    parser.add_argument("--prepared-ab", type=int, default=0, metavar="TOKENS",
                        help="instead: prepared launches against launches built in full (prepared_ab)")
    parser.add_argument("--step-listing", type=int, default=0, metavar="TOKENS",
                        help="instead: a cProfile listing of a decoding step's host time (step_listing)")
    parser.add_argument("--hbm-tbs", type=float, default=4.8, help="HBM bandwidth for the floor, TB/s")
    args = parser.parse_args()

    from kernels import FlashPrefillConfig

    qa = cold_qa()
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    studies = {"host_profile": host_profile, "ab": backends_ab, "fused_ab": fused_ab, "step_listing": step_listing,
               "prepared_ab": prepared_ab}
    for option, study in studies.items():  # instead of the table
        if getattr(args, option):
            study(qa, config, args)
            return
    text = qa.model.config.text_config
    weight_bytes = sum(p.numel() * p.element_size() for n, p in qa.model.named_parameters() if "visual" not in n)
    head_dim = text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2  # K and V, bf16
    print("| video tokens | prompt tokens | attention | TTFT s | new tokens | total s | ms per step | floor ms |")
    print("|---|---|---|---|---|---|---|---|")
    prepared = None
    for tokens in args.video_tokens:
        prepared = synthetic_request(qa, tokens)
        for mode, fixed in (("sparse", args.fixed_density), ("dense", None)):
            qa.run(prepared, mode, max_new_tokens=2, config=config, fixed_density=fixed)
            answer = qa.run(prepared, mode, max_new_tokens=args.new_tokens, config=config, fixed_density=fixed)
            t = answer.timings
            steps = answer.new_tokens - 1
            per_step = 1e3 * (t["total_s"] - t["ttft_s"]) / steps if steps else float("nan")
            floor = 1e3 * (weight_bytes + kv_per_token * prepared.tokens["total"]) / (args.hbm_tbs * 1e12)
            label = mode if fixed is None else f"sparse, fixed {fixed:.0%} (benchmark only)"
            print(f"| {tokens} | {prepared.tokens['total']} | {label} | {t['ttft_s'] - t['decode_video_s']:.3f} | "
                  f"{answer.new_tokens} | {t['total_s'] - t['decode_video_s']:.3f} | {per_step:.2f} | {floor:.2f} |",
                  flush=True)
    fixed = args.fixed_density
    whole = kernel_ms(lambda: qa.run(prepared, "sparse", args.new_tokens, config, fixed_density=fixed))
    first = kernel_ms(lambda: qa.run(prepared, "sparse", 2, config, fixed_density=fixed))
    steps = Counter({k: v - first.get(k, 0.0) for k, v in whole.items()})
    total = sum(v for v in steps.values() if v > 0)
    print(f"\nGPU kernels of {args.new_tokens - 2} decoding steps (sparse request, {args.video_tokens[-1]} video "
          f"tokens), {total:.1f} ms in all:")
    print("| kernel | ms | share |")
    print("|---|---|---|")
    for name, ms in steps.most_common(12):
        print(f"| {name[:90]} | {ms:.2f} | {ms / total:.1%} |")


if __name__ == "__main__":
    main()
