"""The Gradio web UI: a video and a question in; answers, TTFT stages and sparsity maps out.

Every number shown comes from videoprefill.pipeline. One model is loaded at start and requests
queue one at a time (one GPU serves one prefill at a time).
"""

from __future__ import annotations

import atexit
import collections
import io
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np

from videoprefill.pipeline import DEFAULT_QUESTION, InputError, VideoQA
from videoprefill.synthetic import DEMO_QUESTION
from videoprefill.video import Sampling, VideoError, sample_video_path

STAGES = ("decode_video_s", "vision_s", "prefill_s", "first_token_s")
STAGE_NAMES = {"decode_video_s": "decode video", "vision_s": "vision encoder", "prefill_s": "LLM prefill",
               "first_token_s": "first token"}
UNTRAINED = "demo model, untrained: the answer text is not meaningful"
RUN_COLUMNS = ["#", "mode", "question", "video tokens", "TTFT ms", "prefill ms", "density", "answer"]


def _figure_to_array(fig) -> np.ndarray:
    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ttft_chart(answers: dict) -> np.ndarray:
    """Stacked horizontal bars: one per run, one segment per TTFT stage."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(answers)))
    colors = ["#8c8c8c", "#4c72b0", "#dd8452", "#55a868"]
    for row, answer in enumerate(answers.values()):
        left = 0.0
        for stage, color in zip(STAGES, colors):
            width = answer.timings[stage] * 1000
            ax.barh(row, width, left=left, color=color, label=STAGE_NAMES[stage] if row == 0 else None)
            left += width
    ax.set_yticks(range(len(answers)), list(answers))
    ax.set_xlabel("milliseconds from the request")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=4, fontsize=8)
    ax.set_title("time to first token by stage")
    fig.tight_layout()
    return _figure_to_array(fig)


def density_plots(answer) -> tuple[np.ndarray, np.ndarray]:
    """Density per layer (line) and per layer and head (heatmap)."""
    plt = _plt()
    per_head = np.array(answer.sparsity["per_head"], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(len(per_head)), per_head.mean(1), marker="o")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("kept / visible blocks")
    ax.set_title(f"density per layer (mean {answer.sparsity['density']:.1%})")
    ax.set_xticks(range(len(per_head)))
    fig.tight_layout()
    line = _figure_to_array(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    im = ax.imshow(per_head.T, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    ax.set_xlabel("layer")
    ax.set_ylabel("query head")
    ax.set_xticks(range(per_head.shape[0]))
    ax.set_yticks(range(0, per_head.shape[1], max(1, per_head.shape[1] // 8)))
    ax.set_title("density per layer and head")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return line, _figure_to_array(fig)


def block_mask_image(answer, layer: int, head: int) -> np.ndarray | None:
    """The kept blocks of one layer and head, large enough to read, video and text ranges marked."""
    masks = answer.sparsity.get("masks") or {}
    if not masks:
        return None
    layer = layer if layer in masks else max(masks)
    heads = masks[layer].shape[0]
    head = min(max(head, 0), heads - 1)
    mask = masks[layer][head].numpy()
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(mask, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    scale = mask.shape[1] / max(answer.sparsity.get("num_tokens") or 1, 1)
    total = mask.shape[1]
    covered = 0.0
    for start, end in answer.sparsity.get("video_ranges", []):
        ax.axvspan(start * scale - 0.5, end * scale - 0.5, color="tab:orange", alpha=0.18, label="video tokens")
        covered = max(covered, end * scale)
    ax.axvspan(covered - 0.5, total - 0.5, color="tab:blue", alpha=0.12, label="text after the video")
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    ax.set_title(f"layer {layer}, head {head}: kept key blocks (black)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _figure_to_array(fig)


def format_answer(answer, label: str = "") -> str:
    prefix = f"{label}: " if label else ""
    after = answer.after_first()
    after = f", then {after}" if after else ""
    text = f"{prefix}{answer.text or '(empty answer)'}  [TTFT {answer.timings['ttft_s'] * 1000:.1f} ms{after}]"
    text += "  (stopped)" if getattr(answer, "stopped", False) else ""
    return text + (f"  ({UNTRAINED})" if not answer.trained else "")


def format_partial(text: str, ttft_s: float, label: str = "") -> str:
    """An answer still being generated: its text so far and its time to first token."""
    prefix = f"{label}: " if label else ""
    return f"{prefix}{text} ...  [TTFT {ttft_s * 1000:.1f} ms, generating]"


_DONE = object()


def streamed(run, stop: threading.Event | None = None, **kwargs):
    """Run `run(..., on_text=..., stop=...)` (`VideoQA.run`) on a thread of its own and yield
    (text, ttft_s) as the answer grows, the latest only when several came since the last yield;
    returns its Answer (raises its error). When the caller stops early (a page closed) it sets
    `stop`, so that generation ends at the next token, and waits for the thread: no request runs
    beside the next one."""
    stop = stop if stop is not None else threading.Event()
    updates: queue.SimpleQueue = queue.SimpleQueue()
    result = {}

    def work():
        try:
            result["answer"] = run(**kwargs, on_text=lambda text, ttft_s: updates.put((text, ttft_s)), stop=stop)
        except BaseException as err:  # raised again on the caller's thread
            result["error"] = err
        finally:
            updates.put(_DONE)

    worker = threading.Thread(target=work, name="videoprefill-answer", daemon=True)
    worker.start()
    try:
        while True:
            pending = [updates.get()]
            while not updates.empty():
                pending.append(updates.get())
            texts = [item for item in pending if item is not _DONE]
            if texts:
                yield texts[-1]
            if pending[-1] is _DONE:
                break
    finally:
        if worker.is_alive():
            stop.set()
        worker.join()
    if "error" in result:
        raise result["error"]
    return result["answer"]


class App:
    """Holds the loaded model and the session's runs; `ask` is the /ask endpoint."""

    def __init__(self, qa: VideoQA):
        self.qa = qa
        self.runs: list[list] = []
        self._stop = threading.Event()  # the request being served stops when it is set (`stop`)
        self.out_dir = Path(tempfile.mkdtemp(prefix="videoprefill-app-"))
        atexit.register(shutil.rmtree, self.out_dir, ignore_errors=True)  # served plots live until exit

    @staticmethod
    def _sampling(fps, max_frames, max_pixels) -> Sampling:
        return Sampling(fps=float(fps), max_frames=int(max_frames), max_pixels=int(max_pixels))

    def decode_ahead(self, video, fps=2.0, max_frames=64, max_pixels=256 * 28 * 28) -> None:
        """When a video is uploaded (or the sample chosen): start reading its frames with the
        current settings (`VideoQA.decode_ahead`), so the question typed meanwhile does not wait for
        them. Settings or a file that cannot be used are left for `ask` to report."""
        if not video:
            return
        try:
            sampling = self._sampling(fps, max_frames, max_pixels)
        except (TypeError, ValueError):
            return
        self.qa.decode_ahead(str(video), sampling)

    def stop(self) -> None:
        """The Stop button: the request being served generates no more tokens after the one being
        made (its prefill runs to its end) and runs no further mode; what it has is shown."""
        self._stop.set()

    def ask(self, *args, **kwargs):
        """The page's outputs when every mode asked for has answered: the last of `ask_steps`."""
        return collections.deque(self.ask_steps(*args, **kwargs), maxlen=1)[0]

    def ask_steps(self, video, question, mode="sparse", alpha=0.1, block_size=128, fps=2.0, max_frames=64,
                  max_pixels=256 * 28 * 28, layer=-1, head=0, per_kv_head=False, mean_correction=False,
                  max_new_tokens=32, progress=None):
        """Answer with one attention mode or both (compare), yielding the page's outputs after each
        mode's answer: in compare mode the sparse one first, so its answer shows while the dense
        prefill (several times longer on a long video) still runs. While an answer is generated,
        the updates between change the answer box only: its text so far, from the first token on
        (`streamed`), with its TTFT."""
        import dataclasses

        import gradio as gr

        if not video:
            raise gr.Error("Upload a video or press 'Use the sample video' first.")
        if mode not in ("sparse", "dense", "compare"):
            raise gr.Error(f"mode must be sparse, dense or compare, got {mode!r}")
        modes = ("dense", "sparse") if mode == "compare" else (mode,)
        answers = {}
        stop = self._stop = threading.Event()  # (a Stop pressed before this request does not count)
        try:
            config = dataclasses.replace(self.qa.config, alpha=float(alpha), block_size=int(block_size),
                                         pattern_per_kv_head=bool(per_kv_head), mean_correction=bool(mean_correction))
            sampling = self._sampling(fps, max_frames, max_pixels)
            if max_new_tokens is None or int(max_new_tokens) < 1:
                raise InputError(f"max new tokens must be at least 1, got {max_new_tokens}")
            new_tokens = int(max_new_tokens)
            if self.qa.warmup and question and question.strip():  # as VideoQA.ask: before decoding
                if progress is not None:
                    progress(0.05, desc="warming up (once per settings)")
                for m in modes:
                    self.qa.warm_up(m, config)
            if progress is not None:
                progress(0.1, desc="decoding the video")
            prepared = self.qa.prepare(str(video), question if question is not None else "", sampling)
            for m in sorted(modes, key=lambda m: m != "sparse"):
                if progress is not None:
                    progress(0.4 if not answers else 0.7, desc=f"{m}: prefill and first token")
                answers[m] = yield from self._growing(
                    answers, modes, m, streamed(self.qa.run, stop=stop, prepared=prepared, attention=m,
                                                max_new_tokens=new_tokens, config=config))
                self._add_run(m, answers[m], prepared, config)
                if stop.is_set() or len(answers) == len(modes):
                    break  # (stopped: the modes not run yet are not run)
                yield self._render({k: answers[k] for k in modes if k in answers}, modes, layer, head)
            yield self._render({k: answers[k] for k in modes if k in answers}, modes, layer, head,
                               stopped=stop.is_set())
        except (InputError, VideoError, ValueError) as err:
            raise gr.Error(str(err)) from None

    def _growing(self, answers: dict, modes: tuple, mode: str, stream):
        """The page's updates while mode's answer is generated (`stream`, from `streamed`): the
        answer box as far as it got, the other outputs left as they are. Returns the Answer."""
        import gradio as gr

        try:
            while True:
                try:
                    text, ttft_s = next(stream)
                except StopIteration as finished:
                    return finished.value
                yield (self._answer_text(answers, modes, (mode, text, ttft_s)), *(gr.update(),) * 7)
        finally:
            stream.close()  # (a page closed mid-answer: its generation stopped, its thread waited for)

    def _add_run(self, name, answer, prepared, config) -> None:
        label = name
        if name == "sparse":
            label += ", per KV head" if config.pattern_per_kv_head else ""
            label += ", mean correction" if config.mean_correction else ""
        self.runs.append([len(self.runs) + 1, label, prepared.question[:60], answer.tokens["video"],
                          round(answer.timings["ttft_s"] * 1000, 1), round(answer.timings["prefill_s"] * 1000, 1),
                          round(answer.sparsity["density"], 4), answer.text[:80]])

    @staticmethod
    def _answer_text(answers: dict, modes: tuple, partial: tuple | None = None, stopped: bool = False) -> str:
        """The answer box: each mode's answer, the one being generated as far as it got (partial:
        its mode, text and TTFT), the others running (next, while another one generates; not run
        when the request was stopped)."""
        def line(m, label):
            if m in answers:
                return format_answer(answers[m], label)
            if partial is not None and partial[0] == m:
                return format_partial(partial[1], partial[2], label)
            if stopped:
                return f"{m}: not run (stopped)"
            return f"{m}: next" if partial is not None else f"{m}: running ..."

        if len(modes) == 1:
            return line(modes[0], "")
        lines = [line(m, m) for m in modes]
        if len(answers) == 2:
            d, s = answers["dense"], answers["sparse"]
            agree = "answers agree" if d.text == s.text else "ANSWERS DIFFER"
            lines.append(f"TTFT speed-up {d.timings['ttft_s'] / s.timings['ttft_s']:.2f}x; {agree}")
        return "\n".join(lines)

    def _render(self, answers: dict, modes: tuple, layer, head, stopped: bool = False) -> tuple:
        """The page's outputs for the answers so far (a mode of `modes` not among them: running, or
        not run when the request was stopped)."""
        main = answers.get("sparse") or next(iter(answers.values()))
        text = self._answer_text(answers, modes, stopped=stopped)
        table = [[name] + [round(a.timings[k] * 1000, 2) for k in (*STAGES, "ttft_s", "total_s")]
                 for name, a in answers.items()]
        tok = main.tokens
        tokens = f"video tokens: {tok['video']}   text tokens: {tok['text']}   total: {tok['total']}"
        if tok.get("cached"):
            tokens += (f"   (the video's {tok['cached']} prompt tokens came from the previous question's cache: "
                       "no decoding, no vision encoder, only the question prefilled)")
        ahead_ms = main.timings.get("decoded_ahead_s", 0.0) * 1000
        if ahead_ms:
            tokens += f"   (frames read on upload, before the question: {ahead_ms:.0f} ms, not in TTFT)"
        line, heat = density_plots(main)
        layers = main.sparsity.get("layers") or [0]
        chosen = layers[-1] if int(layer) < 0 else int(layer)
        mask = block_mask_image(main, chosen, int(head))
        return text, table, ttft_chart(answers), tokens, line, heat, mask, list(self.runs)


