"""Benchmarks: `python -m videoprefill.bench [prefill]` and `python -m videoprefill.bench accuracy`.

prefill: end-to-end prefill timing on a GPU.

Builds a model of the Qwen2.5-VL-7B architecture (its published config written here, random
bf16 weights: no download) and the local processor, feeds synthetic video frames sized to give
the requested number of video tokens, and times the pipeline's stages (vision encoder, LLM
prefill, first token) for dense and FlashPrefill attention. Random weights attend almost
uniformly, so FlashPrefill keeps most blocks here: the densities printed are what this model
selects, not what a trained checkpoint selects.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

QWEN25_VL_7B = {
    "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6, vocab_size=152064,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
}


def config_7b(tokenizer):
    """The Qwen2.5-VL-7B architecture's config with the ids of `tokenizer` (`models.tiny.build_tokenizer`)."""
    from transformers import Qwen2_5_VLConfig

    from models.tiny import _ids

    config = Qwen2_5_VLConfig(text_config=QWEN25_VL_7B["text"], vision_config=QWEN25_VL_7B["vision"],
                              **_ids(tokenizer))
    config.text_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.text_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return config


def build_7b(device: str = "cuda"):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from models.attention import register
    from models.text import prepare_language_model
    from models.tiny import build_processor, build_tokenizer
    from models.vision import prepare_vision_tower

    tokenizer = build_tokenizer()
    config = config_7b(tokenizer)
    name = register()
    config._attn_implementation = {"text_config": name, "vision_config": "sdpa"}
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation={"text_config": name, "vision_config": "sdpa"}
        )
    prepare_vision_tower(model)
    prepare_language_model(model)
    return model.eval(), build_processor("qwen2.5-vl", tokenizer)


