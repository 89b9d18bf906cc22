"""Batch video QA: python -m videoprefill.batch INPUT --video-dir DIR --out RESULTS.jsonl [...]

Inputs (by extension and fields): our JSONL (`id`, `video`, `question`, optional `options`,
`answer`), Video-MME parquet (`videoID`, `question_id`, `question`, `options`, `answer`,
`duration`, `task_type`; videos at DIR/<videoID>.<mp4|mkv|webm|avi>) and LongVideoBench JSON
(`id`, `video_path`, `question`, `candidates` or `option0..4`, `correct_choice`,
`duration_group`). Results are appended one JSON line at a time and flushed; a rerun skips ids
already done; SIGINT/SIGTERM stop after the current item; a bad video or an out-of-memory
becomes an error line. Videos are decoded ahead of the GPU on background threads (a bounded
queue), once per video however many questions it has. Under torchrun each rank takes a stable
shard of the videos, writes its own part file, and rank 0 merges and summarises at the end.

Exit status: 0 all items answered, 1 some item failed, 2 bad arguments or input file,
130 stopped by a signal (what was done is kept; rerun to continue).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import re
import signal
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .run import add_request_arguments, config_from_args
from .video import VIDEO_SUFFIXES

LETTERS = "ABCDEFGHIJ"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


class BatchInputError(ValueError):
    """The input file cannot be read as one of the supported formats."""


@dataclass
class Item:
    id: str
    video: str
    question: str
    options: list[str] | None = None
    answer: str | None = None  # a letter for multiple choice, else free text
    category: str | None = None
    duration: str | None = None

    def prompt(self) -> str:
        if not self.options:
            return self.question
        lines = [self.question] + [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(self.options)]
        return "\n".join(lines + [MC_INSTRUCTION])


# ----------------------------------------------------------------------------- input formats


_OPTION_PREFIX = re.compile(r"^\s*\(?([A-J])\)?[\.\):]\s*")


def _strip_letter(option: str) -> str:
    return _OPTION_PREFIX.sub("", str(option), count=1).strip()


def _answer_letter(answer, options: list[str] | None) -> str | None:
    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        return None
    if not options:
        return str(answer)
    if isinstance(answer, int) and 0 <= answer < len(options):
        return LETTERS[answer]
    text = str(answer).strip()
    if len(text) == 1 and text.upper() in LETTERS[: len(options)]:
        return text.upper()
    m = _OPTION_PREFIX.match(text)
    if m and m.group(1) in LETTERS[: len(options)]:
        return m.group(1)
    for i, opt in enumerate(options):
        if text.lower() == opt.lower():
            return LETTERS[i]
    return text


def _find_video(video_dir: Path, stem_or_path: str) -> str:
    path = video_dir / stem_or_path
    if path.suffix.lower() in VIDEO_SUFFIXES or path.exists():
        return str(path)
    for suffix in (".mp4", ".mkv", ".webm", ".avi"):
        candidate = video_dir / f"{stem_or_path}{suffix}"
        if candidate.exists():
            return str(candidate)
    return str(video_dir / f"{stem_or_path}.mp4")  # reported missing when its turn comes


def _read_jsonl(path: Path, video_dir: Path) -> list[Item]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            options = [_strip_letter(o) for o in row["options"]] if row.get("options") else None
            items.append(Item(
                id=str(row["id"]), video=_find_video(video_dir, str(row["video"])), question=str(row["question"]),
                options=options, answer=_answer_letter(row.get("answer"), options),
                category=row.get("category"), duration=row.get("duration"),
            ))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise BatchInputError(f"{path}:{n}: not a valid item ({type(err).__name__}: {err})") from None
    return items


def _read_videomme(path: Path, video_dir: Path) -> list[Item]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as err:
        raise BatchInputError(f"cannot read parquet {path}: {err}") from None
    missing = {"videoID", "question_id", "question", "options"} - set(frame.columns)
    if missing:
        raise BatchInputError(f"{path} lacks Video-MME columns {sorted(missing)}")
    items = []
    for row in frame.to_dict("records"):
        options = [_strip_letter(o) for o in list(row["options"])]
        items.append(Item(
            id=str(row["question_id"]), video=_find_video(video_dir, str(row["videoID"])),
            question=str(row["question"]), options=options, answer=_answer_letter(row.get("answer"), options),
            category=row.get("task_type"), duration=row.get("duration"),
        ))
    return items


def _read_longvideobench(path: Path, video_dir: Path) -> list[Item]:
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BatchInputError(f"cannot parse {path}: {err}") from None
    if not isinstance(rows, list):
        raise BatchInputError(f"{path}: expected a JSON list of LongVideoBench items")
    items = []
    for n, row in enumerate(rows):
        try:
            if "candidates" in row:
                options = [str(c) for c in row["candidates"]]
            else:
                options = [str(row[f"option{i}"]) for i in range(10) if row.get(f"option{i}") not in (None, "N/A")]
            items.append(Item(
                id=str(row["id"]), video=_find_video(video_dir, str(row["video_path"])), question=str(row["question"]),
                options=options, answer=_answer_letter(row.get("correct_choice"), options),
                category=row.get("question_category") or row.get("topic_category"),
                duration=str(row["duration_group"]) if row.get("duration_group") is not None else None,
            ))
        except (KeyError, TypeError) as err:
            raise BatchInputError(f"{path}: item {n} is not a LongVideoBench item ({err})") from None
    return items


def load_items(path: str | os.PathLike, video_dir: str | os.PathLike) -> list[Item]:
    """Items of an input file, its format detected by extension and fields."""
    path, video_dir = Path(path), Path(video_dir)
    if not path.is_file():
        raise BatchInputError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        items = _read_jsonl(path, video_dir)
    elif suffix == ".parquet":
        items = _read_videomme(path, video_dir)
    elif suffix == ".json":
        items = _read_longvideobench(path, video_dir)
    else:
        raise BatchInputError(f"unknown input format {suffix!r}: use .jsonl (ours), .parquet (Video-MME) "
                              f"or .json (LongVideoBench)")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise BatchInputError(f"{path}: duplicate id {dup!r}")
    return items


# ----------------------------------------------------------------------------- answers


def extract_letter(text: str, num_options: int) -> str | None:
    """The option letter a model answered, robust to "B", "(B)", "B. red", "The answer is B"."""
    valid = LETTERS[:num_options]
    t = text.strip()
    patterns = [
        rf"^\(?([{valid}])\)?(?:[\.\):,\s]|$)",
        rf"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([{valid}])\)?\b",
        rf"\b([{valid}])\b",
    ]
    for pattern in patterns:
        m = re.search(pattern, t, flags=re.IGNORECASE if pattern is patterns[1] else 0)
        if m:
            return m.group(1).upper()
    return None


def _score(item: Item, output: str) -> tuple[str, bool | None]:
    if item.options:
        letter = extract_letter(output, len(item.options))
        prediction = letter or output.strip()
        return prediction, (letter == item.answer) if item.answer is not None else None
    correct = output.strip().lower() == item.answer.strip().lower() if item.answer is not None else None
    return output.strip(), correct


# ----------------------------------------------------------------------------- runner


def _shard(items: list[Item], rank: int, world: int) -> list[Item]:
    """Whole videos per rank, round robin over the sorted video list: stable across reruns."""
    videos = sorted({it.video for it in items})
    mine = {v for i, v in enumerate(videos) if i % world == rank}
    return [it for it in items if it.video in mine]


def _group_by_video(items: list[Item]) -> list[tuple[str, list[Item]]]:
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(it.video, []).append(it)
    return list(groups.items())


def _done_ids(path: Path, retry_errors: bool = False) -> set[str]:
    """Ids with a result line (the last line of an id counts; a line cut by a crash is redone)."""
    return {r["id"] for r in _read_rows(path) if not (retry_errors and r.get("error"))}


class _Stop:
    def __init__(self):
        self.requested = False

    def install(self) -> None:
        def handler(signum, frame):
            self.requested = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def _decoder(qa, groups, sampling, out: queue.Queue, stop: _Stop) -> None:
    """Decode videos in order into a bounded queue; errors travel as values."""
    for video, items in groups:
        if stop.requested:
            break
        try:
            result = qa.decode(video, sampling)
        except Exception as err:  # reported per item by the consumer
            result = err
        out.put((video, items, result))
    out.put(None)


def _run_one(qa, decoded, item: Item, first: bool, args, config) -> dict:
    prepared = qa.prepare_decoded(decoded, item.prompt(), count_decode=first)
    modes = ["dense", "sparse"] if args.attention == "compare" else [args.attention]
    runs = {m: qa.run(prepared, m, args.max_new_tokens, config, record_masks=False) for m in modes}
    record = {}
    for mode, ans in runs.items():
        prediction, correct = _score(item, ans.text)
        record[mode] = {"prediction": prediction, "output": ans.text, "correct": correct,
                        "ttft_s": ans.timings["ttft_s"], "prefill_s": ans.timings["prefill_s"],
                        "density": ans.sparsity["density"], "cached_tokens": ans.tokens["cached"]}
    main = record["sparse"] if "sparse" in record else record[args.attention]
    row = {"prediction": main["prediction"], "output": main["output"], "correct": main["correct"],
           "ttft_s": main["ttft_s"], "prefill_s": main["prefill_s"], "density": main["density"],
           "tokens": prepared.tokens, "decode_shared": not first, "cached_tokens": main["cached_tokens"]}
    if args.attention == "compare":
        row["runs"] = record
        row["agree"] = record["sparse"]["prediction"] == record["dense"]["prediction"]
    return row


def _base_row(item: Item, args, config) -> dict:
    """What the item is and what it is asked with: the attention mode, the FlashPrefill config and
    the dense layers (so that rows of resumed runs with other settings stay told apart)."""
    return {"id": item.id, "video": item.video, "question": item.question, "options": item.options,
            "answer": item.answer, "category": item.category, "duration": item.duration,
            "attention": args.attention, "config": dataclasses.asdict(config), "dense_layers": args.dense_layers}


def run_items(qa, items: list[Item], out_path: Path, args, config, sampling, rank: int = 0) -> tuple[int, int, bool]:
    """Answer `items` not yet in out_path; returns (done now, failed now, stopped by a signal)."""
    import torch
    from tqdm import tqdm

    done = _done_ids(out_path, args.retry_errors)
    todo = [it for it in items if it.id not in done]
    groups = _group_by_video(todo)
    stop = _Stop()
    stop.install()
    pending: queue.Queue = queue.Queue(maxsize=max(1, args.prefetch))
    worker = threading.Thread(target=_decoder, args=(qa, groups, sampling, pending, stop), daemon=True)
    worker.start()
    n_ok = n_err = 0
    correct = known = 0
    ttfts: list[float] = []
    bar = tqdm(total=len(todo), desc=f"rank {rank}" if args.world > 1 else "videos QA", position=rank,
               disable=args.quiet, dynamic_ncols=True)
    with out_path.open("a") as out:
        while not stop.requested:
            entry = pending.get()
            if entry is None:
                break
            video, group, decoded = entry
            # Compare mode: both modes' caches kept for a video's later questions; one for a video asked once.
            qa.prefix_states = 2 if len(group) > 1 else 1
            for n, item in enumerate(group):
                if stop.requested:
                    break
                row = _base_row(item, args, config)
                try:
                    if isinstance(decoded, Exception):
                        raise decoded
                    row.update(_run_one(qa, decoded, item, n == 0, args, config))
                    row["error"] = None
                    n_ok += 1
                except torch.cuda.OutOfMemoryError:
                    with qa.on_device():  # (the model's device, which need not be the current one)
                        torch.cuda.empty_cache()
                    row["error"] = "out of GPU memory"
                    n_err += 1
                except Exception as err:  # one item's failure never stops the run
                    row["error"] = str(err).strip().splitlines()[0][:500] if str(err).strip() else type(err).__name__
                    n_err += 1
                out.write(json.dumps(row) + "\n")
                out.flush()
                if row.get("correct") is not None:
                    known += 1
                    correct += bool(row["correct"])
                if row.get("ttft_s") is not None:
                    ttfts.append(row["ttft_s"])
                bar.update(1)
                bar.set_postfix(acc=f"{correct / known:.1%}" if known else "-",
                                ttft=f"{sum(ttfts) / len(ttfts):.2f}s" if ttfts else "-", errors=n_err)
    bar.close()
    stopped = stop.requested
    stop.requested = True  # let the decoder finish
    while worker.is_alive():
        try:
            pending.get(timeout=0.1)
        except queue.Empty:
            pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return n_ok, n_err, stopped


# ----------------------------------------------------------------------------- summary


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _accuracy(rows: list[dict], key: str = "correct") -> dict:
    known = [r for r in rows if r.get(key) is not None]
    return {"accuracy": sum(bool(r[key]) for r in known) / len(known) if known else None, "scored": len(known)}


def summarize(rows: list[dict], compare: bool) -> dict:
    ok = [r for r in rows if not r.get("error")]
    ttft = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    summary = {
        "items": len(rows), "answered": len(ok), "errors": len(rows) - len(ok),
        **_accuracy(ok),
        "ttft_s": {"mean": sum(ttft) / len(ttft) if ttft else None, "p50": _percentile(ttft, 0.5),
                   "p90": _percentile(ttft, 0.9)},
        "density": sum(r["density"] for r in ok) / len(ok) if ok else None,
        "by_category": {}, "by_duration": {},
    }
    # A later question about the same video reuses its prefix's KV cache (videoprefill.prefix).
    for name, rows_of in (("first", [r for r in ok if not r.get("cached_tokens")]),
                          ("follow_up", [r for r in ok if r.get("cached_tokens")])):
        t = [r["ttft_s"] for r in rows_of if r.get("ttft_s") is not None]
        summary[f"ttft_{name}_question_mean_s"] = sum(t) / len(t) if t else None
        summary[f"{name}_questions"] = len(rows_of)
    for field, key in (("category", "by_category"), ("duration", "by_duration")):
        groups = defaultdict(list)
        for r in ok:
            if r.get(field) is not None:
                groups[str(r[field])].append(r)
        summary[key] = {name: _accuracy(g) | {"items": len(g)} for name, g in sorted(groups.items())}
    if compare:
        both = [r for r in ok if "runs" in r]
        summary["agreement"] = sum(r["agree"] for r in both) / len(both) if both else None
        for mode in ("sparse", "dense"):
            scored = [r["runs"][mode] for r in both]
            summary[f"{mode}_accuracy"] = _accuracy(scored)["accuracy"]
            t = [r["ttft_s"] for r in scored]
            summary[f"{mode}_ttft_mean_s"] = sum(t) / len(t) if t else None
    return summary


def summary_markdown(summary: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def sec(x):
        return "-" if x is None else f"{x:.3f}"

    lines = ["| items | answered | errors | accuracy | TTFT mean s | TTFT p50 s | TTFT p90 s | density |",
             "|---|---|---|---|---|---|---|---|",
             f"| {summary['items']} | {summary['answered']} | {summary['errors']} | {pct(summary['accuracy'])} | "
             f"{sec(summary['ttft_s']['mean'])} | {sec(summary['ttft_s']['p50'])} | {sec(summary['ttft_s']['p90'])} | "
             f"{pct(summary['density'])} |"]
    if summary.get("follow_up_questions"):
        lines += ["", "| first question about a video: items | TTFT mean s | later questions (video prefix cached): "
                  "items | TTFT mean s |", "|---|---|---|---|",
                  f"| {summary['first_questions']} | {sec(summary['ttft_first_question_mean_s'])} "
                  f"| {summary['follow_up_questions']} | {sec(summary['ttft_follow_up_question_mean_s'])} |"]
    if "agreement" in summary:
        lines += ["", "| agreement sparse/dense | sparse accuracy | dense accuracy | sparse TTFT s | dense TTFT s |",
                  "|---|---|---|---|---|",
                  f"| {pct(summary['agreement'])} | {pct(summary['sparse_accuracy'])} "
                  f"| {pct(summary['dense_accuracy'])} "
                  f"| {sec(summary['sparse_ttft_mean_s'])} | {sec(summary['dense_ttft_mean_s'])} |"]
    for key, title in (("by_category", "category"), ("by_duration", "duration")):
        if summary[key]:
            lines += ["", f"| {title} | items | accuracy |", "|---|---|---|"]
            lines += [f"| {name} | {g['items']} | {pct(g['accuracy'])} |" for name, g in summary[key].items()]
    return "\n".join(lines) + "\n"


def _read_rows(path: Path) -> list[dict]:
    """Result rows, one per id (a retried id's last line wins), in file order."""
    rows: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                rows[row["id"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return list(rows.values())


def finish(items: list[Item], out_path: Path, parts: list[Path], compare: bool) -> dict:
    """Write the results in input order, one line per id (merging rank part files, keeping a
    retried id's last line), and the summary beside them."""
    by_id: dict[str, dict] = {}
    for source in parts or [out_path]:
        by_id.update({r["id"]: r for r in _read_rows(source)})
    order = [it.id for it in items if it.id in by_id]
    in_order = set(order)
    rest = [i for i in by_id if i not in in_order]  # ids of earlier runs outside this --limit
    rows = [by_id[i] for i in order + rest]
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out_path)
    summary = summarize(rows, compare)
    stem = out_path.with_suffix("")
    Path(f"{stem}.summary.json").write_text(json.dumps(summary, indent=1))
    Path(f"{stem}.summary.md").write_text(summary_markdown(summary))
    return summary


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m videoprefill.batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help=".jsonl (ours), .parquet (Video-MME) or .json (LongVideoBench)")
    p.add_argument("--video-dir", required=True, help="folder the videos are found in")
    p.add_argument("--out", required=True, help="results file (JSONL); the summary goes beside it")
    add_request_arguments(p, "FlashPrefill (default), dense attention, or both on each item", fps=1.0)
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate at most (default: 8)")
    p.add_argument("--limit", type=int, help="only the first N items")
    p.add_argument("--prefetch", type=int, default=2, help="videos decoded ahead of the GPU (default: 2)")
    p.add_argument("--retry-errors", action="store_true", help="redo items whose earlier result was an error")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _init_distributed(device: str) -> tuple[int, int]:
    """Join the torchrun group (NCCL when the ranks run on CUDA, gloo otherwise): (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if on_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")
    try:
        from .video import Sampling, check_frame_pixels

        sampling = Sampling(fps=args.fps, max_frames=args.max_frames, max_pixels=args.max_pixels)
        for name, value in (("--max-new-tokens", args.max_new_tokens), ("--limit", args.limit),
                            ("--prefetch", args.prefetch)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        items = load_items(args.input, args.video_dir)
        if args.limit is not None:
            items = items[: args.limit]
        if not items:
            raise BatchInputError(f"{args.input} holds no items")
    except (BatchInputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from videoprefill import quiet_libraries

    quiet_libraries()
    from models import ModelLoadError, load

    from .pipeline import VideoQA

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device or (f"cuda:{local}" if _cuda() else "cpu")
    if args.device is None and _cuda() and local >= _gpu_count():
        print(f"error: rank {local} of this host has no GPU ({_gpu_count()} visible): run at most that many ranks "
              "per host, or pass --device cpu", file=sys.stderr)
        return 2
    rank, world = _init_distributed(device)
    args.world = world
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    part = out_path if world == 1 else out_path.with_name(f"{out_path.stem}.rank{rank}-of-{world}{out_path.suffix}")
    try:
        model, processor = load(args.model, attention="dense" if args.attention == "dense" else "sparse",
                                dense_layers=args.dense_layers, device=device, dtype=args.dtype)
        check_frame_pixels(sampling.max_pixels, processor.video_processor.patch_size)  # not once per item
    except (ModelLoadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    qa = VideoQA(model, processor, mask_layers=())
    qa.graph_decode = not args.no_graph_decode
    try:
        config = config_from_args(args, qa.config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    ok, failed, stopped = run_items(qa, _shard(items, rank, world), part, args, config, sampling, rank)
    if world > 1:
        import torch.distributed as dist

        flags = _all_reduce_flags(stopped, failed)
        stopped, failed = flags
        dist.barrier()
    if rank == 0 and not stopped:
        parts = [out_path.with_name(f"{out_path.stem}.rank{r}-of-{world}{out_path.suffix}") for r in range(world)]
        summary = finish(items, out_path, parts if world > 1 else [], args.attention == "compare")
        print(summary_markdown(summary), end="")
        print(f"results: {out_path}  summary: {out_path.with_suffix('')}.summary.json  "
              f"({time.perf_counter() - started:.1f} s)")
        failed = summary["errors"]
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if stopped:
        print("stopped: results so far are kept; rerun the same command to continue", file=sys.stderr)
        return 130
    return 1 if failed else 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _all_reduce_flags(stopped: bool, failed: int) -> tuple[bool, int]:
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(stopped), failed], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return bool(t[0].item()), int(t[1].item())


if __name__ == "__main__":
    sys.exit(main())