def build(qa: VideoQA):
    import gradio as gr

    app = App(qa)
    sample = str(sample_video_path())
    layers = qa.model.config.text_config.num_hidden_layers
    heads = qa.model.config.text_config.num_attention_heads
    with gr.Blocks(title="videoprefill") as demo:
        gr.Markdown("# videoprefill\nAsk a question about a video. The language model's prefill runs "
                    "FlashPrefill block-sparse attention; compare it with dense attention.")
        if not getattr(qa.info, "trained", True):
            gr.Markdown(f"**Model: {qa.info.name} ({UNTRAINED}).**")
        elif getattr(qa.info, "note", None):
            gr.Markdown(f"**Model: {qa.info.name}**: {qa.info.note}.")
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="video", sources=["upload"], format=None, elem_id="video")
                use_sample = gr.Button("Use the sample video", elem_id="use-sample")
                first_question = DEMO_QUESTION if getattr(qa.info, "name", None) == "demo" else DEFAULT_QUESTION
                question = gr.Textbox(label="question", value=first_question, elem_id="question")
                mode = gr.Radio(["sparse", "dense", "compare"], value="compare", label="attention", elem_id="mode")
                with gr.Accordion("settings", open=False):
                    alpha = gr.Slider(0.0, 1.0, value=qa.config.alpha, step=0.01, label="alpha")
                    block = gr.Dropdown([16, 32, 64, 128, 256], value=qa.config.block_size, label="block size")
                    fps = gr.Number(value=2.0, label="frames per second sampled")
                    max_frames = gr.Number(value=64, precision=0, label="max frames")
                    max_pixels = gr.Number(value=256 * 28 * 28, precision=0, label="max pixels per frame")
                    layer = gr.Slider(-1, layers - 1, value=-1, step=1, label="block-mask layer (-1: last)")
                    head = gr.Slider(0, heads - 1, value=0, step=1, label="block-mask head")
                    per_kv_head = gr.Checkbox(value=qa.config.pattern_per_kv_head,
                                              label="one block pattern per KV head (shared by its query heads)")
                    mean_correction = gr.Checkbox(value=qa.config.mean_correction,
                                                  label="pruned blocks as their mean key and value (mean correction)")
                    max_new_tokens = gr.Number(value=32, precision=0, label="max new tokens of an answer")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    stop = gr.Button("Stop", elem_id="stop")
            with gr.Column():
                answer = gr.Textbox(label="answer", lines=4, elem_id="answer")
                tokens = gr.Markdown(elem_id="tokens")
                ttft_table = gr.Dataframe(
                    headers=["run", "decode video ms", "vision ms", "LLM prefill ms", "first token ms", "TTFT ms",
                             "total ms"], label="time to first token", elem_id="ttft-table", interactive=False)
                ttft_plot = gr.Image(label="TTFT stages", elem_id="ttft-chart", type="numpy")
        with gr.Row():
            line = gr.Image(label="density per layer", elem_id="density-line", type="numpy")
            heat = gr.Image(label="density per layer and head", elem_id="density-heatmap", type="numpy")
        mask = gr.Image(label="block mask", elem_id="block-mask", type="numpy", height=640)
        runs = gr.Dataframe(headers=RUN_COLUMNS, label="this session's runs", elem_id="runs", interactive=False)

        use_sample.click(lambda: sample, outputs=video, api_name=False)
        # Out of the queue too: it must reach the request being served, which holds the queue.
        stop.click(app.stop, queue=False, api_name=False, show_progress="hidden")
        # Out of the queue: it only starts a reading thread, and must not wait behind a request. Again
        # when a sampling setting is left or submitted (not on each keystroke); the same video and
        # settings keep the read under way.
        ahead = {"fn": app.decode_ahead, "inputs": [video, fps, max_frames, max_pixels], "queue": False,
                 "api_name": False, "show_progress": "hidden"}
        video.change(**ahead)
        for setting in (fps, max_frames, max_pixels):
            setting.blur(**ahead)
            setting.submit(**ahead)

        def _ask(video, question, mode, alpha, block, fps, max_frames, max_pixels, layer, head, per_kv_head,
                 mean_correction, max_new_tokens=32, progress=gr.Progress()):
            yield from app.ask_steps(video, question, mode, alpha, block, fps, max_frames, max_pixels, layer, head,
                                     per_kv_head, mean_correction, max_new_tokens, progress)

        ask.click(_ask, inputs=[video, question, mode, alpha, block, fps, max_frames, max_pixels, layer, head,
                                per_kv_head, mean_correction, max_new_tokens],
                  outputs=[answer, ttft_table, ttft_plot, tokens, line, heat, mask, runs], api_name="ask")
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo, app
