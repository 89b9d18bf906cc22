"""python -m videoprefill.run VIDEO [-q QUESTION] ...: answer a question about a video.

Exit status: 0 on success, 2 on bad input (one line on stderr), 1 on any other failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import unicodedata
from pathlib import Path

DESCRIPTION = "Answer a question about a video with a Qwen-VL model whose prefill runs FlashPrefill."
UNTRAINED_NOTE = "demo model, untrained: the answer text is not meaningful"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Which model to load, on which device, in which dtype (`models.load`), and how it decodes
    (`VideoQA.graph_decode`): this command's, batch QA's and the web UI's options."""
    p.add_argument("--model", default="demo", help="demo (default), a hub id or a local checkpoint folder")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="model dtype (default: auto, bf16 on CUDA and fp32 on the CPU)")
    p.add_argument("--no-graph-decode", action="store_true",
                   help="decode each answer as transformers does (default on CUDA: its steps after the second "
                        "token replay a CUDA graph)")


def add_request_arguments(p: argparse.ArgumentParser, attention_help: str, fps: float) -> None:
    """The options this command and batch QA share: the model (`add_model_arguments`), the
    attention and its FlashPrefill settings (which `config_from_args` reads), how frames are sampled."""
    add_model_arguments(p)
    p.add_argument("--attention", choices=("sparse", "dense", "compare"), default="sparse", help=attention_help)
    p.add_argument("--alpha", type=float, help="keep blocks scoring >= alpha x row max (default: model preset)")
    p.add_argument("--block-size", type=int,
                   help="sparsity block size, a power of two (default: model preset, 128 for checkpoints)")
    p.add_argument("--min-seq-len", type=int,
                   help="run dense attention below this many tokens (default: model preset, 10240 for checkpoints)")
    p.add_argument("--pattern-per-kv-head", action="store_true",
                   help="one block pattern per KV head, shared by its query heads (FlashPrefill V2)")
    p.add_argument("--mean-correction", action="store_true",
                   help="pruned blocks enter the softmax as their mean key and value (FlashPrefill V2)")
    p.add_argument("--dense-layers", type=int, default=0,
                   help="keep the first N language-model layers dense (default: 0)")
    p.add_argument("--fps", type=float, default=fps, help=f"frames sampled per second of video (default: {fps:g})")
    p.add_argument("--max-frames", type=int, default=64, help="at most this many frames (default: 64)")
    p.add_argument("--max-pixels", type=int, default=256 * 28 * 28,
                   help="pixels per frame after resizing (default: 200704 = 256 x 28 x 28)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m videoprefill.run", description=DESCRIPTION)
    p.add_argument("video", help="path to a video file")
    p.add_argument("-q", "--question", default=None, help='question (default: "Describe this video.")')
    add_request_arguments(p, "FlashPrefill (default), dense attention, or both on the same decoded inputs", fps=2.0)
    p.add_argument("--total-pixels", type=int,
                   help="pixels over all frames (default: qwen-vl-utils' cap, 0.9 x 128000 tokens' worth)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default: 32)")
    p.add_argument("--no-warmup", action="store_true",
                   help="no untimed warm-up: by default a short request on the bundled sample runs first in each "
                        "attention mode, so compilation and first-call costs stay out of the timings")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--sparsity-map", metavar="PNG",
                   help="write density heatmap and a block mask to this image (.png, .pdf, .svg or .jpg)")
    return p


class UsageError(ValueError):
    pass


def config_from_args(args, base):
    """`base` (a FlashPrefillConfig) with the FlashPrefill options (`add_request_arguments`) given
    on a command line, this one's or batch QA's. ValueError on bad values."""
    numbers = {name: getattr(args, name) for name in ("alpha", "block_size", "min_seq_len")}
    changes = {name: value for name, value in numbers.items() if value is not None}
    changes.update({name: True for name in ("pattern_per_kv_head", "mean_correction") if getattr(args, name)})
    return dataclasses.replace(base, **changes) if changes else base


