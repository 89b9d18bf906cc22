import pytest

from videoprefill.video import Sampling, VideoError, probe, sample_video_path


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


@pytest.mark.parametrize("kwargs,match", [
    ({"fps": 0.0}, "fps"), ({"fps": None, "num_frames": None}, "exactly one"), ({"max_frames": 1}, "max_frames"),
    ({"max_pixels": 0}, "pixel"),
])
def test_sampling_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


def test_sampling_entry_bounds_pixels():
    entry = Sampling(fps=1.0, max_frames=8, max_pixels=3136, min_pixels=10000, total_pixels=50000).video_entry("v.mp4")
    assert entry["max_pixels"] == 3136 and entry["min_pixels"] == 3136
    assert entry["fps"] == 1.0 and entry["max_frames"] == 8 and entry["total_pixels"] == 50000