def synthetic_request(qa, video_tokens: int, side: int = 448, question: str = "Describe this video."):
    """A Prepared request whose video gives `video_tokens` tokens (frames of side x side), asking `question`."""
    from videoprefill.pipeline import Prepared, _runs
    from videoprefill.prefix import pixels_for
    from videoprefill.video import VideoInfo

    per_pair = (side // 28) ** 2
    frames = 2 * max(1, round(video_tokens / per_pair))
    video = torch.randint(0, 255, (frames, 3, side, side), dtype=torch.uint8).float()
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    prompt = qa.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = qa.processor(text=[prompt], videos=[video], do_resize=False, return_tensors="pt",
                          do_sample_frames=False, **qa.processor_device()).to(qa.device)
    inputs = pixels_for(qa.model, dict(inputs))  # as VideoQA.prepare_decoded
    ids = inputs["input_ids"][0]
    is_video = ids == qa.video_token_id
    n = int(is_video.sum())
    ranges = _runs(is_video)
    info = VideoInfo("synthetic", frames, 2.0, side, side)
    return Prepared(info, question, inputs, 0.0,
                    {"video": n, "text": int(ids.numel()) - n, "total": int(ids.numel())}, ranges, frames,
                    prefix_len=ranges[-1][1], video_key=("synthetic", video_tokens, side))


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table of `rows`, one column per (title, key, format spec)."""
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format(r[key], spec) for _, key, spec in columns) + " |" for r in rows]
    return "\n".join(lines)


def warm_up(qa) -> None:
    """Both attention modes once on a short synthetic request, FlashPrefill forced on (min_seq_len
    0), the sparse mode so once more with the pattern kernels' plain launches (their variants past
    32K keys) and once more as configured (dense attention below min_seq_len), as
    `VideoQA.warm_up` does: compiles and loads the kernels (the graph-decoding steps' too) and
    warms cuDNN before anything is timed."""
    from kernels import FlashPrefillConfig
    from kernels.flash_prefill.api import plain_pattern_launches

    warm = synthetic_request(qa, 4096)
    forced = FlashPrefillConfig.for_model("qwen2.5-vl", min_seq_len=0)
    for mode in ("dense", "sparse"):  # (3 tokens: decoding steps captured and replayed, models.decode)
        qa.run(warm, mode, max_new_tokens=3, config=forced)
    with plain_pattern_launches():
        qa.run(warm, "sparse", max_new_tokens=2, config=forced)
    qa.run(warm, "sparse", max_new_tokens=2, config=FlashPrefillConfig.for_model("qwen2.5-vl"))


def cold_qa():
    """A VideoQA over the 7B-architecture model (`build_7b`) whose every request is cold (its video
    prefix computed, nothing kept), with the kernels compiled and cuDNN warmed (`warm_up`)."""
    from videoprefill.pipeline import VideoQA

    model, processor = build_7b()
    qa = VideoQA(model, processor, mask_layers=(), warmup=False)  # warmed explicitly
    qa.prefix_cache = False
    warm_up(qa)
    return qa


def add_file_arguments(parser: argparse.ArgumentParser, max_frames: int = 2048) -> None:
    """The arguments of the GPU scripts that time requests on a video file: VIDEO, how its frames
    are sampled (`file_sampling`) and the benchmark-only fixed density of sparse requests."""
    parser.add_argument("video")
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--max-frames", type=int, default=max_frames)
    parser.add_argument("--max-pixels", type=int, default=448 * 448)
    parser.add_argument("--fixed-density", type=float, default=0.05)


def file_sampling(args):
    """Frames at --fps, at most --max-frames of them, each of at most --max-pixels, and no pixel cap
    over the clip beyond that (as scripts/gpu_decode_profile.py samples)."""
    from videoprefill.video import Sampling

    return Sampling(fps=args.fps, max_frames=args.max_frames, max_pixels=args.max_pixels,
                    total_pixels=args.max_frames * args.max_pixels)


def _row(prepared, label: str, answer) -> dict:
    t = answer.timings
    row = {"video_tokens": prepared.tokens["video"], "total_tokens": prepared.tokens["total"], "attention": label,
           "density": answer.sparsity["density"], "cached_tokens": answer.tokens["cached"],
           "vision_s": t["vision_s"], "prefill_s": t["prefill_s"], "first_token_s": t["first_token_s"],
           "ttft_without_decode_s": t["ttft_s"] - t["decode_video_s"],
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(row, flush=True)
    return row


def check_prefill_args(args) -> None:
    """ValueError naming the first option `prefill` cannot run with (checked on any machine)."""
    bad = [n for n in args.video_tokens if n < 1]
    if bad:
        raise ValueError(f"--video-tokens must be at least 1, got {bad[0]}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    bad = [d for d in args.fixed_density if not 0.0 < d <= 1.0]
    if bad:
        raise ValueError(f"--fixed-density must be in (0, 1], got {bad[0]}")


def prefill_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m videoprefill.bench prefill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video-tokens", type=int, nargs="+", default=[16384, 65536],
                        help="video tokens per request (default: 16384 65536)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed requests per row, the fastest reported (default: 2)")
    parser.add_argument("--fixed-density", type=float, nargs="*", default=[],
                        help="benchmark only: also time sparse prefill with random blocks at these densities")
    parser.add_argument("--stock-vision", action="store_true",
                        help="also time dense prefill with the vision tower as transformers runs it (one SDPA "
                             "call per window or frame, MLP width 3420, fp32 rotary and RMSNorm chains, Conv3d "
                             "patch embedding): the baseline of models.vision")
    parser.add_argument("--stock-text", action="store_true",
                        help="also time dense prefill with the language model's RMSNorms and MLP activations as "
                             "transformers runs them (the baseline of models.text); with --stock-vision, one row "
                             "with both towers as transformers runs them")
    parser.add_argument("--later-question", action="store_true",
                        help="also time a second question about the same video, its video prefix kept from the "
                             "first (videoprefill.prefix): what a user asking again waits")
    parser.add_argument("--mean-correction", action="store_true",
                        help="also time the sparse rows with the pruned blocks' mean correction (mean_correction=True)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    try:
        check_prefill_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("videoprefill.bench needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers
    import triton

    from kernels import FlashPrefillConfig
    from models.text import prepare_language_model
    from models.vision import prepare_vision_tower

    qa = cold_qa()
    model = qa.model
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    header = (f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
              f"transformers {transformers.__version__}; Qwen2.5-VL-7B architecture, random bf16 weights; {config}")
    print(header)
    rows = []
    corrected = dataclasses.replace(config, mean_correction=True)
    if args.mean_correction:  # its kernels compiled before anything is timed, as warm_up does for the rest
        qa.run(synthetic_request(qa, 4096), "sparse", max_new_tokens=2,
               config=dataclasses.replace(corrected, min_seq_len=0), fixed_density=0.3)
    # (attention mode, fixed density or None, the vision tower / the language model as transformers runs it,
    # the FlashPrefill settings)
    sparse = [("sparse", None), *(("sparse", d) for d in args.fixed_density)]
    runs = [("dense", None, False, False, config), *((m, d, False, False, config) for m, d in sparse)]
    if args.mean_correction:
        runs += [(m, d, False, False, corrected) for m, d in sparse]
    if args.stock_vision or args.stock_text:
        runs.append(("dense", None, args.stock_vision, args.stock_text, config))
    for tokens in args.video_tokens:
        prepared = synthetic_request(qa, tokens)
        for mode, fixed, stock_vision, stock_text, settings in runs:
            prepare_vision_tower(model, enabled=not stock_vision)
            prepare_language_model(model, enabled=not stock_text)
            label = mode if fixed is None else f"sparse, fixed {fixed:.0%} (benchmark only)"
            label += ", mean correction" if settings.mean_correction else ""
            label += ", stock vision tower" if stock_vision else ""
            label += ", stock language model" if stock_text else ""
            best = None
            for _ in range(args.repeats):
                answer = qa.run(prepared, mode, max_new_tokens=2, config=settings, fixed_density=fixed)
                if best is None or answer.timings["prefill_s"] < best.timings["prefill_s"]:
                    best = answer
            rows.append(_row(prepared, label, best))
            torch.cuda.reset_peak_memory_stats()
            if args.later_question and not (stock_vision or stock_text):
                qa.run(prepared, mode, max_new_tokens=2, config=settings, fixed_density=fixed, reuse_prefix=True)
                later = qa.follow_up(prepared, "What happens at the end of this video?")
                best = None
                for _ in range(args.repeats):
                    answer = qa.run(later, mode, max_new_tokens=2, config=settings, fixed_density=fixed,
                                    reuse_prefix=True)
                    if not answer.tokens["cached"]:
                        raise RuntimeError("the later question did not reuse the video prefix")
                    if best is None or answer.timings["ttft_s"] < best.timings["ttft_s"]:
                        best = answer
                rows.append(_row(later, f"{label}, later question (video prefix cached)", best))
                qa.forget_prefix()
                torch.cuda.reset_peak_memory_stats()
    prepare_vision_tower(model)
    prepare_language_model(model)
    print(markdown_table(rows, [("video tokens", "video_tokens", ""), ("attention", "attention", ""),
                                ("density", "density", ".1%"), ("vision s", "vision_s", ".3f"),
                                ("LLM prefill s", "prefill_s", ".3f"), ("first token s", "first_token_s", ".4f"),
                                ("TTFT (no decode) s", "ttft_without_decode_s", ".3f")]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": header, "rows": rows}, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`prefill` (the default: end-to-end prefill timing on a GPU) or `accuracy` (needle benchmark)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "accuracy":
        from .accuracy import main as accuracy_main

        return accuracy_main(argv[1:])
    if argv and argv[0] == "prefill":
        argv = argv[1:]
    return prefill_main(argv)


if __name__ == "__main__":
    sys.exit(main())
