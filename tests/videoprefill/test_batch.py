"""Batch video QA: input formats, answer extraction, errors, resume, signals and torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from videoprefill.batch import BatchInputError, extract_letter, load_items, summarize, summary_markdown
from videoprefill.video import write_test_video

FAST = ["--fps", "2", "--max-frames", "4", "--max-pixels", str(56 * 56), "--max-new-tokens", "2", "--quiet",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-videos")
    write_test_video(root / "v1.mp4", seconds=2, fps=4, size=(56, 56), seed=1)
    write_test_video(root / "v2.mkv", seconds=2, fps=4, size=(56, 56), seed=2)
    (root / "broken.mp4").write_bytes(b"\x00\x01junk" * 200)
    return root


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def items_for(n: int, videos: list[str]) -> list[dict]:
    return [{"id": f"q{i}", "video": videos[i % len(videos)], "question": f"Question {i}?",
             "options": ["red", "green", "blue"], "answer": "ABC"[i % 3]} for i in range(n)]


def run_batch(*args: str, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "videoprefill.batch", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class TestFormats:
    def test_our_jsonl(self, tmp_path, videos):
        path = write_jsonl(tmp_path / "in.jsonl", [
            {"id": 1, "video": "v1.mp4", "question": "Which?", "options": ["A. cat", "B. dog"], "answer": "B"},
            {"id": "x", "video": "v2", "question": "Say it", "answer": "hello"},
            {"id": "y", "video": "v1.mp4", "question": "Which?", "options": ["cat", "dog"], "answer": "dog"},
        ])
        items = load_items(path, videos)
        assert [it.id for it in items] == ["1", "x", "y"]
        assert items[0].options == ["cat", "dog"] and items[0].answer == "B"
        assert items[1].video.endswith("v2.mkv") and items[1].options is None and items[1].answer == "hello"
        assert items[2].answer == "B"
        assert items[0].prompt().splitlines() == ["Which?", "A. cat", "B. dog",
                                                  "Answer with the option's letter from the given choices directly."]

    def test_videomme_parquet(self, tmp_path, videos):
        pd = pytest.importorskip("pandas")
        pytest.importorskip("pyarrow")
        frame = pd.DataFrame({
            "videoID": ["v1", "v2"], "question_id": ["001-1", "002-1"], "question": ["Who?", "Where?"],
            "options": [["A. a man", "B. a dog", "C. a car", "D. a cat"], ["A. in", "B. out", "C. up", "D. down"]],
            "answer": ["C", "A"], "duration": ["short", "long"], "task_type": ["Counting", "Spatial"],
        })
        frame.to_parquet(tmp_path / "vmme.parquet")
        items = load_items(tmp_path / "vmme.parquet", videos)
        assert [it.id for it in items] == ["001-1", "002-1"]
        assert items[0].options == ["a man", "a dog", "a car", "a cat"] and items[0].answer == "C"
        assert items[0].video.endswith("v1.mp4") and items[1].video.endswith("v2.mkv")
        assert (items[1].category, items[1].duration) == ("Spatial", "long")

    def test_longvideobench_json(self, tmp_path, videos):
        rows = [
            {"id": "a", "video_path": "v1.mp4", "question": "Q1", "candidates": ["x", "y", "z"], "correct_choice": 2,
             "duration_group": 15},
            {"id": "b", "video_path": "v2.mkv", "question": "Q2", "option0": "p", "option1": "q", "option2": "N/A",
             "correct_choice": 1, "duration_group": 600, "question_category": "S2E"},
        ]
        (tmp_path / "lvb.json").write_text(json.dumps(rows))
        items = load_items(tmp_path / "lvb.json", videos)
        assert items[0].answer == "C" and items[0].options == ["x", "y", "z"] and items[0].duration == "15"
        assert items[1].options == ["p", "q"] and items[1].answer == "B" and items[1].category == "S2E"

    def test_bad_inputs(self, tmp_path, videos):
        with pytest.raises(BatchInputError, match="not found"):
            load_items(tmp_path / "nope.jsonl", videos)
        with pytest.raises(BatchInputError, match="unknown input format"):
            load_items(write_jsonl(tmp_path / "in.csv", []), videos)
        (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
        with pytest.raises(BatchInputError, match="bad.jsonl:1"):
            load_items(tmp_path / "bad.jsonl", videos)
        dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "video": "v1", "question": "q"}] * 2)
        with pytest.raises(BatchInputError, match="duplicate id"):
            load_items(dup, videos)


@pytest.mark.parametrize("text,n,want", [
    ("B", 4, "B"), ("(C) a car", 4, "C"), ("D. down", 4, "D"), ("The answer is A.", 4, "A"),
    ("answer: (b)", 4, "B"), ("I think it is C", 4, "C"), ("E", 4, None), ("none of them", 4, None),
])
def test_extract_letter(text, n, want):
    assert extract_letter(text, n) == want


def test_summary_groups_and_percentiles():
    rows = [{"id": str(i), "correct": i % 2 == 0, "ttft_s": float(i), "density": 0.5, "category": "c" + str(i % 2),
             "duration": "short", "error": None} for i in range(1, 11)]
    rows.append({"id": "bad", "error": "missing", "ttft_s": None})
    s = summarize(rows, compare=False)
    assert (s["items"], s["answered"], s["errors"]) == (11, 10, 1)
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["ttft_s"]["p50"] == pytest.approx(5.5) and s["ttft_s"]["p90"] == pytest.approx(9.1)
    assert s["by_category"]["c0"]["accuracy"] == 1.0 and s["by_category"]["c1"]["accuracy"] == 0.0
    assert s["follow_up_questions"] == 0 and "later questions" not in summary_markdown(s)
    for r in rows[:10]:
        r["cached_tokens"] = 0 if int(r["id"]) <= 4 else 1000  # ids 5-10 reused their video's prefix
    s = summarize(rows, compare=False)
    assert (s["first_questions"], s["follow_up_questions"]) == (4, 6)
    assert s["ttft_first_question_mean_s"] == pytest.approx(2.5)
    assert s["ttft_follow_up_question_mean_s"] == pytest.approx(7.5)
    assert "| 4 | 2.500 | 6 | 7.500 |" in summary_markdown(s)


def test_errors_recorded_and_resume_adds_only_missing(tmp_path, videos):
    rows = items_for(6, ["v1.mp4", "v2.mkv"])
    rows[2]["video"] = "broken.mp4"
    rows[4]["video"] = "missing.mp4"
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "res" / "out.jsonl"
    first = run_batch(str(src), "--video-dir", str(videos), "--out", str(out), "--limit", "3", *FAST)
    assert first.returncode == 1, first.stderr  # one of the first three failed
    assert [r["id"] for r in read_lines(out)] == ["q0", "q1", "q2"]  # input order once complete
    second = run_batch(str(src), "--video-dir", str(videos), "--out", str(out), "--attention", "compare",
                       "--mean-correction", "--pattern-per-kv-head", "--alpha", "0.3", "--min-seq-len", "64",
                       "--dense-layers", "1", *FAST)
    assert second.returncode == 1
    lines = read_lines(out)
    assert sorted(r["id"] for r in lines) == [f"q{i}" for i in range(6)]  # none lost, none twice
    by_id = {r["id"]: r for r in lines}
    assert "cannot decode" in by_id["q2"]["error"] and "not found" in by_id["q4"]["error"]
    assert by_id["q0"]["error"] is None and by_id["q0"]["attention"] == "sparse"  # kept from the first run
    assert by_id["q5"]["attention"] == "compare" and set(by_id["q5"]["runs"]) == {"sparse", "dense"}
    # q3 and q5 ask about the same video: q5's dense and sparse runs both reuse q3's caches
    for mode in ("dense", "sparse"):
        assert by_id["q3"]["runs"][mode]["cached_tokens"] == 0 < by_id["q5"]["runs"][mode]["cached_tokens"]
    # each row says what it was asked with: the first run's defaults, the second run's options
    first_config, second_config = by_id["q0"]["config"], by_id["q5"]["config"]
    assert not first_config["mean_correction"] and not first_config["pattern_per_kv_head"]
    assert second_config["mean_correction"] and second_config["pattern_per_kv_head"]
    assert second_config["alpha"] == 0.3 and first_config["alpha"] != 0.3
    assert second_config["min_seq_len"] == 64 and first_config["min_seq_len"] != 64
    assert (by_id["q0"]["dense_layers"], by_id["q5"]["dense_layers"]) == (0, 1)
    assert by_id["q4"]["config"] == second_config  # error rows too
    ok = by_id["q3"]
    assert ok["prediction"] and ok["ttft_s"] > 0 and ok["tokens"]["video"] > 0 and isinstance(ok["correct"], bool)
    summary = json.loads((tmp_path / "res" / "out.summary.json").read_text())
    assert summary["items"] == 6 and summary["errors"] == 2
    assert "| items |" in (tmp_path / "res" / "out.summary.md").read_text()


def test_a_pixel_cap_under_one_patch_stops_the_run_before_any_item(tmp_path, videos):
    """A --max-pixels under the model's smallest frame would fail every item alike: one error line
    and exit 2 before any item runs, not an error row per item."""
    src = write_jsonl(tmp_path / "in.jsonl", items_for(2, ["v1.mp4"]))
    out = tmp_path / "res" / "out.jsonl"
    proc = run_batch(str(src), "--video-dir", str(videos), "--out", str(out), *FAST, "--max-pixels", "700")
    assert proc.returncode == 2, proc.stderr
    assert "error: max_pixels must be at least 784 (one 28 x 28 patch of this model), got 700" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("option, value", [("--max-new-tokens", "0"), ("--limit", "0"), ("--limit", "-1"),
                                           ("--prefetch", "0")])
def test_counts_under_one_stop_the_run_before_any_item(option, value, tmp_path, videos, capsys):
    """--max-new-tokens 0 failed every item alike (an error row each, exit 1); --limit 0 reported an
    input file with no items; --prefetch 0 was taken as 1. Each is one error line and exit 2 now,
    before the model loads, with no results file."""
    from videoprefill.batch import main

    src = write_jsonl(tmp_path / "in.jsonl", items_for(2, ["v1.mp4"]))
    out = tmp_path / "res" / "out.jsonl"
    assert main([str(src), "--video-dir", str(videos), "--out", str(out), option, value]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {option} must be at least 1, got {value}"]
    assert not out.exists()


def test_sigterm_keeps_results_and_rerun_completes(tmp_path, videos):
    src = write_jsonl(tmp_path / "in.jsonl", items_for(40, ["v1.mp4", "v2.mkv"]))
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    slow = [a if a != "2" or FAST[i - 1] != "--max-new-tokens" else "24" for i, a in enumerate(FAST)]
    args = [sys.executable, "-m", "videoprefill.batch", str(src), "--video-dir", str(videos), "--out", str(out), *slow]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    def lines_written() -> int:
        return len(out.read_text().splitlines()) if out.exists() else 0

    while time.time() < deadline and proc.poll() is None and lines_written() < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun" in err and "Traceback" not in err
    partial = read_lines(out)  # every line parses: nothing half written
    assert 2 <= len(partial) < 40
    again = run_batch(str(src), "--video-dir", str(videos), "--out", str(out), *FAST)
    assert again.returncode == 0, again.stderr
    ids = [r["id"] for r in read_lines(out)]
    assert sorted(ids) == sorted(f"q{i}" for i in range(40)) and len(ids) == 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_match_one_process(tmp_path, videos):
    src = write_jsonl(tmp_path / "in.jsonl", items_for(6, ["v1.mp4", "v2.mkv"]))
    single = tmp_path / "single.jsonl"
    assert run_batch(str(src), "--video-dir", str(videos), "--out", str(single), *FAST).returncode == 0
    multi = tmp_path / "multi.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "videoprefill.batch", str(src), "--video-dir", str(videos), "--out", str(multi), *FAST],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = sorted(p.name for p in tmp_path.glob("multi.rank*-of-2.jsonl"))
    assert parts == ["multi.rank0-of-2.jsonl", "multi.rank1-of-2.jsonl"]
    assert all(read_lines(tmp_path / p) for p in parts)  # both ranks did work

    def key(rows):
        return [(r["id"], r["prediction"], r["correct"], r["error"], r["tokens"]) for r in rows]

    assert key(read_lines(multi)) == key(read_lines(single))
    assert (tmp_path / "multi.summary.json").exists()


def test_each_video_is_decoded_once_ahead_of_the_model(tmp_path):
    """run_items with a stand-in for VideoQA: one decode per video, however many questions."""
    from types import SimpleNamespace

    from kernels import FlashPrefillConfig
    from videoprefill.batch import Item, build_parser, run_items

    decoded: list[str] = []

    class StandIn:
        def decode(self, video, sampling):
            decoded.append(video)
            if video == "bad":
                raise ValueError("cannot decode video bad")
            return SimpleNamespace(video=video)

        def prepare_decoded(self, dec, question, count_decode=True):
            return SimpleNamespace(tokens={"video": 4, "text": 2, "total": 6}, first=count_decode)

        def run(self, prepared, mode, max_new_tokens, config, record_masks=False):
            return SimpleNamespace(text="B", timings={"ttft_s": 0.1, "prefill_s": 0.05},
                                   sparsity={"density": 0.5}, tokens={"video": 4, "text": 2, "total": 6, "cached": 0})

    items = [Item(f"q{i}", v, "Q?", ["x", "y"], "B") for i, v in enumerate(["a", "b", "a", "bad", "b", "a"])]
    args = build_parser().parse_args(["in.jsonl", "--video-dir", ".", "--out", "o.jsonl", "--quiet"])
    args.world = 1
    out = tmp_path / "o.jsonl"
    ok, failed, stopped = run_items(StandIn(), items, out, args, config=FlashPrefillConfig(), sampling=None)
    assert (ok, failed, stopped) == (5, 1, False)
    assert decoded == ["a", "b", "bad"]
    rows = {r["id"]: r for r in read_lines(out)}
    assert rows["q0"]["decode_shared"] is False and rows["q2"]["decode_shared"] is True
    assert rows["q3"]["error"] == "cannot decode video bad" and rows["q5"]["correct"] is True
