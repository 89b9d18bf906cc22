"""Whether CUDA random generators made per call (as `kernels.testing.random_pattern` makes them, one
per layer call of a fixed-density request) slow later SDPA calls on the host: the host time of a
decoding step's attention call (q 1 x 28 heads, K/V 4 heads over `--keys` keys, bf16, a boolean
mask, GQA in SDPA as transformers calls it) before and after making generators, drawing from each
as random_pattern did; then the same after `gc.collect()`. A development script (results go to
BENCHMARKS.md; run 5 of the fourteenth session ran it with its own copy of `host_us`, since
imported from scripts/gpu_host_profile.py).

    PYTHONPATH=$PWD python3 scripts/gpu_generator_sdpa.py [--keys 16414]
"""

import argparse
import gc

import torch
import torch.nn.functional as F
from gpu_host_profile import host_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=16414)
    args = parser.parse_args()
    q = torch.randn(1, 28, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, args.keys, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.ones(1, 1, 1, args.keys, device="cuda", dtype=torch.bool)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def sdpa_no_mask():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    print("| generators made so far | SDPA with mask, host us per call | without mask |")
    print("|---|---|---|")
    made = 0
    kept = []
    for step in (0, 56, 56, 448):
        for i in range(step):
            g = torch.Generator(device="cuda").manual_seed(made + i)
            kept.append(torch.rand(16, generator=g, device="cuda"))
        made += step
        print(f"| {made} | {host_us(sdpa, 300):.1f} | {host_us(sdpa_no_mask, 300):.1f} |", flush=True)
    kept.clear()
    gc.collect()
    print(f"| {made}, then gc.collect() | {host_us(sdpa, 300):.1f} | {host_us(sdpa_no_mask, 300):.1f} |")
    cached = torch.Generator(device="cuda")
    for i in range(448):
        cached.manual_seed(i)
        torch.rand(16, generator=cached, device="cuda")
    with_mask, without = host_us(sdpa, 300), host_us(sdpa_no_mask, 300)
    print(f"| {made}, then one generator reseeded 448 times | {with_mask:.1f} | {without:.1f} |")


if __name__ == "__main__":
    main()
