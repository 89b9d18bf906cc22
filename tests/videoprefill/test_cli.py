"""python -m videoprefill.run end to end in a subprocess, offline, with the demo model."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from models.tiny import shipped_demo

TRAINED = shipped_demo() is not None

SMALL = ["--fps", "2", "--max-frames", "8", "--max-pixels", str(56 * 56), "--max-new-tokens", "4", "--device", "cpu"]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "videoprefill.run", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_json_sparse(sample_video):
    proc = run(sample_video, "-q", "What moves?", "--json", *SMALL)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["attention"] == "sparse" and out["model"] == "demo" and out["trained"] is TRAINED
    assert set(out["timings"]) >= {"decode_video_s", "vision_s", "prefill_s", "first_token_s", "ttft_s", "total_s"}
    t = out["timings"]
    assert 0 < t["prefill_s"] < t["ttft_s"] <= t["total_s"]
    assert t["ttft_s"] >= t["decode_video_s"] + t["vision_s"] + t["prefill_s"]
    assert t["decoded_ahead_s"] > 0  # (the frames read while the warm-up ran)
    assert out["tokens"]["video"] > 0 and out["tokens"]["total"] == out["tokens"]["video"] + out["tokens"]["text"]
    assert 0 < out["sparsity"]["density"] <= 1 and len(out["sparsity"]["per_layer"]) == 4


def test_pattern_per_kv_head_flag():
    """The demo model has 2 query heads over 1 KV head: with the flag both keep the same blocks.
    The bundled sample (48 frames) gives 12 blocks, enough for heads to choose differently."""
    from videoprefill.video import sample_video_path

    sample_video = str(sample_video_path())
    settings = ["--json", "--alpha", "0.4", "--min-seq-len", "0", "--fps", "2", "--max-frames", "48",
                "--max-pixels", str(112 * 112), "--max-new-tokens", "2", "--device", "cpu"]
    per_head = {}
    for flag in ([], ["--pattern-per-kv-head"]):
        proc = run(sample_video, *settings, *flag)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["config"]["pattern_per_kv_head"] is bool(flag)
        per_head[bool(flag)] = out["sparsity"]["per_head"]
    assert any(a != b for a, b in per_head[False]), "heads should differ with a pattern per query head"
    assert all(a == b for a, b in per_head[True])


def test_mean_correction_flag_reaches_the_attention(monkeypatch):
    """--mean-correction sets the config the request's attention runs with."""
    from kernels.flash_prefill import api
    from videoprefill import run as run_module
    from videoprefill.video import sample_video_path

    seen = []
    attend = api._attend
    monkeypatch.setattr(api, "_attend", lambda *a, **k: seen.append(a[6]) or attend(*a, **k))
    settings = ["--json", "--alpha", "0.4", "--min-seq-len", "0", "--fps", "2", "--max-frames", "16",
                "--max-pixels", str(112 * 112), "--max-new-tokens", "1", "--device", "cpu", "--no-warmup"]
    assert run_module.main([str(sample_video_path()), *settings, "--mean-correction"]) == 0
    assert seen and all(seen)


@pytest.mark.parametrize("flag", [[], ["--no-graph-decode"]], ids=["default", "no-graph-decode"])
def test_graph_decode_flag_reaches_the_pipeline(flag, monkeypatch, capsys):
    """--no-graph-decode turns the pipeline's graph decoding off (it is on by default; it runs on CUDA)."""
    from videoprefill import pipeline
    from videoprefill import run as run_module
    from videoprefill.video import sample_video_path

    seen = []
    original = pipeline.VideoQA.run
    monkeypatch.setattr(pipeline.VideoQA, "run", lambda self, *a, **k: seen.append(self.graph_decode)
                        or original(self, *a, **k))
    settings = ["--json", "--fps", "2", "--max-frames", "8", "--max-pixels", str(112 * 112), "--max-new-tokens", "1",
                "--device", "cpu", "--no-warmup"]
    assert run_module.main([str(sample_video_path()), *settings, *flag]) == 0
    assert seen == [not flag]
    assert json.loads(capsys.readouterr().out)["timings"]["decoded_ahead_s"] == 0  # (no warm-up to read during)