def _human(answer, label: str | None = None) -> str:
    t = answer.timings
    head = f"[{label}] " if label else ""
    lines = [f"{head}answer: {answer.text or '(empty)'}"]
    if not answer.trained:
        lines.append(f"{head}note: {UNTRAINED_NOTE}")
    lines.append(
        f"{head}TTFT {t['ttft_s'] * 1000:.1f} ms = decode video {t['decode_video_s'] * 1000:.1f} + vision "
        f"{t['vision_s'] * 1000:.1f} + LLM prefill {t['prefill_s'] * 1000:.1f} + first token "
        f"{t['first_token_s'] * 1000:.1f} ms (total {t['total_s'] * 1000:.1f} ms"
        + (f"; {after})" if (after := answer.after_first()) else ")")
    )
    if t.get("decoded_ahead_s"):
        lines[-1] += f"; frames read during the warm-up: {t['decoded_ahead_s'] * 1000:.1f} ms, not in TTFT"
    tok = answer.tokens
    lines.append(f"{head}tokens: {tok['video']} video + {tok['text']} text = {tok['total']}")
    per_layer = " ".join(f"{d:.2f}" for d in answer.sparsity["per_layer"])
    density = answer.sparsity["density"]
    lines.append(f"{head}attention: {answer.attention}, density {density:.1%} (per layer: {per_layer})")
    return "\n".join(lines)


def _columns(char: str) -> int:
    """Terminal columns of a character: 2 for East Asian wide and full-width ones, 0 for combining
    marks and zero-width joiners, 1 otherwise (from the standard library's Unicode database)."""
    if unicodedata.combining(char) or char in "\u200b\u200c\u200d":
        return 0
    return 2 if unicodedata.east_asian_width(char) in "WF" else 1


def fit_columns(line: str, width: int) -> str:
    """`line` when it fits in `width` terminal columns, else "..." and as much of its end as fits."""
    if sum(map(_columns, line)) <= width:
        return line
    kept, used = [], 3
    for char in reversed(line):
        used += _columns(char)
        if used > width:
            break
        kept.append(char)
    return "..." + "".join(reversed(kept))


class LiveAnswer:
    """On a terminal, the answer as it is generated, from its first token on: one line rewritten in
    place (its end when it is wider than the terminal, counted in columns, so that an answer in
    Chinese does not wrap), wiped before the report prints the answer."""

    def __init__(self, stream):
        self.stream = stream
        self.shown = False

    def show(self, label: str, text: str, ttft_s: float) -> None:
        head = f"[{label}] " if label else ""
        line = f"{head}answer so far (first token after {ttft_s * 1000:.0f} ms): {' '.join(text.split())} ..."
        line = fit_columns(line, shutil.get_terminal_size().columns - 1)
        self.stream.write("\r\033[K" + line)
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        """Wipe the line, where one is shown (nothing otherwise)."""
        if self.shown:
            self.clear_line()
            self.shown = False

    def clear_line(self) -> None:
        self.stream.write("\r\033[K")
        self.stream.flush()


def _error(message: str) -> None:
    """`message` on stderr, once no video read (the one started ahead) has it silenced."""
    from videoprefill.video import wait_for_stderr

    wait_for_stderr()
    print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")
    try:
        return _main(args)
    except KeyboardInterrupt:
        if sys.stdout.isatty():
            LiveAnswer(sys.stdout).clear_line()  # (an answer being shown)
        _error("interrupted")
        return 130


