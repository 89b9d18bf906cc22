"""python -m videoprefill.run VIDEO [-q QUESTION]... : answer questions about a video.

Several `-q` are answered in turn, in one process: the video is read and prefilled once, and each
later question prefills only its own tokens over the video's kept KV cache. `-i` then reads more
questions from standard input, a line each, until its end. Each question is answered on its own
about the video: earlier questions and answers are not in its prompt.
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

DESCRIPTION = ("Answer questions about a video with a Qwen-VL model whose prefill runs FlashPrefill. Give -q "
               "several times to ask several questions, or -i to read them from standard input: the video is read "
               "and prefilled once, and each later question prefills only its own tokens over the video's kept KV "
               "cache. Each question is answered on its own (earlier ones are not in its prompt).")
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
    p.add_argument("-q", "--question", action="append", default=None,
                   help='question (default: "Describe this video." unless -i); repeat to ask several about the '
                        "video, in turn")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="after the -q questions, read more from standard input, one a line, until its end (Ctrl-D); "
                        "each is answered over the video's kept KV cache")
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
    lines.append(f"{head}tokens: {tok['video']} video + {tok['text']} text = {tok['total']}"
                 + (f" ({tok['cached']} of them from the kept KV cache: only the question prefilled)"
                    if tok.get("cached") else ""))
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

    given = args.question or ([] if args.interactive else [DEFAULT_QUESTION])
    several = len(given) > 1 or args.interactive
    count = None if args.interactive else len(given)  # (unknown while questions come from stdin)
    try:
        for n, question in enumerate(given, 1):
            if not question.strip():
                raise InputError(f"question {n} is empty" if several else "the question is empty")
        if args.interactive and args.json:
            raise InputError("--interactive prints a report per answer; leave out --json")
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
    answered = []  # (question, primary answer, compare's result or None), as each is answered
    map_error = None

    def failed(message: str, status: int) -> int:
        """The answers so far (JSON: printed here; a report: already printed), then `message`."""
        live.clear()
        if qa is not None and status:  # a read started ahead ends first (an interrupt does not wait for it:
            qa.finish_reading()  # the process then ends through `exit_process`, which leaves it running)
        if args.json and several and answered:
            print(json.dumps({"questions": [_payload(*item) for item in answered], "error": message}, indent=1))
        if status:
            _error(message)
        return status

    try:
        model, processor = load(args.model, attention="dense" if args.attention == "dense" else "sparse",
                                dense_layers=args.dense_layers, device=args.device, dtype=args.dtype)
        check_frame_pixels(sampling.max_pixels, processor.video_processor.patch_size)  # (before the warm-up)
        qa = VideoQA(model, processor, warmup=not args.no_warmup)
        qa.graph_decode = not args.no_graph_decode
        # One question: compare's dense cache is not held through its sparse run. Several in compare mode
        # keep both modes' caches, so that each later question reuses both.
        qa.prefix_states = 2 if several and args.attention == "compare" else 1
        config = config_from_args(args, qa.config)
        if qa.warmup:  # the video's frames are read while the warm-up runs (timings: decoded_ahead_s)
            qa.decode_ahead(args.video, sampling)
        for n, question in enumerate(_questions(given, args.interactive), 1):
            if args.attention == "compare":
                result = qa.compare(args.video, question, sampling, args.max_new_tokens, config,
                                    on_text=live.show if streaming else None)
                primary = result["runs"]["sparse"]
            else:
                primary = qa.ask(args.video, question, args.attention, sampling, args.max_new_tokens, config,
                                 on_text=(lambda text, ttft_s: live.show("", text, ttft_s)) if streaming else None)
                result = None
            live.clear()
            answered.append((question, primary, result))
            if n == 1 and args.sparsity_map:
                map_error = _write_map(primary, args.sparsity_map)
            if not args.json:  # each report as its answer comes
                if n == 1:
                    _print_header(qa, primary, question if not several else None, count)
                of = f"/{count}" if count else ""
                _print_report(primary, result, f"question {n}{of}: {question}" if several else None)
    except KeyboardInterrupt:
        failed("interrupted", 0)
        raise
    except (InputError, VideoError, ModelLoadError, ValueError, TypeError) as err:
        return failed(f"error: {err}", 2)
    except Exception as err:  # one line, not a traceback; VIDEOPREFILL_DEBUG=1 shows it
        message = f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if os.environ.get("VIDEOPREFILL_DEBUG"):
            failed(message, 0)
            from videoprefill.video import wait_for_stderr

            wait_for_stderr()  # (the traceback is printed there)
            raise
        return failed(message, 1)

    if not answered:  # (-i and nothing read)
        _error("no question asked")
        return 0
    if args.json:
        if several:
            print(json.dumps({"questions": [_payload(*item) for item in answered]}, indent=1))
        else:
            print(json.dumps(_payload(None, *answered[0][1:]), indent=1))
        return _report_map_error(map_error)
    if args.sparsity_map and map_error is None:
        print(f"sparsity map written to {args.sparsity_map}" + (" (the first question's)" if several else ""))
    return _report_map_error(map_error)


QUESTION_PROMPT = "question (Ctrl-D to end)> "


def _questions(given: list[str], interactive: bool):
    """The questions to answer: `given`, then with `interactive` each non-empty line of standard
    input until its end, prompted for on stderr where standard input is a terminal."""
    yield from given
    if not interactive:
        return
    from videoprefill.video import wait_for_stderr

    while True:
        if sys.stdin.isatty():
            wait_for_stderr()  # (a video read ahead silences it)
            sys.stderr.write(QUESTION_PROMPT)
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def _payload(question: str | None, primary, result) -> dict:
    """One question's JSON object: the answer's, or compare's both runs; with "question" first
    where given (several questions)."""
    if result is None:
        payload = primary.to_json()
    else:
        payload = {"runs": {k: a.to_json() for k, a in result["runs"].items()},
                   "ttft_speedup": result["ttft_speedup"], "prefill_speedup": result["prefill_speedup"],
                   "answers_agree": result["answers_agree"]}
    return payload if question is None else {"question": question, **payload}


def _write_map(answer, path: str) -> str | None:
    """Write the sparsity map; the error line where it could not be written (the answers are still
    printed)."""
    from videoprefill.plots import save_sparsity_map

    try:
        save_sparsity_map(answer, path)
    except (OSError, ValueError) as err:
        return f"error: cannot write the sparsity map {path}: {err}"
    return None


def _print_header(qa, primary, question: str | None, count: int | None) -> None:
    """The report's first line (the model, the video, the question or how many; None: questions read
    from standard input), and the model's note."""
    if question is not None:
        asked = f"question: {question}"
    else:
        asked = f"{count} questions" if count else "questions from standard input"
    print(f"model: {primary.model}   video: {primary.video['path']} ({primary.video['duration_s']:.1f} s, "
          f"{primary.video['sampled_frames']} frames sampled)   {asked}")
    if qa.info and qa.info.note:
        print(f"model note: {qa.info.note}")