def test_compare_human_output_and_map(sample_video, tmp_path):
    png = tmp_path / "map.png"
    proc = run(sample_video, "--attention", "compare", "--alpha", "0.5", "--sparsity-map", str(png), *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert "[dense] answer:" in proc.stdout and "[sparse] answer:" in proc.stdout
    assert ("untrained" in proc.stdout) is not TRAINED and "TTFT speed-up" in proc.stdout
    assert "Describe this video." in proc.stdout
    assert proc.stdout.count("frames read during the warm-up") == 2  # (one read, taken by both runs)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_json(sample_video):
    proc = run(sample_video, "--attention", "compare", "--json", *SMALL)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out["runs"]) == {"sparse", "dense"}
    assert isinstance(out["answers_agree"], bool) and out["ttft_speedup"] > 0
    assert out["runs"]["dense"]["sparsity"]["density"] == 1.0


def bad_files(tmp_path, sample_video):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "text.mp4"
    text.write_text("not a video\n" * 40)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(open(sample_video, "rb").read()[:2000])
    return {"missing": str(tmp_path / "missing.mp4"), "empty": str(empty), "text": str(text), "truncated": str(cut)}


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "truncated"])
def test_bad_video_exits_2_with_one_line(kind, tmp_path, sample_video):
    proc = run(bad_files(tmp_path, sample_video)[kind], *SMALL)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


def test_empty_question_exits_2(sample_video):
    proc = run(sample_video, "-q", "   ", *SMALL)
    assert proc.returncode == 2 and "question is empty" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_settings_exit_2(sample_video):
    proc = run(sample_video, "--block-size", "48", *SMALL)
    assert proc.returncode == 2 and "block_size" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(sample_video, *SMALL, "--max-pixels", "100")
    assert proc.returncode == 2 and "max_pixels must be at least 784" in one_error_line(proc)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


def test_unwritable_sparsity_map_fails_before_the_model_runs(sample_video, tmp_path):
    missing = tmp_path / "no-such-folder" / "map.png"
    proc = run(sample_video, "--sparsity-map", str(missing), *SMALL)
    assert proc.returncode == 2 and "does not exist" in one_error_line(proc)
    assert not missing.parent.exists()
    proc = run(sample_video, "--sparsity-map", str(tmp_path / "map.txt"), *SMALL)
    assert proc.returncode == 2 and "must end in one of" in one_error_line(proc)


def test_bad_device_and_dense_layers_exit_2(sample_video):
    import torch

    proc = run(sample_video, "--device", "gpu", *SMALL[:-2])
    assert proc.returncode == 2 and "unknown device 'gpu'" in one_error_line(proc)
    if not torch.cuda.is_available():
        proc = run(sample_video, "--device", "cuda", *SMALL[:-2])
        assert proc.returncode == 2 and "no usable CUDA device" in one_error_line(proc)
    proc = run(sample_video, "--dense-layers", "5", *SMALL)
    assert proc.returncode == 2 and "exceeds the 4 language-model layers" in one_error_line(proc)


