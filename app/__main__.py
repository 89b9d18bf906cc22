"""python -m app: launch the web UI (offline: no analytics, no share link, no CDN)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")


def _try_bind(host: str, port: int) -> None:
    """OSError where the server could not listen on host:port now (binding as it does, with
    SO_REUSEADDR); the socket is closed again at once."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(address)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from videoprefill.run import add_model_arguments

    p = argparse.ArgumentParser(prog="python -m app", description="videoprefill web UI")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    add_model_arguments(p)
    p.add_argument("--max-upload-mb", type=int, default=512, help="largest accepted upload in MB (default: 512)")
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        print(f"error: --port must be in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    if args.max_upload_mb < 1:
        print(f"error: --max-upload-mb must be >= 1, got {args.max_upload_mb}", file=sys.stderr)
        return 2
    try:  # before the model loads (minutes for a real checkpoint): the port taken, an address not ours
        _try_bind(args.host, args.port)
    except OSError as err:
        print(f"error: cannot serve on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2

    from app.ui import build
    from models import ModelLoadError, load
    from videoprefill.pipeline import VideoQA
    from videoprefill.video import sample_video_path

    try:
        model, processor = load(args.model, device=args.device, dtype=args.dtype)
    except (ModelLoadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    layers = model.config.text_config.num_hidden_layers
    qa = VideoQA(model, processor, mask_layers=tuple(range(layers)))
    qa.graph_decode = not args.no_graph_decode
    demo, _ = build(qa)
    # Stop on SIGTERM as on Ctrl-C: the server closes (requests in flight are not cut by the
    # interpreter's shutdown), `launch` returns, and exit handlers remove the run's plot folder.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=False,
                    max_file_size=f"{args.max_upload_mb}mb", allowed_paths=[str(sample_video_path())], show_error=True,
                    footer_links=["api"])
    except OSError as err:  # the port taken, an address this machine does not have
        print(f"error: cannot serve on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """`python -m app`: `main`, then the process's exit as the CLI's (`videoprefill.run.exit_process`:
    without the rest of Python's teardown while an uploaded video is still read ahead)."""
    from videoprefill.run import exit_process

    try:
        status = main()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before the server runs (while it runs, `launch` returns)
        print("interrupted", file=sys.stderr)
        status = 130
    exit_process(status)


if __name__ == "__main__":
    run()
