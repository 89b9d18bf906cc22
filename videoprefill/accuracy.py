"""Needle-in-a-video-haystack accuracy: python -m videoprefill.bench accuracy

Held-out procedural videos (videoprefill.synthetic, seeds training never uses) at several lengths
and needle depths. For each: the dense answer, and FlashPrefill's at a sweep of alpha; accuracy,
agreement with dense, the density selected, and the relative error of each layer's attention
output against dense attention on the same inputs. Writes a JSON file and a heatmap
(length x depth, like the LongVA needle benchmark). Runs on CPU for short videos and on a GPU for
long ones; the inputs are built from the frames directly (no video file in between).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict

import numpy as np
import torch

from kernels import FlashPrefillConfig

from .run import add_model_arguments
from .synthetic import check_frame_counts, is_correct, needle
from .train_demo import HELD_OUT_SEED, encode


def run_one(model, processor, inputs, mode: str, config, max_new_tokens: int = 3,
            one_call: bool = False) -> tuple[str, float, dict]:
    """One answer as the pipeline computes it: the video prefix, then the question over its KV
    cache (videoprefill.prefix); one_call: one `generate` over the whole prompt instead."""
    from models.attention import RequestSettings, SparsityRecorder, request_settings, set_attention

    from . import prefix as prefixes

    set_attention(model, "dense" if mode == "dense" else "sparse")
    settings = RequestSettings(config=config, recorder=SparsityRecorder(),
                               output_errors={} if mode != "dense" else None)
    options = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": processor.tokenizer.pad_token_id}
    with torch.inference_mode(), request_settings(settings):
        if one_call:
            out = model.generate(**inputs, **options)
        else:
            length = prefixes.prefix_length(inputs["input_ids"], model.config.video_token_id)
            positions = prefixes.prompt_positions(model, inputs)
            cache = prefixes.prefill_prefix(model, inputs, length, positions)
            out = prefixes.generate_over_prefix(model, inputs, length, cache, positions, **options)
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    density = settings.recorder.finish()["density"] if mode != "dense" else 1.0
    return text, density, settings.output_errors or {}


def heatmap(cells: dict, lengths: list[int], depths: list[float], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array([[cells.get((n, d), np.nan) for n in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.8))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("frames")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m videoprefill.bench accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 128, 256],
                   help="frames (8 tokens per 2; default: 16 64 128 256)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="where the flash sits, as a fraction of the video (default: 0 0.25 0.5 0.75 1)")
    p.add_argument("--per-cell", type=int, default=4, help="videos per (length, depth) (default: 4)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4],
                   help="FlashPrefill alphas to sweep (default: 0.05 0.1 0.2 0.4)")
    p.add_argument("--block-size", type=int, help="sparsity block (default: the model's preset)")
    p.add_argument("--multiple-choice", action="store_true",
                   help="ask for an option letter instead of the colour word")
    p.add_argument("--pattern-per-kv-head", "--per-kv-head", dest="per_kv_head", action="store_true",
                   help="also run each alpha with one pattern per KV head (pattern_per_kv_head=True)")
    p.add_argument("--mean-correction", action="store_true",
                   help="also run each alpha with the pruned blocks' mean correction (mean_correction=True)")
    p.add_argument("--one-call", action="store_true",
                   help="prefill each prompt in one generate call, not as the pipeline does (the video prefix, "
                        "then the question over its cache)")
    p.add_argument("--json", default="accuracy.json", help="results file (default: accuracy.json)")
    p.add_argument("--heatmap", default="accuracy.png",
                   help="length x depth accuracy heatmap (default: accuracy.png)")
    return p


def check_args(args) -> None:
    """ValueError naming the first option the sweep cannot run with (before any model loads)."""
    check_frame_counts("--lengths", args.lengths)
    bad_depths = [d for d in args.depths if not 0.0 <= d <= 1.0]
    if bad_depths:
        raise ValueError(f"--depths must be fractions in [0, 1], got {bad_depths[0]}")
    if args.per_cell < 1:
        raise ValueError(f"--per-cell must be >= 1, got {args.per_cell}")
    if args.block_size is not None:
        FlashPrefillConfig(block_size=args.block_size)  # (its own check: a power of two in [16, 256])
    for a in args.alphas:
        FlashPrefillConfig(alpha=a)  # (in [0, 1])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from models import ModelLoadError, load
    from videoprefill import quiet_libraries

    quiet_libraries()
    try:
        model, processor = load(args.model, device=args.device, dtype=args.dtype)
        # The sparse path at every length: this measures what sparsity costs, not the dense floor.
        base = dataclasses.replace(model.videoprefill.config, min_seq_len=0)
        if args.block_size is not None:
            base = dataclasses.replace(base, block_size=args.block_size)
        # (label suffix, config changes) of each variant asked for, every alpha of each
        variants = [("", {})]
        variants += [(", per KV head", {"pattern_per_kv_head": True})] if args.per_kv_head else []
        variants += [(", mean correction", {"mean_correction": True})] if args.mean_correction else []
        configs = {f"alpha={a}{suffix}": dataclasses.replace(base, alpha=a, **changes)
                   for suffix, changes in variants for a in args.alphas}
    except (ModelLoadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # (Triton launches on the current device; `--device cuda:N`)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    modes = ["dense", *configs]
    rows = []
    started = time.perf_counter()
    for n in args.lengths:
        for d in args.depths:
            for i in range(args.per_cell):
                s = needle(HELD_OUT_SEED + 7919 * n + 104729 * int(d * 1000) + i, n, depth=d,
                           multiple_choice=args.multiple_choice)
                inputs = encode(processor, s, False, device)
                row = {"frames": n, "depth": d, "seed": s.seed, "tokens": int(inputs["input_ids"].shape[1]),
                       "answer": s.answer}
                for mode in modes:
                    text, density, errors = run_one(model, processor, inputs, mode, configs.get(mode, base),
                                                    one_call=args.one_call)
                    row[mode] = {"output": text, "correct": is_correct(s, text), "density": density,
                                 "output_rel_error": errors}
                rows.append(row)
            print(f"  {n} frames, depth {d:.2f}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
                  flush=True)

    summary = {}
    for mode in modes:
        correct = [r[mode]["correct"] for r in rows]
        agree = [r[mode]["output"] == r["dense"]["output"] for r in rows]
        layer_err = defaultdict(list)
        for r in rows:
            for layer, e in r[mode]["output_rel_error"].items():
                layer_err[int(layer)].append(e)
        summary[mode] = {
            "accuracy": float(np.mean(correct)), "agreement_with_dense": float(np.mean(agree)),
            "density": float(np.mean([r[mode]["density"] for r in rows])),
            "output_rel_error_per_layer": {k: float(np.mean(v)) for k, v in sorted(layer_err.items())},
            "by_length": {n: float(np.mean([r[mode]["correct"] for r in rows if r["frames"] == n]))
                          for n in args.lengths},
        }
    print(f"model {args.model} ({dtype}), {len(rows)} held-out needle videos, block {base.block_size}, "
          f"{time.perf_counter() - started:.0f} s")
    print("| attention | accuracy | agreement with dense | density | attention-output rel. error per layer |")
    print("|---|---|---|---|---|")
    for mode, s in summary.items():
        errs = " ".join(f"{e:.3f}" for e in s["output_rel_error_per_layer"].values()) or "-"
        print(f"| {mode} | {s['accuracy']:.1%} | {s['agreement_with_dense']:.1%} | {s['density']:.1%} | {errs} |")
    print("accuracy by length: " + "; ".join(
        f"{mode}: " + ", ".join(f"{n}f {a:.0%}" for n, a in s["by_length"].items()) for mode, s in summary.items()))
    default_mode = f"alpha={base.alpha}" if f"alpha={base.alpha}" in modes else modes[-1]
    for mode, path in (("dense", args.heatmap.replace(".png", "-dense.png")), (default_mode, args.heatmap)):
        cells = {(n, d): float(np.mean([r[mode]["correct"] for r in rows if r["frames"] == n and r["depth"] == d]))
                 for n in args.lengths for d in args.depths}
        heatmap(cells, args.lengths, args.depths, f"needle accuracy, {mode}", path)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "model_dtype": dtype, "config": dataclasses.asdict(base), "summary": summary,
                   "rows": rows}, f, indent=1, default=str)
    print(f"wrote {args.json}, {args.heatmap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
