import pytest
import torch

from videoprefill.video import Sampling, VideoError, probe, read_frames, sample_video_path, write_test_video


def test_probe_reads_the_sample():
    info = probe(sample_video_path())
    assert info.num_frames == 48 and info.fps == pytest.approx(2.0)
    assert (info.width, info.height) == (112, 112)
    assert info.duration_s == pytest.approx(24.0)


def test_missing(tmp_path):
    with pytest.raises(VideoError, match="not found"):
        probe(tmp_path / "nope.mp4")


def test_directory(tmp_path):
    with pytest.raises(VideoError, match="not a file"):
        probe(tmp_path)


def test_empty(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        probe(path)


def test_not_a_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("these are not frames\n" * 50)
    with pytest.raises(VideoError, match="cannot decode"):
        probe(path)


def test_truncated(tmp_path, sample_video):
    data = open(sample_video, "rb").read()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(VideoError, match="cannot decode"):
        probe(path)


def test_cut_file_fails_at_open_without_the_last_frame(tmp_path):
    """A file cut short with its index at the front (faststart) still opens in FFmpeg, but decord's
    open reads every packet and fails, so skipping the last frame's decode keeps the check."""
    import av
    import numpy as np

    path = tmp_path / "front.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(64):
            frame = np.full((48, 64, 3), (i * 7) % 255, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = path.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")  # the index is before the frames
    assert probe(path, decode_last=False) == probe(path)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(VideoError, match="cannot decode"):
        probe(cut, decode_last=False)


@pytest.mark.parametrize("kwargs,match", [
    ({"fps": 0.0}, "fps"), ({"fps": None, "num_frames": None}, "exactly one"), ({"max_frames": 1}, "max_frames"),
    ({"max_pixels": 0}, "pixel"), ({"total_pixels": 0}, "total_pixels must be positive, got 0"),
    ({"total_pixels": -5}, "total_pixels must be positive, got -5"),
])
def test_sampling_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


def test_sampling_entry_bounds_pixels():
    entry = Sampling(fps=1.0, max_frames=8, max_pixels=3136, min_pixels=10000, total_pixels=50000).video_entry("v.mp4")
    assert entry["max_pixels"] == 3136 and entry["min_pixels"] == 3136
    assert entry["fps"] == 1.0 and entry["max_frames"] == 8 and entry["total_pixels"] == 50000


@pytest.mark.parametrize("entry", [
    {"fps": 2.0, "max_frames": 64, "min_frames": 2},
    {"fps": 4.0, "max_frames": 12, "min_frames": 2, "max_pixels": 60 * 28 * 28, "min_pixels": 4 * 28 * 28},
    {"nframes": 6, "total_pixels": 6 * 50 * 28 * 28},
    {"nframes": 4, "resized_height": 60, "resized_width": 90},
], ids=["fps", "fps-small", "nframes-total", "resized"])
def test_read_frames_is_qwen_vl_utils_sampling(sample_video, entry):
    """read_frames + resize on the CPU give what qwen-vl-utils' process_vision_info gives: the
    same frames bit for bit, the same metadata; so the size rule copied from it holds."""
    from qwen_vl_utils import process_vision_info

    entry = {"type": "video", "video": str(sample_video), **entry}
    _, videos, kwargs = process_vision_info([{"role": "user", "content": [entry]}], return_video_kwargs=True,
                                            return_video_metadata=True, image_patch_size=14)
    expected, metadata = videos[0]
    sampled = read_frames(entry, 14)
    frames = sampled.resized()
    assert sampled.raw.dtype == torch.uint8 and frames.dtype == torch.float32
    assert frames.shape == expected.shape and tuple(frames.shape[2:]) == sampled.size
    assert torch.equal(frames, expected)
    assert sampled.metadata == metadata and kwargs == {"do_sample_frames": False}


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("entry", [
    {"nframes": 24},
    {"fps": 8.0, "max_frames": 64, "min_frames": 2, "video_start": 0.5, "video_end": 3.5},
], ids=["nframes", "fps-range"])
def test_reading_on_threads_gives_qwen_vl_utils_frames(sample_video, monkeypatch, entry, threads):
    """The frames read in runs on several threads are the ones qwen-vl-utils' own decord reader
    returns, in order, bit for bit, with its metadata and sampling rate."""
    from qwen_vl_utils import vision_process as vp

    import videoprefill.video as video

    monkeypatch.setattr(video, "MIN_DECODED_FRAMES_PER_THREAD", 4)  # the sample is short: several runs anyway
    entry = {"type": "video", "video": str(sample_video), **entry}
    expected, metadata, sample_fps = vp.VIDEO_READER_BACKENDS["decord"](entry)
    sampled = read_frames(entry, 14, threads=threads)
    assert sampled.raw.shape == expected.shape and sampled.raw.shape[0] >= 8
    assert torch.equal(sampled.raw, expected)
    assert sampled.metadata == metadata and sampled.sample_fps == pytest.approx(sample_fps)


def test_read_frames_rejects_no_threads(sample_video):
    with pytest.raises(ValueError, match="threads must be at least 1"):
        read_frames({"type": "video", "video": str(sample_video), "nframes": 4}, 14, threads=0)


def test_read_frames_rejects_frames_smaller_than_one_patch(sample_video):
    """A per-frame pixel cap under one merged patch (28 x 28 for patch 14) would resize the frames to
    no pixels at all: a clear error instead; one patch is still taken."""
    entry = {"type": "video", "video": str(sample_video), "nframes": 4}
    message = r"max_pixels must be at least 784 \(one 28 x 28 patch of this model\), got 783"
    with pytest.raises(ValueError, match=message):
        read_frames({**entry, "max_pixels": 783, "min_pixels": 783}, 14)
    assert read_frames({**entry, "max_pixels": 784, "min_pixels": 784}, 14).size == (28, 28)


def test_a_one_frame_video_is_read_as_two_copies_of_its_frame(tmp_path):
    """qwen-vl-utils refuses a video of one frame (its frame count must be even and at most the
    video's); read_frames gives the frame twice at any sampling rate or for a count of 2 (a count of
    4 is still refused)."""
    import decord

    one = write_test_video(tmp_path / "one.mp4", seconds=0.125, fps=8)
    frame = torch.from_numpy(decord.VideoReader(str(one))[0].asnumpy()).permute(2, 0, 1)
    for sampling in (Sampling(fps=2.0), Sampling(fps=30.0, max_frames=64), Sampling(fps=None, num_frames=2)):
        sampled = read_frames(sampling.video_entry(str(one)), 14)
        assert sampled.raw.shape[0] == 2 and torch.equal(sampled.raw[0], frame) and torch.equal(sampled.raw[1], frame)
        assert sampled.metadata["frames_indices"] == [0, 0] and sampled.metadata["total_num_frames"] == 1
    with pytest.raises(VideoError, match="cannot sample frames"):  # more frames than it has, asked for
        read_frames(Sampling(fps=None, num_frames=4).video_entry(str(one)), 14)


def test_read_frames_reports_a_bad_file(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    with pytest.raises(VideoError, match="cannot sample frames"):
        read_frames({"type": "video", "video": str(bad), "nframes": 4}, 14)


@pytest.mark.cuda
def test_resize_on_cuda_matches_the_cpu(sample_video):
    """The resize on the GPU rounds to the same uint8 levels as qwen-vl-utils' CPU resize but for
    rare values one level apart."""
    sampled = read_frames({"type": "video", "video": str(sample_video), "nframes": 16,
                           "resized_height": 84, "resized_width": 140}, 14)
    cpu, gpu = sampled.resized(), sampled.resized("cuda")
    assert gpu.is_cuda and gpu.shape == cpu.shape
    diff = (gpu.cpu() - cpu).abs()
    assert diff.max().item() <= 1 and (diff > 0).float().mean().item() < 1e-3
    assert torch.equal(gpu, gpu.round())


def test_decoded_video_resizes_once_on_the_cpu(sample_video):
    from videoprefill.pipeline import DecodedVideo

    sampled = read_frames({"type": "video", "video": str(sample_video), "nframes": 4}, 14)
    decoded = DecodedVideo(probe(sample_video), sampled, 0.0)
    first = decoded.frames(torch.device("cpu"))
    assert decoded.frames(torch.device("cpu")) is first
    assert torch.equal(first, sampled.resized())


def test_stderr_is_silenced_while_any_thread_probes_and_given_back_after_the_last(tmp_path):
    """Two threads inside the probe's silencing at once, leaving in the order they did not enter in:
    nothing reaches descriptor 2 while either is inside, and it writes where it did before after."""
    import os
    import threading

    from videoprefill.video import _quiet_stderr

    log = tmp_path / "stderr.txt"
    saved = os.dup(2)
    target = os.open(log, os.O_WRONLY | os.O_CREAT)
    os.dup2(target, 2)
    os.close(target)
    try:
        entered, leave_first, first_left = threading.Event(), threading.Event(), threading.Event()

        def first():
            with _quiet_stderr():
                entered.set()
                leave_first.wait(10)
            first_left.set()

        thread = threading.Thread(target=first)
        thread.start()
        entered.wait(10)
        with _quiet_stderr():
            leave_first.set()
            first_left.wait(10)
            os.write(2, b"silenced\n")
        thread.join(10)
        os.write(2, b"after\n")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    assert log.read_text() == "after\n"


def test_a_file_without_a_video_stream(tmp_path):
    """An audio-only file: one plain line, not decord's internal check."""
    import av
    import numpy as np

    path = tmp_path / "speech.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for _ in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="flt", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoError) as info:
        probe(path)
    assert str(info.value) == f"cannot decode video {path}: the file holds no video stream"


def test_decords_own_prefix_is_left_out_of_the_message(tmp_path):
    """An animated GIF, which decord cannot measure: its message without decord's time, source line
    and the file name again."""
    from PIL import Image

    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (112, 112), (i * 20, 100, 50)) for i in range(8)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)
    with pytest.raises(VideoError) as info:
        probe(path)
    message = str(info.value)
    assert message.startswith(f"cannot decode video {path}: ") and message.count(str(path)) == 1
    assert "video_reader.cc" not in message and "[" not in message
