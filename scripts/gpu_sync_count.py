"""Where a request waits for the GPU: the host synchronisations of a first question about a video
file (prepare, then run) and of a later question, counted with PyTorch's sync-debug mode and
grouped by the innermost line of this project or transformers that made them. Qwen2.5-VL-7B
architecture, random bf16 weights.

    PYTHONPATH=$PWD python3 scripts/gpu_sync_count.py VIDEO --max-frames 256 --max-pixels 200704
"""

from __future__ import annotations

import argparse
import collections
import os
import traceback
import warnings

import torch

from videoprefill.bench import add_file_arguments, file_sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _site(stack) -> str:
    """The innermost frame in this project or transformers (torch's own frames skipped)."""
    for frame in reversed(stack):
        name = frame.filename
        if (name.startswith(ROOT) and "/scripts/" not in name) or "/transformers/" in name:
            short = name[len(ROOT) + 1:] if name.startswith(ROOT) else name[name.index("transformers/"):]
            return f"{short}:{frame.lineno} {frame.name}"
    return "elsewhere"


def counted(step):
    sites: collections.Counter = collections.Counter()
    previous = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites[_site(traceback.extract_stack()[:-1])] += 1

    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            result = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = previous
    return result, sites


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_file_arguments(parser, max_frames=256)
    args = parser.parse_args()

    from kernels import FlashPrefillConfig
    from videoprefill.bench import build_7b
    from videoprefill.pipeline import VideoQA

    model, processor = build_7b()
    qa = VideoQA(model, processor, mask_layers=(), warmup=True)
    sampling = file_sampling(args)
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    run = {"config": config, "fixed_density": args.fixed_density, "max_new_tokens": 2}
    qa.run(qa.prepare(args.video, "Describe this video.", sampling), "sparse", **run)  # warm
    qa.forget_prefix()
    prepared, prepare_sites = counted(lambda: qa.prepare(args.video, "Describe this video.", sampling))
    answer, run_sites = counted(lambda: qa.run(prepared, "sparse", **run))
    later, later_sites = counted(lambda: qa.run(qa.prepare(args.video, "What happens at the end?", sampling),
                                                "sparse", **run))
    print(f"video tokens {answer.tokens['video']}, later question cached tokens {later.tokens['cached']}")
    for label, sites in (("first question: prepare", prepare_sites), ("first question: run", run_sites),
                         ("later question: prepare and run", later_sites)):
        print(f"\n{label}: {sum(sites.values())} synchronisations")
        for site, count in sites.most_common(12):
            print(f"  {count:5d}  {site}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
