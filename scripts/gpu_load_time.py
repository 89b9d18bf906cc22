"""How long a checkpoint takes to load, the way `models.load` reads it: a Qwen2.5-VL-7B-architecture
checkpoint (random bf16 weights, written here with the bench's locally built tokenizer) read from
disk in fresh processes, each way timed by phase, and the CLI's whole run over it.

    PYTHONPATH=$PWD python3 scripts/gpu_load_time.py make /tmp/ckpt
    PYTHONPATH=$PWD python3 scripts/gpu_load_time.py time /tmp/ckpt --ways cpu direct load --processes 2

Ways: "cpu" reads the weights into host memory and then moves the model (`from_pretrained` then
`.to(device)`); "direct" reads them onto the device (`device_map`); "load" is `models.load` as the
code has it. Each process prints one JSON line: seconds per phase and the peak host memory (RSS).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def make(folder: str) -> None:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from models.tiny import build_processor, build_tokenizer
    from videoprefill.bench import config_7b

    tokenizer = build_tokenizer()
    config = config_7b(tokenizer)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    build_processor("qwen2.5-vl", tokenizer).save_pretrained(folder)
    print(json.dumps({"made": folder, "s": round(time.perf_counter() - start, 1),
                      "parameters": sum(p.numel() for p in model.parameters())}))


def child(folder: str, way: str, device: str) -> None:
    start = time.perf_counter()
    import torch
    import transformers

    import models
    from models.attention import register
    from models.text import prepare_language_model
    from models.vision import prepare_vision_tower

    times = {"import": time.perf_counter() - start}

    def mark(name):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times[name] = time.perf_counter() - start - sum(times.values())

    if way == "load":
        model, _ = models.load(folder, device=device)
        mark("load")
    else:
        name = register()
        extra = {"device_map": device} if way == "direct" else {}
        model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder, dtype=torch.bfloat16, attn_implementation={"text_config": name, "vision_config": "sdpa"}, **extra)
        mark("from_pretrained")
        transformers.AutoProcessor.from_pretrained(folder)
        mark("processor")
        model = model.to(device).eval()
        mark("to_device")
        prepare_vision_tower(model)
        mark("prepare_vision")
        prepare_language_model(model)
        mark("prepare_language")
    where = {p.device.type for p in model.parameters()}
    print(json.dumps({"way": way, **{k: round(v, 3) for k, v in times.items()},
                      "total": round(time.perf_counter() - start, 3), "devices": sorted(where),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                      "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                      if device.startswith("cuda") else None}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("make", "time", "child"))
    parser.add_argument("folder")
    parser.add_argument("--ways", nargs="+", default=["cpu", "direct", "load"])
    parser.add_argument("--way")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.action == "make":
        make(args.folder)
    elif args.action == "child":
        child(args.folder, args.way, args.device)
    else:
        for _ in range(args.processes):
            for way in args.ways:
                subprocess.run([sys.executable, __file__, "child", args.folder, "--way", way, "--device", args.device],
                               check=True)


if __name__ == "__main__":
    main()