def _print_report(primary, result, heading: str | None) -> None:
    """One question's report: its answer, or compare's two with the speed-up; after `heading`."""
    if heading:
        print(heading)
    if result is None:
        print(_human(primary))
    else:
        print(_human(result["runs"]["dense"], "dense"))
        print(_human(result["runs"]["sparse"], "sparse"))
        print(f"TTFT speed-up {result['ttft_speedup']:.2f}x (LLM prefill {result['prefill_speedup']:.2f}x); "
              f"answers {'agree' if result['answers_agree'] else 'differ'}")
    sys.stdout.flush()


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


def exit_process(status: int) -> None:
    """Exit with `status`. While a video read started ahead is still in decord (nothing took its
    frames: no question was asked, or a web UI stopped while an upload was read), the exit
    handlers run (the web UI's plot folder is removed) and the process ends without the rest of
    Python's teardown, which would end decord's threads under the read and abort the process
    ("terminate called without an active exception")."""
    import atexit
    import threading

    pipeline = sys.modules.get("videoprefill.pipeline")  # (not imported: no read started)
    if pipeline is not None and any(thread.name == pipeline.READ_AHEAD_THREAD and thread.is_alive()
                                    for thread in threading.enumerate()):
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def cli() -> None:
    """The command's entry point (`python -m videoprefill.run`, `python -m videoprefill`, `videoprefill`)."""
    exit_process(main())


if __name__ == "__main__":
    cli()
