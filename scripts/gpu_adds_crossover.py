"""The second half of a Qwen2.5-VL-7B decoder layer (`h = h + attn; h + mlp(norm(h))`: width 3,584,
MLP 18,944, no biases, random bf16 weights) as PyTorch runs it against
`models.fused.norm_and_mlp_residuals`, at the lengths `models.text.FUSED_ADDS_MIN_TOKENS` chooses
between. Timed as the layer runs in a prefill: eager, the host's time included (the mean wall time
of back-to-back calls, synchronised at the end; the two ways alternated `--repeats` times, the
median kept). With `--clocks`, also at 131,102 tokens: the mean SM clock and power while each way
runs for about two seconds (NVML, from nvidia-ml-py), twice each, alternated. A development script
(results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_adds_crossover.py [--tokens 16 64 ...] [--clocks]
"""

import argparse
import statistics
import time

import torch
from gpu_llm_profile import ClockSampler
from gpu_mlp_residual import block_parts, stock_second_half

from models.fused import adds_into, norm_and_mlp_residuals

WIDTH, HIDDEN = 3584, 18944


def wall_ms(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / calls


def ways(tokens: int):
    mlp, norm, h, attn = block_parts(tokens, WIDTH, HIDDEN, False)
    scratch = attn.clone()  # the fused way writes over its attention argument
    assert adds_into(mlp, h, h)
    return {
        "stock": lambda: stock_second_half(h, attn, norm, mlp),
        "fused": lambda: norm_and_mlp_residuals(h, scratch, norm, mlp),
    }, lambda: scratch.copy_(attn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+",
                        default=[16, 64, 256, 512, 1024, 2048, 4096, 16384, 131102])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clocks", action="store_true")
    args = parser.parse_args()
    print("| tokens | stock ms per call | fused ms per call | fused / stock | calls per repeat |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for tokens in args.tokens:
            fns, reset = ways(tokens)
            once = wall_ms(fns["stock"], 3)
            calls = max(5, min(400, int(200 / max(once, 1e-3))))
            times = {name: [] for name in fns}
            for _ in range(args.repeats):
                reset()
                for name, fn in fns.items():
                    times[name].append(wall_ms(fn, calls))
            stock, fused = statistics.median(times["stock"]), statistics.median(times["fused"])
            print(f"| {tokens} | {stock:.4f} | {fused:.4f} | {fused / stock:.3f} | {calls} |", flush=True)
            del fns, reset
            torch.cuda.empty_cache()
        if args.clocks:
            print("\n| 131,102 tokens | ms per call | mean SM clock MHz | mean power W | samples |")
            print("|---|---|---|---|---|")
            fns, reset = ways(131102)
            for _ in range(2):
                reset()
                for name, fn in fns.items():
                    fn()
                    torch.cuda.synchronize()
                    with ClockSampler() as sampler:
                        ms = wall_ms(fn, 25)
                    s = sampler.summary()
                    print(f"| {name} | {ms:.3f} | {s.get('sm_clock_mhz_mean', float('nan')):.0f} | "
                          f"{s.get('power_w_mean', float('nan')):.0f} | {s.get('samples', 0)} |", flush=True)


if __name__ == "__main__":
    main()
