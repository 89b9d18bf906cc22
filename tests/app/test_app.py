"""The web UI with the demo model: the /ask API through gradio_client, and a real browser."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The GPU machine has no gradio (its wheels bring decord, qwen-vl-utils and av only); CI installs it.
pytest.importorskip("gradio", reason="gradio is not installed here (the project's install brings it)")

from models.tiny import shipped_demo
from videoprefill.synthetic import DEMO_QUESTION

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = str(ROOT / "videoprefill" / "assets" / "sample.mp4")
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
OUTPUT = ROOT / "test-output"


SERVER_LOG: list[Path | None] = [None]  # the running server's output (`server`)


def server_log_tail(chars: int = 3000) -> str:
    path = SERVER_LOG[0]
    return path.read_text(errors="replace")[-chars:] if path is not None and path.exists() else "(none)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    # The server's output goes to a file: a pipe nobody reads would block the server once 64 KB are
    # written, and a failing test can show the file's end (`server_log_tail`).
    log_path = SERVER_LOG[0] = tmp_path_factory.mktemp("app") / "server.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"app exited: {log_path.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("app did not start")
    yield url
    proc.terminate()
    status = proc.wait(timeout=30)
    log.close()
    assert status == 0, f"the server's exit on SIGTERM: {status}\n{server_log_tail()}"


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def ask(client, video, question, mode, per_kv_head=False, mean_correction=False, *more):
    """/ask with the settings the tests use; `more`: the trailing inputs (max new tokens), left to
    their defaults when not given, as a client written before them would."""
    from gradio_client import handle_file

    return client.predict(handle_file(video), question, mode, 0.1, 32, 2.0, 8, 56 * 56, -1, 0, per_kv_head,
                          mean_correction, *more, api_name="/ask")


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_ask_api_single_mode(client, mode):
    out = ask(client, SAMPLE, "What moves?", mode)
    answer, table = out[0], out[1]
    assert "TTFT" in answer and ("untrained" in answer) is (shipped_demo() is None)
    assert [row[0] for row in table["data"]] == [mode]
    assert table["data"][0][5] > 0  # TTFT ms
    assert "video tokens:" in out[3]


def test_ask_api_compare(client):
    out = ask(client, SAMPLE, "What moves?", "compare")
    answer, table, runs = out[0], out[1], out[7]
    assert answer.startswith("dense:") and "\nsparse:" in answer and "TTFT speed-up" in answer
    assert [row[0] for row in table["data"]] == ["dense", "sparse"]
    assert len(runs["data"]) >= 2  # the session's runs accumulate


def test_ask_api_pattern_per_kv_head(client):
    runs = ask(client, SAMPLE, "What moves?", "sparse", per_kv_head=True)[7]
    assert runs["data"][-1][1] == "sparse, per KV head"


def test_ask_api_mean_correction(client):
    runs = ask(client, SAMPLE, "What moves?", "sparse", mean_correction=True)[7]
    assert runs["data"][-1][1] == "sparse, mean correction"


def test_ask_api_max_new_tokens(client):
    """The answer's length is the setting's: one new token gives a shorter answer than the default."""
    from gradio_client.exceptions import AppError

    short = ask(client, SAMPLE, DEMO_QUESTION, "sparse", False, False, 1)[7]["data"][-1][-1]
    full = ask(client, SAMPLE, DEMO_QUESTION, "sparse")[7]["data"][-1][-1]
    assert 0 < len(short) < len(full)
    with pytest.raises(AppError, match="max new tokens must be at least 1, got 0"):
        ask(client, SAMPLE, DEMO_QUESTION, "sparse", False, False, 0)


def test_bad_upload_is_reported_and_the_app_keeps_serving(client, tmp_path):
    from gradio_client.exceptions import AppError

    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video\n" * 30)
    with pytest.raises(AppError, match="cannot decode video"):
        ask(client, str(bad), "What?", "sparse")
    with pytest.raises(AppError, match="question is empty"):
        ask(client, SAMPLE, "  ", "sparse")
    assert "TTFT" in ask(client, SAMPLE, "Still there?", "sparse")[0]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_browser_upload_ask_and_see_results(server):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    OUTPUT.mkdir(exist_ok=True)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(server, wait_until="networkidle")
        page.locator("#video input[type=file]").set_input_files(SAMPLE)
        # The upload reaches the server after set_input_files returns: Ask once the player shows it.
        page.wait_for_selector("#video video", timeout=120_000)
        page.locator("#question textarea").fill(DEMO_QUESTION)
        page.locator("#ask").click()
        try:
            page.wait_for_function(
                "() => document.querySelector('#answer textarea') && "
                "document.querySelector('#answer textarea').value.includes('TTFT speed-up')", timeout=240_000)
        except PlaywrightTimeout:
            answer = page.locator("#answer textarea").input_value()
            pytest.fail(f"no compare answer after 240 s; the answer box: {answer!r}; the server's output ends:\n"
                        f"{server_log_tail()}")
        answer = page.locator("#answer textarea").input_value()
        assert "sparse:" in answer and "dense:" in answer
        if shipped_demo() is not None:  # the trained demo names the sample's flash colour
            assert answer.count("yellow") == 2, answer
        assert page.locator("#ttft-table").get_by_text("LLM prefill ms").count() >= 1
        for elem in ("#density-heatmap img", "#block-mask img", "#ttft-chart img"):
            page.wait_for_selector(elem, timeout=60_000)
            assert page.locator(elem).first.bounding_box()["width"] > 200
        page.screenshot(path=str(OUTPUT / "app.png"), full_page=True)
        browser.close()
    assert (OUTPUT / "app.png").stat().st_size > 10_000


def test_serves_no_file_outside_its_folders(server):
    import urllib.error
    import urllib.request

    for path in ("/etc/passwd", str(ROOT / "pyproject.toml")):
        for prefix in ("gradio_api/file=", "file="):
            try:
                with urllib.request.urlopen(server + prefix + path, timeout=10) as resp:
                    body = resp.read()
                    assert b"root:" not in body and b"[project]" not in body
            except urllib.error.HTTPError as err:
                assert err.code in (403, 404)


def test_compare_shows_the_sparse_answer_while_dense_runs():
    """In compare mode the page is rendered twice: first with the sparse answer and dense still
    running, then with both, their speed-up and the session's runs in the order they ran. Before
    each, the answer box alone shows that answer as it is generated, with its TTFT."""
    import gradio as gr

    from app.ui import App
    from models import load
    from videoprefill.pipeline import VideoQA

    app = App(VideoQA(*load("demo", device="cpu"), warmup=False))
    steps = list(app.ask_steps(SAMPLE, DEMO_QUESTION, "compare", max_frames=8))
    renders = [i for i, step in enumerate(steps) if isinstance(step[1], list)]
    assert len(renders) == 2 and renders[1] == len(steps) - 1
    (first, first_table, *_, first_runs), (final, final_table, *_, runs) = (steps[i] for i in renders)
    assert first.splitlines()[0] == "dense: running ..." and first.splitlines()[1].startswith("sparse: ")
    assert "speed-up" not in first and [row[0] for row in first_table] == ["sparse"]
    assert final.startswith("dense: ") and "TTFT speed-up" in final
    assert [row[0] for row in final_table] == ["dense", "sparse"]
    assert [row[1] for row in runs] == ["sparse", "dense"] and first_runs == runs[:1]
    # The updates between: the answer box only, the other outputs unchanged.
    sparse_partial, dense_partial = steps[: renders[0]], steps[renders[0] + 1: renders[1]]
    assert sparse_partial and dense_partial
    for _text, *rest in sparse_partial + dense_partial:
        assert all(update == gr.update() for update in rest)
    assert all(s[0].startswith("dense: next\nsparse: ") and "generating" in s[0] for s in sparse_partial)
    sparse_line = first.splitlines()[1]
    assert all(s[0].startswith("dense: ") and "generating" in s[0].splitlines()[0] for s in dense_partial)
    assert all(s[0].splitlines()[1] == sparse_line for s in dense_partial)
    answer = sparse_line.removeprefix("sparse: ").split("  [TTFT")[0]
    ttft = sparse_line.split("[TTFT ")[1].split(" ms")[0]
    assert sparse_partial[-1][0].splitlines()[1].startswith(f"sparse: {answer} ...  [TTFT {ttft} ms, generating]")
    single = app.ask(SAMPLE, DEMO_QUESTION, "sparse", max_frames=8)  # one mode: the last update, which ask returns
    assert "TTFT" in single[0] and "\n" not in single[0] and len(single[7]) == 3


def test_a_streamed_answer_s_error_and_a_closed_page():
    """`streamed`: the answer's error is raised on the caller's thread; a caller that stops early
    (the page closed) sets the request's stop, so its generation ends, and waits for its thread, so
    no request runs beside the next one."""
    from app.ui import streamed
    from videoprefill.pipeline import InputError

    def failing(on_text, stop):
        on_text("a", 0.5)
        raise InputError("the question is empty")

    stream = streamed(failing)
    assert next(stream) == ("a", 0.5)
    with pytest.raises(InputError, match="the question is empty"):
        next(stream)

    seen = {}

    def generating(on_text, stop):
        on_text("first", 0.1)
        seen["stopped"] = stop.wait(30)  # (as generate: until the stop is set)
        seen["finished"] = True
        return "answer"

    stream = streamed(generating)
    assert next(stream) == ("first", 0.1)
    stream.close()
    assert seen == {"stopped": True, "finished": True}

def test_stop_ends_the_answer_and_runs_no_further_mode():
    """Stop pressed while compare's sparse answer is generated: that answer ends after the token
    being made and is shown as stopped, the dense mode is not run, and the next request runs in
    full."""
    from app.ui import App
    from models import load
    from videoprefill.pipeline import VideoQA

    app = App(VideoQA(*load("demo", device="cpu"), warmup=False))
    steps = []
    for step in app.ask_steps(SAMPLE, DEMO_QUESTION, "compare", max_frames=8, max_new_tokens=32):
        steps.append(step)
        if len(steps) == 1:
            app.stop()  # (the first update: the sparse answer's first text)
    final, table, *_, runs = steps[-1]
    assert final.splitlines()[0] == "dense: not run (stopped)"
    assert final.splitlines()[1].startswith("sparse: ") and "(stopped)" in final and "speed-up" not in final
    assert [row[0] for row in table] == ["sparse"] and [row[1] for row in runs] == ["sparse"]
    full = app.ask(SAMPLE, DEMO_QUESTION, "compare", max_frames=8)
    assert "stopped" not in full[0] and "TTFT speed-up" in full[0]


def test_the_ui_warms_up_before_it_decodes(monkeypatch):
    """As VideoQA.ask: the warm-up of each mode asked for runs before the video is decoded, once."""
    from app.ui import App
    from models import load
    from videoprefill.pipeline import VideoQA

    qa = VideoQA(*load("demo", device="cpu"))
    events = []
    warm_up, prepare = qa.warm_up, qa.prepare

    def spy_warm_up(mode, *args, **kwargs):
        before = len(qa._warm)
        warm_up(mode, *args, **kwargs)
        if len(qa._warm) > before:  # it ran (later calls with the same settings return at once)
            events.append(("warm_up", mode))

    monkeypatch.setattr(qa, "warm_up", spy_warm_up)
    monkeypatch.setattr(qa, "prepare", lambda *a, **kw: events.append(("prepare",)) or prepare(*a, **kw))
    App(qa).ask(SAMPLE, DEMO_QUESTION, "compare", max_frames=8)
    assert events == [("warm_up", "dense"), ("warm_up", "sparse"), ("prepare",)]


def test_an_uploaded_video_is_read_before_the_question(monkeypatch):
    """A change of the video (an upload, the sample button), or a sampling setting left or
    submitted, starts reading its frames, out of the request queue, with the sampling settings the
    question will use; the question then takes them and says how long the reading ahead took."""
    import threading

    from app.ui import build
    from models import load
    from videoprefill.pipeline import VideoQA

    qa = VideoQA(*load("demo", device="cpu"), warmup=False)
    demo, app = build(qa)
    ask_dep = next(f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "_ask")
    ahead = [f for f in demo.fns.values() if f.fn == app.decode_ahead]
    triggers = {(target, event) for f in ahead for target, event in f.targets}
    video, settings = ask_dep.inputs[0], ask_dep.inputs[5:8]  # the video; fps, max frames, max pixels
    assert triggers == {(video._id, "change")} | {(c._id, e) for c in settings for e in ("blur", "submit")}
    for f in ahead:
        assert f.queue is False and f.inputs == [video, *settings]
    change = next(f for f in ahead if f.targets[0][1] == "change")

    reads = []
    decode = qa.decode

    def spy(*args, **kwargs):
        reads.append(threading.current_thread().name)
        return decode(*args, **kwargs)

    monkeypatch.setattr(qa, "decode", spy)
    change.fn(SAMPLE, 2.0, 8, 56 * 56)
    # The question comes once the read is done, as after typing it. (Asked at once, the reading
    # thread may not have started before the question waits for it: nothing read ahead then.)
    qa._ahead[1].result(timeout=120)
    out = app.ask(SAMPLE, DEMO_QUESTION, "sparse", fps=2.0, max_frames=8, max_pixels=56 * 56)
    assert len(reads) == 1 and reads[0].startswith("videoprefill-decode-ahead")
    assert "frames read on upload" in out[3]
    app.decode_ahead(None)  # a cleared video: nothing to read
    app.decode_ahead(SAMPLE, 0.0, 8, 56 * 56)  # settings ask will refuse: left to it
    assert qa._ahead is None and len(reads) == 1


@pytest.mark.parametrize("argv, message", [
    (["--port", "0"], "error: --port must be in 1..65535, got 0"),
    (["--port", "70000"], "error: --port must be in 1..65535, got 70000"),
    (["--max-upload-mb", "0"], "error: --max-upload-mb must be >= 1, got 0"),
])
def test_launcher_refuses_bad_options_in_one_line(argv, message, monkeypatch, capsys):
    """Options the server cannot start with end `python -m app` with one error line and exit
    status 2, before any model loads."""
    import models
    from app.__main__ import main

    monkeypatch.setattr(models, "load", lambda *a, **kw: pytest.fail("the model was loaded"))
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]


def _interrupted():
    raise KeyboardInterrupt


@pytest.mark.parametrize("ends, status", [(lambda: 0, 0), (lambda: 2, 2), (_interrupted, 130)])
def test_launcher_exits_through_the_clis_exit(ends, status, monkeypatch, capsys):
    """`python -m app` ends as the CLI does (`videoprefill.run.exit_process`: without Python's
    teardown while an upload is read ahead), with main's status, or 130 and one line when
    interrupted before the server runs (SIGTERM as Ctrl-C; while serving, the server closes and
    main returns 0: the server fixture checks that status)."""
    import app.__main__ as launcher
    from videoprefill import run as run_module

    exits = []
    monkeypatch.setattr(launcher, "main", ends)
    monkeypatch.setattr(run_module, "exit_process", exits.append)
    launcher.run()
    assert exits == [status]
    assert capsys.readouterr().err.strip().splitlines() == (["interrupted"] if status == 130 else [])


def test_launcher_reports_a_taken_port_before_loading_the_model(monkeypatch, capsys):
    """A port another program listens on: one error line naming it, exit status 2, and the model
    (minutes to load for a real checkpoint) never loaded."""
    import models
    from app.__main__ import main

    monkeypatch.setattr(models, "load", lambda *a, **kw: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot serve on 127.0.0.1:{port}: ")