def test_several_questions_prefill_the_video_once(monkeypatch, capsys):
    """Each -q is answered in turn in one process: the video is read and encoded once, and a later
    question prefills its own tokens over the video's kept KV cache, with the answer it gets when
    asked alone."""
    from videoprefill import pipeline
    from videoprefill import run as run_module
    from videoprefill.synthetic import DEMO_QUESTION
    from videoprefill.video import sample_video_path

    decodes = []
    decode = pipeline.VideoQA.decode
    monkeypatch.setattr(pipeline.VideoQA, "decode", lambda self, *a, **k: decodes.append(a) or decode(self, *a, **k))
    video = str(sample_video_path())
    settings = ["--json", "--fps", "2", "--max-frames", "16", "--max-pixels", str(112 * 112), "--max-new-tokens", "3",
                "--device", "cpu", "--no-warmup"]
    assert run_module.main([video, "-q", DEMO_QUESTION, "-q", "What moves?", *settings]) == 0
    both = json.loads(capsys.readouterr().out)["questions"]
    assert len(decodes) == 1
    assert [q["question"] for q in both] == [DEMO_QUESTION, "What moves?"]
    first, later = both
    assert first["tokens"]["cached"] == 0 and first["timings"]["vision_s"] > 0
    assert later["tokens"]["cached"] > later["tokens"]["video"] and later["timings"]["vision_s"] == 0
    assert run_module.main([video, "-q", "What moves?", *settings]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["tokens"]["cached"] == 0 and alone["tokens"]["total"] == later["tokens"]["total"]
    assert alone["answer"] == later["answer"]


def test_several_questions_in_a_report_and_in_compare_mode(monkeypatch, capsys):
    """The report gives each question's answer under its own heading as it comes; compare mode keeps
    both modes' KV caches, so a later question reuses both."""
    from videoprefill import run as run_module
    from videoprefill.video import sample_video_path

    settings = [str(sample_video_path()), "-q", "What moves?", "-q", "And then?", "--fps", "2", "--max-frames", "8",
                "--max-pixels", str(112 * 112), "--max-new-tokens", "2", "--device", "cpu", "--no-warmup"]
    assert run_module.main(settings) == 0
    report = capsys.readouterr().out
    assert report.splitlines()[0].endswith("   2 questions")
    assert report.index("question 1/2: What moves?\nanswer: ") < report.index("question 2/2: And then?\nanswer: ")
    assert report.count("of them from the kept KV cache") == 1
    assert run_module.main([*settings, "--attention", "compare", "--json"]) == 0
    later = json.loads(capsys.readouterr().out)["questions"][1]
    assert all(run["tokens"]["cached"] > 0 for run in later["runs"].values())


def test_interactive_questions_from_standard_input(monkeypatch, capsys):
    """-i answers the -q questions, then each non-empty line of standard input until its end, each
    later one over the kept KV cache; on a terminal each line is prompted for on stderr."""
    from videoprefill import run as run_module
    from videoprefill.video import sample_video_path

    class TerminalInput(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", TerminalInput("What moves?\n\n  \nAnd then?\n"))
    argv = [str(sample_video_path()), "-q", "Describe it.", "-i", "--fps", "2", "--max-frames", "8", "--max-pixels",
            str(112 * 112), "--max-new-tokens", "2", "--device", "cpu", "--no-warmup"]
    assert run_module.main(argv) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].endswith("   questions from standard input")
    headings = [line for line in out.splitlines() if line.startswith("question ")]
    assert headings == ["question 1: Describe it.", "question 2: What moves?", "question 3: And then?"]
    assert out.count("of them from the kept KV cache") == 2
    assert err.count(run_module.QUESTION_PROMPT) == 5  # (four lines read, then the end)


def test_interactive_from_a_pipe_and_its_bad_uses(sample_video):
    """From a pipe no prompt is written; nothing read is not an error; --json is refused."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "videoprefill.run", sample_video, "-i", *SMALL]
    proc = subprocess.run(command, input="What moves?\n", capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "question 1: What moves?\nanswer: " in proc.stdout and "question (" not in proc.stderr
    proc = subprocess.run(command, input="", capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout == ""
    assert [line for line in proc.stderr.splitlines() if line.strip()] == ["no question asked"]
    proc = run(sample_video, "-i", "--json", *SMALL)
    assert proc.returncode == 2
    assert one_error_line(proc) == "error: --interactive prints a report per answer; leave out --json"


def test_the_process_ends_without_teardown_while_a_video_is_read_ahead(monkeypatch):
    """`-i` with nothing read leaves the video read started ahead running in decord: the CLI then
    ends with os._exit, since Python's exit would end decord's threads under the read and abort the
    process ("terminate called without an active exception", seen once in CI), after the exit
    handlers. Otherwise it exits as usual."""
    import atexit
    import threading

    from videoprefill import pipeline
    from videoprefill import run as run_module

    exits: list[int] = []
    monkeypatch.setattr(run_module.os, "_exit", exits.append)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: exits.append("exit handlers"))
    with pytest.raises(SystemExit) as ended:
        run_module.exit_process(3)
    assert ended.value.code == 3 and exits == []
    release = threading.Event()
    reader = threading.Thread(target=release.wait, name=pipeline.READ_AHEAD_THREAD, daemon=True)
    reader.start()
    try:
        with pytest.raises(SystemExit):  # (os._exit, stood in for, returns)
            run_module.exit_process(0)
    finally:
        release.set()
        reader.join()
    assert exits == ["exit handlers", 0]


def test_an_empty_question_among_several_exits_2(sample_video):
    proc = run(sample_video, "-q", "What moves?", "-q", " ", *SMALL)
    assert proc.returncode == 2 and one_error_line(proc) == "error: question 2 is empty"


def test_a_failed_later_question_keeps_the_answers_before_it(monkeypatch, capsys):
    """With --json the answers already made are printed with the error; the error line and exit
    status are a single question's."""
    from videoprefill import pipeline
    from videoprefill import run as run_module
    from videoprefill.video import sample_video_path

    ask = pipeline.VideoQA.ask
    calls = []

    def ask_once(self, *args, **kwargs):
        calls.append(args[1])
        if len(calls) > 1:
            raise RuntimeError("out of memory")
        return ask(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.VideoQA, "ask", ask_once)
    argv = [str(sample_video_path()), "-q", "What moves?", "-q", "And then?", "--json", "--fps", "2", "--max-frames",
            "8", "--max-pixels", str(112 * 112), "--max-new-tokens", "2", "--device", "cpu", "--no-warmup"]
    assert run_module.main(argv) == 1
    out, err = capsys.readouterr()
    partial = json.loads(out)
    assert [q["question"] for q in partial["questions"]] == ["What moves?"]
    assert partial["error"] == "error: RuntimeError: out of memory" == err.strip()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("attention", ["sparse", "compare"])
def test_a_terminal_sees_the_answer_as_it_is_generated(attention, monkeypatch):
    """On a terminal the answer is shown from its first token on, on one line rewritten in place
    and wiped before the report; the report is what a pipe gets. Not on a pipe, nor with --json."""
    from videoprefill import run as cli
    from videoprefill.synthetic import DEMO_QUESTION
    from videoprefill.video import sample_video_path

    argv = [str(sample_video_path()), "-q", DEMO_QUESTION, "--attention", attention, "--no-warmup",
            "--device", "cpu", "--max-new-tokens", "4"]
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert cli.main(argv) == 0
    shown = terminal.getvalue()
    live, _, report = shown.rpartition("\r\033[K")
    labels = ["[dense] ", "[sparse] "] if attention == "compare" else [""]
    for label in labels:
        assert f"\r\033[K{label}answer so far (first token after " in live
    assert "answer so far" not in report and "\r" not in report
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stdout", pipe)
    assert cli.main(argv) == 0
    assert "\r" not in pipe.getvalue() and "answer so far" not in pipe.getvalue()
    # The same report but for the timings.
    strip = [line.split("TTFT")[0] for line in report.splitlines()]
    assert strip == [line.split("TTFT")[0] for line in pipe.getvalue().splitlines()]
    if TRAINED:
        assert "answer: yellow" in report and "): yellow ..." in live
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert cli.main([*argv, "--json"]) == 0
    assert "\r" not in terminal.getvalue()


def test_the_live_line_fits_the_terminal_in_columns(monkeypatch):
    """The line shown while the answer is generated keeps its end within the terminal's width,
    counted in columns: a Chinese character takes two, a combining mark none."""
    from videoprefill.run import LiveAnswer, fit_columns

    assert fit_columns("yellow", 6) == "yellow"
    assert fit_columns("yellow square", 10) == "... square"
    assert fit_columns("答案是黄色", 10) == "答案是黄色"
    assert fit_columns("答案是黄色", 9) == "...是黄色"  # 3 + 6 columns
    assert fit_columns("答案是黄色", 8) == "...黄色"
    assert fit_columns("cafe\u0301", 4) == "cafe\u0301"  # (e and its accent in one column)
    monkeypatch.setattr("shutil.get_terminal_size", lambda *a: os.terminal_size((41, 24)))
    terminal = _Terminal()
    LiveAnswer(terminal).show("", "视频里闪过的颜色是黄色，然后方块向右移动。" * 2, 0.1)
    line = terminal.getvalue().removeprefix("\r\033[K")
    assert line.startswith("...") and line.endswith("。 ...")
    assert sum(2 if "\u4e00" <= c <= "\u9fff" or c in "，。" else 1 for c in line) <= 40


def test_the_report_gives_the_time_per_token_after_the_first():
    """(total - TTFT) / (new tokens - 1), in the CLI's report and the web UI's answer line; nothing
    for a one-token answer."""
    from videoprefill.pipeline import Answer
    from videoprefill.run import _human

    timings = {"decode_video_s": 0.01, "vision_s": 0.02, "prefill_s": 0.05, "first_token_s": 0.002, "ttft_s": 0.1,
               "total_s": 0.13}
    sparsity = {"per_layer": [0.5], "density": 0.5}
    tokens = {"video": 10, "text": 5, "total": 15}
    answer = Answer("yellow square", "sparse", "demo", True, timings, tokens, sparsity, {}, new_tokens=4)
    assert answer.ms_per_token == pytest.approx(10.0)
    assert "(total 130.0 ms; 3 more tokens at 10.0 ms each)" in _human(answer)
    one = Answer("yes", "sparse", "demo", True, timings, tokens, sparsity, {}, new_tokens=1)
    assert one.ms_per_token is None and "(total 130.0 ms)\n" in _human(one)
    two = Answer("yes", "sparse", "demo", True, timings, tokens, sparsity, {}, new_tokens=2)
    assert two.after_first() == "1 more token at 30.0 ms each"
    from app.ui import format_answer  # (gradio is imported only when the page is built)

    expected = "sparse: yellow square  [TTFT 100.0 ms, then 3 more tokens at 10.0 ms each]"
    assert format_answer(answer, "sparse") == expected
    assert format_answer(one) == "yes  [TTFT 100.0 ms]"


def test_an_error_while_the_video_is_read_ahead_is_seen():
    """Reading a video silences file descriptor 2 for the whole process (the native readers write
    there). An error the CLI hits while its video is read ahead, during the warm-up, waits for the
    read to end and is printed where stderr goes (a process of its own: its real descriptor 2)."""
    from videoprefill.video import sample_video_path

    code = """
import sys, threading, time
from videoprefill import run as cli, video
from videoprefill.pipeline import VideoQA
reading = threading.Event()
def slow_read(self, path, sampling):
    with video._quiet_stderr():
        reading.set()
        time.sleep(1.0)
    return self.decode(path, sampling)
def failing_warm_up(self, *args, **kwargs):
    assert reading.wait(10)
    raise RuntimeError("the warm-up failed")
VideoQA._read_ahead = slow_read
VideoQA.warm_up = failing_warm_up
sys.exit(cli.main(sys.argv[1:]))
"""
    argv = [str(sample_video_path()), "--device", "cpu", "--max-frames", "8", "--max-pixels", str(112 * 112)]
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and one_error_line(proc) == "error: RuntimeError: the warm-up failed"
