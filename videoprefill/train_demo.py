"""Train the offline demo model on procedural videos: python -m videoprefill.train_demo --out DIR

A small Qwen2.5-VL (the architecture of models/tiny.py, its local tokenizer and processor) learns
the tasks of videoprefill.synthetic from scratch with dense attention, the way real checkpoints
are trained; FlashPrefill is applied at inference. Deterministic from --seed; resumable
(--resume reads DIR/checkpoint.pt). Held-out accuracy is measured on seeds training never uses
and written, with the command, into DIR/videoprefill.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .synthetic import TRAINING_MIX, VIDEO_FPS, Sample, check_frame_counts, count, is_correct, needle, prompt_text
from .synthetic import sample as draw_sample

HELD_OUT_SEED = 1_000_000


def encode(processor, s: Sample, with_answer: bool, device) -> dict:
    """Model inputs for a sample, as the pipeline builds them (2 fps, every frame, no resize)."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt_text(s)}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if with_answer:
        text += s.answer + "<|im_end|>"
    video = torch.from_numpy(s.frames).permute(0, 3, 1, 2).float()
    meta = {"fps": float(VIDEO_FPS), "frames_indices": list(range(s.num_frames)), "total_num_frames": s.num_frames}
    inputs = processor(text=[text], videos=[video], video_metadata=[meta], do_resize=False, do_sample_frames=False,
                       return_tensors="pt")
    return {k: v.to(device) for k, v in inputs.items()}


def labels_for(processor, inputs: dict, answer: str) -> torch.Tensor:
    """Loss on the answer and the end-of-turn token only."""
    n = len(processor.tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -n:] = inputs["input_ids"][:, -n:]
    return labels


EVAL_TASKS = {
    "needle_mc": lambda seed, n: needle(seed, n, multiple_choice=True),
    "needle_short": lambda seed, n: needle(seed, n, multiple_choice=False),
    "count": lambda seed, n: count(seed, n),
}


@torch.inference_mode()
def evaluate(model, processor, lengths: list[int], per_length: int, device, seed: int = HELD_OUT_SEED) -> dict:
    """Held-out accuracy per task and length (seeds from HELD_OUT_SEED up; training stays below)."""
    model.eval()
    result: dict = {}
    for task, make in EVAL_TASKS.items():
        result[task] = {}
        for length in lengths:
            hits = 0
            for i in range(per_length):
                s = make(seed + 1000 * length + i, length)
                inputs = encode(processor, s, False, device)
                out = model.generate(**inputs, max_new_tokens=3, do_sample=False,
                                     pad_token_id=processor.tokenizer.pad_token_id)
                text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                hits += is_correct(s, text)
            result[task][length] = hits / per_length
    model.train()
    return result


def check_args(args) -> None:
    """ValueError naming the first option training cannot run with."""
    for name in ("steps", "accumulate", "eval_every", "eval_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.min_frames < 2 or args.max_frames < args.min_frames:
        raise ValueError(f"frames must satisfy 2 <= --min-frames <= --max-frames, got {args.min_frames} and "
                         f"{args.max_frames}")
    check_frame_counts("--eval-lengths", args.eval_lengths)
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m videoprefill.train_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the trained model (and checkpoint.pt)")
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps (default: 3000)")
    p.add_argument("--accumulate", type=int, default=4, help="samples per optimiser step (default: 4)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine schedule (default: 0.002)")
    p.add_argument("--min-frames", type=int, default=8, help="fewest frames of a training video (default: 8)")
    p.add_argument("--max-frames", type=int, default=64, help="most frames of a training video (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and training samples (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--eval-every", type=int, default=500, help="held-out evaluation every N steps (default: 500)")
    p.add_argument("--eval-lengths", type=int, nargs="+", default=[16, 64, 128],
                   help="frames of the held-out videos (default: 16 64 128)")
    p.add_argument("--eval-samples", type=int, default=40, help="held-out videos per task and length (default: 40)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0, torch's default)")
    args = p.parse_args(argv)
    try:
        check_args(args)
        from models.loader import resolve_device

        args.device = resolve_device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: cannot create the folder {args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from models.tiny import build_tiny, model_class

    out = Path(args.out)
    if not (out / "config.json").exists():
        build_tiny("qwen2.5-vl", out / "init", seed=args.seed)
        for f in (out / "init").iterdir():
            f.replace(out / f.name)
        (out / "init").rmdir()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    processor = transformers.AutoProcessor.from_pretrained(out)
    model = model_class("qwen2.5-vl").from_pretrained(out, dtype=torch.float32,
                                                      attn_implementation="sdpa").to(args.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    step = 0
    history = []
    ckpt = out / "checkpoint.pt"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, map_location=args.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        history = state.get("history", [])
        print(f"resumed at step {step}")
    warmup = max(1, args.steps // 20)

    def lr_at(i: int) -> float:
        if i < warmup:
            return args.lr * (i + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, args.steps - warmup)))

    rng = np.random.default_rng(args.seed + step)
    started = time.perf_counter()
    losses: list[float] = []
    while step < args.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        for k in range(args.accumulate):
            frames = 2 * int(rng.integers(args.min_frames // 2, args.max_frames // 2 + 1))
            s = draw_sample(args.seed * 10_000_019 + step * args.accumulate + k, frames)
            inputs = encode(processor, s, True, args.device)
            loss = model(**inputs, labels=labels_for(processor, inputs, s.answer)).loss / args.accumulate
            loss.backward()
            losses.append(loss.item() * args.accumulate)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {np.mean(losses[-50 * args.accumulate:]):.4f} lr {lr_at(step):.2e} "
                  f"{time.perf_counter() - started:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(model, processor, args.eval_lengths, args.eval_samples, args.device)
            history.append({"step": step, "held_out_accuracy": acc})
            print(f"step {step} held-out accuracy {acc}", flush=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "history": history},
                       ckpt)

    model.save_pretrained(out, safe_serialization=True)
    record = {
        "family": "qwen2.5-vl", "trained": True, "seed": args.seed, "steps": args.steps,
        "command": "python -m videoprefill.train_demo " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "train_seconds": round(time.perf_counter() - started, 1), "device": str(args.device),
        "held_out_seed": HELD_OUT_SEED, "task_mix": TRAINING_MIX, "history": history,
        "final_held_out_accuracy": history[-1]["held_out_accuracy"] if history else None,
    }
    (out / "videoprefill.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record["final_held_out_accuracy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
