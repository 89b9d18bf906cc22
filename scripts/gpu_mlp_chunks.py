"""The gated MLPs over a long prefill in chunks of at most MLP_CHUNK_BYTES (as kept) against all
tokens at once (as before): peak GPU memory and time of whole requests, alternating. Qwen2.5-VL-7B
architecture, random bf16 weights, a synthetic request of VIDEO_TOKENS video tokens.

    PYTHONPATH=$PWD python3 scripts/gpu_mlp_chunks.py --video-tokens 131072 --fixed-density 0.05
"""

from __future__ import annotations

import argparse

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video-tokens", type=int, default=131072)
    parser.add_argument("--fixed-density", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import models.fused as fused
    from kernels import FlashPrefillConfig
    from videoprefill.bench import cold_qa, markdown_table, synthetic_request

    qa = cold_qa()
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    prepared = synthetic_request(qa, args.video_tokens)
    kept = fused.MLP_CHUNK_BYTES
    rows = []
    for mode, fixed in (("sparse", args.fixed_density), ("dense", None)):
        label = mode if fixed is None else f"sparse, fixed {fixed:.0%} (benchmark only)"
        best: dict = {}
        for _ in range(args.repeats):
            for chunk in (kept, 0):
                fused.MLP_CHUNK_BYTES = chunk
                torch.cuda.reset_peak_memory_stats()
                answer = qa.run(prepared, mode, max_new_tokens=2, config=config, fixed_density=fixed)
                t = answer.timings
                mlp = f"chunks of {chunk / 2**30:.2f} GiB" if chunk else "all tokens at once"
                row = {"attention": label, "mlp": mlp,
                       "vision": t["vision_s"], "prefill": t["prefill_s"],
                       "peak": torch.cuda.max_memory_allocated() / 2**30}
                print(row, flush=True)
                if chunk not in best or row["prefill"] < best[chunk]["prefill"]:
                    best[chunk] = {**row, "peak": max(row["peak"], best.get(chunk, row)["peak"])}
        rows += [best[kept], best[0]]
    fused.MLP_CHUNK_BYTES = kept
    print(f"video tokens {prepared.tokens['video']}")
    print(markdown_table(rows, [("attention", "attention", ""), ("gated MLPs", "mlp", ""),
                                ("vision s", "vision", ".3f"), ("LLM prefill s", "prefill", ".3f"),
                                ("peak GiB", "peak", ".2f")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
