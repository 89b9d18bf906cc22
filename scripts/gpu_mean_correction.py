"""What the mean correction of pruned blocks (FlashPrefillConfig.mean_correction) costs and what it
buys, at the Qwen2.5-VL-7B attention shape (28 query / 4 KV heads, head dim 128, bf16, block 128):

- time (median of `kernels.bench.bench_ms`) of cuDNN dense, of the attention over a pattern on the
  Hopper kernel uncorrected (the default) and corrected (the tokens attended inside the kernel
  after each item's kept blocks: what `flash_prefill` runs on Hopper; and the kernel writing each
  row's log-sum-exp, then the correction pass merging the pruned blocks' tokens into its output,
  64 block means a product), and on the Triton kernel uncorrected and corrected (the tokens
  attended inside the kernel: what it runs elsewhere), each with its kept-block map and block
  means, on random block masks and on the patterns FlashPrefill selects on sink / local input
  (`kernels.testing.sink_local_qkv`);
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
from kernels.flash_prefill.sparse_attention_sm90 import sparse_attention_sm90
from kernels.testing import random_pattern, random_qkv, relative_error, sink_local_qkv


def times_ms(q, k, v, pattern, scale: float) -> list[float]:
    """cuDNN dense; the pattern on the Hopper kernel, uncorrected and corrected; the same on the
    Triton kernel."""
    def triton_kernel(corrected: bool):
        return attention_kernels.sparse_attention(q, k, v, pattern.kv_num_blocks, pattern.kv_indices, 128, scale,
                                                  d_pad=128, upcast=False, mean_correction=corrected)

    def hopper_and_pass(means_per_step: int):
        lse = torch.empty(1, q.shape[2], q.shape[1], device="cuda")
        out = sparse_attention_sm90(q, k, v, pattern.kv_num_blocks, pattern.kv_indices, scale, lse=lse)
        return attention_kernels.mean_correction(q, k, v, out, lse, pattern.kv_num_blocks, pattern.kv_indices, 128,
                                                 scale, d_pad=128, upcast=False, means_per_step=means_per_step)

    return [
        cudnn_dense_ms(q, k, v),
        bench_ms(lambda: api._sparse_attention_triton(q, k, v, pattern, scale)),
        bench_ms(lambda: api._sparse_attention_triton(q, k, v, pattern, scale, mean_correction=True)),
        bench_ms(lambda: hopper_and_pass(64)),
        bench_ms(lambda: triton_kernel(False)),
        bench_ms(lambda: triton_kernel(True)),
    ]


def errors(q, k, v, pattern, scale: float) -> list[str]:
    """The output's error against dense attention: uncorrected, corrected inside the Hopper kernel,
    corrected by the pass after it."""
    dense = dense_attention(q, k, v, scale)
    lse = torch.empty(1, q.shape[2], q.shape[1], device="cuda")
    out = sparse_attention_sm90(q, k, v, pattern.kv_num_blocks, pattern.kv_indices, scale, lse=lse)
    passed = attention_kernels.mean_correction(q, k, v, out, lse, pattern.kv_num_blocks, pattern.kv_indices, 128,
                                               scale, d_pad=128, upcast=False)
    outs = [api._sparse_attention_triton(q, k, v, pattern, scale, mean_correction=c) for c in (False, True)]
    return [f"{relative_error(o, dense):.4f}" for o in (*outs, passed)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.3])
    args = parser.parse_args()
    scale = 128**-0.5
    config = FlashPrefillConfig.for_model("qwen2.5-vl", min_seq_len=0)
    print("| tokens | input | density | cuDNN ms | Hopper kernel ms | Hopper, corrected inside ms "
          "| Hopper + correction pass ms | Triton kernel ms | Triton, corrected ms | corrected / uncorrected, Hopper "
          "| error, uncorrected | error, corrected | error, kernel + pass |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in args.tokens:
        q, k, v = random_qkv(1, t, t, 28, 4, 128, dtype=torch.bfloat16, device="cuda", seed=t)
        for d in args.densities:
            pattern = random_pattern(1, 28, t, 128, d, "cuda", seed=t)
            times = times_ms(q, k, v, pattern, scale)
            print(f"| {t} | random | {pattern.density():.1%} | " + " | ".join(f"{x:.3f}" for x in times)
                  + f" | {times[2] / times[1]:.2f} | - | - | - |", flush=True)
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