def _main(args) -> int:
    from models import ModelLoadError
    from videoprefill.pipeline import DEFAULT_QUESTION, InputError, VideoQA
    from videoprefill.video import Sampling, VideoError, check_frame_pixels, probe

    question = DEFAULT_QUESTION if args.question is None else args.question
    try:
        if not question.strip():
            raise InputError("the question is empty")
        if args.sparsity_map:
            args.sparsity_map = _check_map_path(args.sparsity_map)
        sampling = Sampling(fps=args.fps, max_frames=args.max_frames, max_pixels=args.max_pixels,
                            total_pixels=args.total_pixels)
        probe(args.video)  # bad files fail before the model loads
    except (InputError, VideoError, ValueError) as err:
        _error(f"error: {err}")
        return 2

    from videoprefill import quiet_libraries

    quiet_libraries()
    from models import load

    # The answer shown as it is generated where stdout is a terminal (the report below is the same).
    live = LiveAnswer(sys.stdout)
    streaming = sys.stdout.isatty() and not args.json
    qa = None
    try:
        model, processor = load(args.model, attention="dense" if args.attention == "dense" else "sparse",
                                dense_layers=args.dense_layers, device=args.device, dtype=args.dtype)
        check_frame_pixels(sampling.max_pixels, processor.video_processor.patch_size)  # (before the warm-up)
        qa = VideoQA(model, processor, warmup=not args.no_warmup)
        qa.graph_decode = not args.no_graph_decode
        qa.prefix_states = 1  # one question a process: compare's dense cache is not held through its sparse run
        config = config_from_args(args, qa.config)
        if qa.warmup:  # the video's frames are read while the warm-up runs (timings: decoded_ahead_s)
            qa.decode_ahead(args.video, sampling)
        if args.attention == "compare":
            result = qa.compare(args.video, question, sampling, args.max_new_tokens, config,
                                on_text=live.show if streaming else None)
            primary = result["runs"]["sparse"]
        else:
            primary = qa.ask(args.video, question, args.attention, sampling, args.max_new_tokens, config,
                             on_text=(lambda text, ttft_s: live.show("", text, ttft_s)) if streaming else None)
            result = None
    except KeyboardInterrupt:
        if qa is not None:
            qa.finish_reading()  # (a read started ahead: the process exits only after it)
        raise
    except (InputError, VideoError, ModelLoadError, ValueError, TypeError) as err:
        live.clear()
        if qa is not None:
            qa.finish_reading()
        _error(f"error: {err}")
        return 2
    except Exception as err:  # one line, not a traceback; VIDEOPREFILL_DEBUG=1 shows it
        live.clear()
        if qa is not None:
            qa.finish_reading()
        if os.environ.get("VIDEOPREFILL_DEBUG"):
            from videoprefill.video import wait_for_stderr

            wait_for_stderr()  # (the traceback is printed there)
            raise
        _error(f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        return 1
    live.clear()

    map_error = None
    if args.sparsity_map:
        from videoprefill.plots import save_sparsity_map

        try:
            save_sparsity_map(primary, args.sparsity_map)
        except (OSError, ValueError) as err:  # the answer is still printed below
            map_error = f"error: cannot write the sparsity map {args.sparsity_map}: {err}"

    if args.json:
        if result is None:
            payload = primary.to_json()
        else:
            payload = {"runs": {k: a.to_json() for k, a in result["runs"].items()},
                       "ttft_speedup": result["ttft_speedup"], "prefill_speedup": result["prefill_speedup"],
                       "answers_agree": result["answers_agree"]}
        print(json.dumps(payload, indent=1))
        return _report_map_error(map_error)

    print(f"model: {primary.model}   video: {primary.video['path']} ({primary.video['duration_s']:.1f} s, "
          f"{primary.video['sampled_frames']} frames sampled)   question: {question}")
    if qa.info and qa.info.note:
        print(f"model note: {qa.info.note}")
    if result is None:
        print(_human(primary))
    else:
        print(_human(result["runs"]["dense"], "dense"))
        print(_human(result["runs"]["sparse"], "sparse"))
        print(f"TTFT speed-up {result['ttft_speedup']:.2f}x (LLM prefill {result['prefill_speedup']:.2f}x); "
              f"answers {'agree' if result['answers_agree'] else 'differ'}")
    if args.sparsity_map and map_error is None:
        print(f"sparsity map written to {args.sparsity_map}")
    return _report_map_error(map_error)


MAP_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _check_map_path(path: str) -> str:
    """The sparsity map's path with ~ expanded; fails before the model runs when it could not be
    written."""
    from videoprefill.pipeline import InputError

    target = Path(path).expanduser()
    if target.suffix.lower() not in MAP_FORMATS:
        raise InputError(f"the sparsity map must end in one of {', '.join(MAP_FORMATS)}, got {path!r}")
    if not target.parent.is_dir():
        raise InputError(f"cannot write the sparsity map {path!r}: folder {str(target.parent)!r} does not exist")
    if target.is_dir():
        raise InputError(f"cannot write the sparsity map {path!r}: it is a folder")
    return str(target)


def _report_map_error(message: str | None) -> int:
    if message is None:
        return 0
    _error(message)
    return 1


if __name__ == "__main__":
    sys.exit(main())
