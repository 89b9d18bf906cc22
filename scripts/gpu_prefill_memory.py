"""GPU memory of a long request, stage by stage, as kept against the way before, alternating:
- as kept: the pixels in the vision tower's dtype (`prefix.pixels_for`), its patch states dropped
  from its output (`prefix.without_patch_states`), windows of unequal lengths gathered at most
  `models.vision.GATHER_TOKENS` tokens at a time, the gated MLPs in chunks of `MLP_CHUNK_BYTES`;
- before: the processor's fp32 pixels, the patch states kept as the model's forward keeps them,
  each window length gathered whole, the MLPs of both towers in chunks of 16,384 tokens.
Per request: the peak of the vision encoder, what is allocated when the language model starts,
the peak of the prefill, the peak the allocator reserved (PYTORCH_CUDA_ALLOC_CONF applies), and
the stages' times. Then the vision tower alone per MLP chunk size.
Qwen2.5-VL-7B architecture, random bf16 weights, VIDEO prepared as the pipeline prepares it.

    PYTHONPATH=$PWD python3 scripts/gpu_prefill_memory.py VIDEO --max-pixels 200704 --fixed-density 0.05
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from videoprefill.bench import add_file_arguments, file_sampling

GIB = 2**30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_file_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-sweep", action="store_true", help="leave out the vision tower's MLP chunk sizes")
    args = parser.parse_args()

    import models.fused as fused
    import models.vision as vision
    from kernels import FlashPrefillConfig
    from videoprefill import prefix
    from videoprefill.bench import cold_qa, markdown_table

    qa = cold_qa()
    sampling = file_sampling(args)
    stock_pixels = prefix.pixels_for
    prefix.pixels_for = lambda model, inputs: inputs  # the processor's fp32 pixels, kept on the host
    kept = qa.prepare(args.video, "Describe this video.", sampling)
    prefix.pixels_for = stock_pixels
    fp32 = kept.inputs.pop("pixel_values_videos").cpu()
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    visual, language = fused.tower(qa.model, "visual"), fused.tower(qa.model, "language_model")

    marks: dict = {}

    def vision_start(module, args):
        torch.cuda.reset_peak_memory_stats()

    def vision_end(module, args, output):
        marks["vision"] = torch.cuda.max_memory_allocated() / GIB
        marks["vision reserved"] = torch.cuda.max_memory_reserved() / GIB

    def prefill_start(module, args):
        if "held" not in marks:  # the prefix's call, not the question's
            marks["held"] = torch.cuda.memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()

    hooks = [visual.register_forward_pre_hook(vision_start), visual.register_forward_hook(vision_end),
             language.register_forward_pre_hook(prefill_start)]
    stock_lean, stock_chunks, stock_gather = prefix.without_patch_states, fused.chunk_tokens, vision.GATHER_TOKENS

    def set_way(way: str) -> None:
        old = way == "before"
        prefix.without_patch_states = (lambda model: contextlib.nullcontext()) if old else stock_lean
        fused.chunk_tokens = (lambda width, dtype: 16384) if old else stock_chunks
        vision.GATHER_TOKENS = 0 if old else stock_gather

    rows, texts = {}, {}
    for repeat in range(args.repeats):
        for mode, fixed in (("sparse", args.fixed_density), ("dense", None)):
            for way in ("kept", "before"):
                set_way(way)
                kept.inputs["pixel_values_videos"] = fp32.cuda()
                if way == "kept":
                    kept.inputs = prefix.pixels_for(qa.model, kept.inputs)
                marks.clear()
                torch.cuda.empty_cache()
                answer = qa.run(kept, mode, max_new_tokens=2, config=config, fixed_density=fixed)
                t = answer.timings
                row = {"attention": mode if fixed is None else f"sparse, fixed {fixed:.0%} (benchmark only)",
                       "way": way, "pixels": str(kept.inputs["pixel_values_videos"].dtype).replace("torch.", ""),
                       "vision peak": marks["vision"], "held": marks["held"],
                       "prefill peak": torch.cuda.max_memory_allocated() / GIB,
                       "reserved": max(marks["vision reserved"], torch.cuda.max_memory_reserved() / GIB),
                       "vision": t["vision_s"], "prefill": t["prefill_s"], "ttft": t["ttft_s"] - t["decode_video_s"]}
                print(repeat, row, flush=True)
                texts.setdefault((mode, way), set()).add(answer.text)
                key = (row["attention"], way)
                if key not in rows or row["prefill"] + row["vision"] < rows[key]["prefill"] + rows[key]["vision"]:
                    rows[key] = row
    set_way("kept")
    for h in hooks:
        h.remove()
    print(f"video tokens {kept.tokens['video']}; answers per (mode, way): {texts}")
    print(markdown_table(list(rows.values()), [
        ("attention", "attention", ""), ("way", "way", ""), ("pixels", "pixels", ""),
        ("vision peak GiB", "vision peak", ".2f"), ("allocated at prefill start GiB", "held", ".2f"),
        ("prefill peak GiB", "prefill peak", ".2f"), ("reserved peak GiB", "reserved", ".2f"),
        ("vision s", "vision", ".3f"), ("LLM prefill s", "prefill", ".3f"), ("TTFT without decode s", "ttft", ".3f")]))

    kept.inputs.pop("pixel_values_videos")
    if args.no_sweep:
        return 0
    x = fp32.to("cuda", visual.dtype)
    grid = kept.inputs["video_grid_thw"]
    sweep = []
    for label, rows_per_chunk in (("16,384 tokens (before)", 16384), ("MLP_CHUNK_BYTES (kept)", None),
                                  ("all at once", 0)):
        fused.chunk_tokens = stock_chunks if rows_per_chunk is None else (lambda w, d, n=rows_per_chunk: n)
        best = float("inf")
        for _ in range(4):  # the first untimed
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with torch.inference_mode():
                visual(x, grid_thw=grid)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start) if _ else best
        sweep.append({"chunks": label, "tokens": rows_per_chunk if rows_per_chunk is not None
                      else stock_chunks(visual.blocks[0].mlp.gate_proj.out_features, x.dtype),
                      "seconds": best, "peak": torch.cuda.max_memory_allocated() / GIB})
        print(sweep[-1], flush=True)
    fused.chunk_tokens = stock_chunks
    print(f"vision tower alone over {x.shape[0]} patch tokens:")
    print(markdown_table(sweep, [("vision MLP chunks", "chunks", ""), ("tokens per chunk", "tokens", "d"),
                                 ("vision tower s", "seconds", ".3f"), ("peak GiB", "peak", ".2f")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
