"""The answer's tokens after the first: the time per decoding step over a long video prompt, on the
Qwen2.5-VL-7B architecture (random bf16 weights, `videoprefill.bench.cold_qa`), for synthetic
requests of `--video-tokens`, sparse at a fixed density (benchmark only) and dense. Each request
is run once with 2 new tokens (untimed), then with `--new-tokens`; the time per step is (total -
TTFT) / (new tokens - 1), with the floor a step cannot beat beside it: the weights and the KV cache
read once from HBM at `--hbm-tbs`. Also a torch.profiler table of the GPU kernels of the
decoding steps of one sparse request at the largest length (its prefill's kernels subtracted: the same
request profiled with 2 new tokens). A development script (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_decode_steps.py [--video-tokens 16384 131072] [--new-tokens 33]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from videoprefill.bench import cold_qa, synthetic_request


def kernel_ms(fn) -> Counter:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return Counter({e.key: e.device_time_total / 1e3 for e in prof.key_averages()
                    if e.device_type == torch.autograd.DeviceType.CUDA})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video-tokens", type=int, nargs="+", default=[16384, 131072])
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--fixed-density", type=float, default=0.05)
    parser.add_argument("--hbm-tbs", type=float, default=4.8, help="HBM bandwidth for the floor, TB/s")
    args = parser.parse_args()

    from kernels import FlashPrefillConfig

    qa = cold_qa()
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
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
