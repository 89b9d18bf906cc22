"""What the mean correction of pruned blocks (FlashPrefillConfig.mean_correction) costs and what it
buys, at the Qwen2.5-VL-7B attention shape (28 query / 4 KV heads, head dim 128, bf16, block 128):

- time (median of `kernels.bench.bench_ms`) of cuDNN dense, of the attention over a pattern on the
  Hopper kernel uncorrected (the default) and corrected (what `flash_prefill` runs on Hopper), and
  on the Triton kernel uncorrected and corrected (what it runs elsewhere), corrected with its
  kept-block map and block means, on random block masks and on the patterns FlashPrefill selects
  on sink / local input (`kernels.testing.sink_local_qkv`). (Until the seventeenth session's run 2
  a column held the Hopper kernel followed by a Triton pass that merged the tokens into its
  output, the way before the kernel attended them itself.)
- the attention output's error against dense attention (relative, fp64 norms) with and without the
  correction, on the selected patterns.

A development script (results go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_mean_correction.py [--tokens 16384 65536 131072]
"""

import argparse

import torch

from kernels import FlashPrefillConfig, dense_attention, find_pattern
from kernels.bench import bench_ms, cudnn_dense_ms
from kernels.flash_prefill import api
from kernels.flash_prefill import sparse_attention as attention_kernels
from kernels.testing import random_pattern, random_qkv, relative_error, sink_local_qkv


def times_ms(q, k, v, pattern, scale: float) -> list[float]:
    """cuDNN dense; the pattern on the Hopper kernel, uncorrected and corrected; the same on the
    Triton kernel."""
    def triton_kernel(corrected: bool):
        return attention_kernels.sparse_attention(q, k, v, pattern.kv_num_blocks, pattern.kv_indices, 128, scale,
                                                  d_pad=128, upcast=False, mean_correction=corrected)

    return [
        cudnn_dense_ms(q, k, v),
        bench_ms(lambda: api._sparse_attention_triton(q, k, v, pattern, scale)),
        bench_ms(lambda: api._sparse_attention_triton(q, k, v, pattern, scale, mean_correction=True)),
        bench_ms(lambda: triton_kernel(False)),
        bench_ms(lambda: triton_kernel(True)),
    ]


def errors(q, k, v, pattern, scale: float) -> list[str]:
    """The output's error against dense attention, uncorrected and corrected (Hopper path)."""
    dense = dense_attention(q, k, v, scale)
    return [f"{relative_error(api._sparse_attention_triton(q, k, v, pattern, scale, mean_correction=c), dense):.4f}"
            for c in (False, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.3])
    args = parser.parse_args()
    scale = 128**-0.5
    config = FlashPrefillConfig.for_model("qwen2.5-vl", min_seq_len=0)
    print("| tokens | input | density | cuDNN ms | Hopper kernel ms | Hopper, corrected ms | Triton kernel ms "
          "| Triton, corrected ms | corrected / uncorrected, Hopper | error, uncorrected | error, corrected |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for t in args.tokens:
        q, k, v = random_qkv(1, t, t, 28, 4, 128, dtype=torch.bfloat16, device="cuda", seed=t)
        for d in args.densities:
            pattern = random_pattern(1, 28, t, 128, d, "cuda", seed=t)
            times = times_ms(q, k, v, pattern, scale)
            print(f"| {t} | random | {pattern.density():.1%} | " + " | ".join(f"{x:.3f}" for x in times)
                  + f" | {times[2] / times[1]:.2f} | - | - |", flush=True)
        q, k, v = sink_local_qkv(1, t, t, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda", seed=t)
        pattern = find_pattern(q, k, config)
        times = times_ms(q, k, v, pattern, scale)
        error = errors(q, k, v, pattern, scale)
        print(f"| {t} | sink / local, selected | {pattern.density():.1%} | " + " | ".join(f"{x:.3f}" for x in times)
              + f" | {times[2] / times[1]:.2f} | {' | '.join(error)} |", flush=True)
        del q, k, v, pattern
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
