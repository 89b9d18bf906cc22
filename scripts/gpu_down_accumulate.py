"""Why the language model's down projection gains less from adding into the residual than the add
it removes: one chunk of the MLP's down projection, `hidden (M, K) @ W.t()` with W (N, K), timed
as it writes a fresh output (`torch.mm(..., out=)`), as it adds into a residual in place
(`out.addmm_`, cuBLAS with beta = 1, what `models.fused.add_into` runs), as a product then a
separate add (what the stock layer runs), and with cuBLASLt preferred for each. Shapes: the 7B
language model's chunk (17,712 x 18,944 -> 3,584, `models.fused.chunk_tokens`) and last chunk of
a 131,102-token prefill (7,118 rows), and the vision tower's chunk (97,090 x 3,456 -> 1,280).
Random bf16 data; the versions timed alternately, median of `--repeats` do_bench medians. Also the
kernel names the profiler sees for each. A development script (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_down_accumulate.py [--repeats 5]
"""

import argparse
import statistics

import torch
import triton

SHAPES = {
    "language, chunk": (17712, 18944, 3584),
    "language, last chunk": (7118, 18944, 3584),
    "vision, chunk": (97090, 3456, 1280),
}


def kernel_names(fn) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA}
    return "; ".join(sorted(n[:60] for n in names))


def time_shape(name: str, m: int, k: int, n: int, repeats: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    residual = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(residual)
    ways = {
        "mm into out": lambda: torch.mm(hidden, weight.t(), out=out),
        "addmm_ in place (beta 1)": lambda: residual.addmm_(hidden, weight.t()),
        "addmm, C apart from out": lambda: torch.addmm(residual, hidden, weight.t(), out=out),
        "mm then add_": lambda: residual.add_(torch.mm(hidden, weight.t())),
    }
    for blas in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(blas)
        times = {way: [] for way in ways}
        with torch.inference_mode():
            for fn in ways.values():
                fn()
            for _ in range(repeats):
                for way, fn in ways.items():
                    times[way].append(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
            for way, fn in ways.items():
                ms = statistics.median(times[way])
                print(f"| {name} ({m} x {k} -> {n}) | {blas} | {way} | {ms:.3f} "
                      f"({', '.join(f'{t:.3f}' for t in times[way])}) | {2 * m * k * n / ms / 1e9:.0f} "
                      f"| {kernel_names(fn)} |", flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| shape | BLAS | way | ms (median of repeats) | TFLOP/s | kernels |")
    print("|---|---|---|---|---|---|")
    for name, (m, k, n) in SHAPES.items():
        time_shape(name, m, k, n, args.repeats)


if __name__ == "__main__":
    main()
