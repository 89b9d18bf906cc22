"""The demo training script: a few steps, a checkpoint, and a resume from it."""

from __future__ import annotations

import json

import pytest

from videoprefill.train_demo import main


def test_train_then_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    common = ["--out", str(out), "--accumulate", "1", "--min-frames", "4", "--max-frames", "8", "--eval-samples", "1",
              "--eval-lengths", "8", "--device", "cpu"]
    assert main([*common, "--steps", "2", "--eval-every", "2"]) == 0
    first = json.loads((out / "videoprefill.json").read_text())
    assert first["steps"] == 2 and first["trained"] is True and (out / "checkpoint.pt").exists()
    assert main([*common, "--steps", "3", "--eval-every", "1", "--resume"]) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    record = json.loads((out / "videoprefill.json").read_text())
    assert [h["step"] for h in record["history"]] == [2, 3]
    assert set(record["final_held_out_accuracy"]) == {"needle_mc", "needle_short", "count"}


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--min-frames", "1"], "frames must satisfy 2 <= --min-frames <= --max-frames, got 1 and 64"),
    (["--min-frames", "10", "--max-frames", "8"],
     "frames must satisfy 2 <= --min-frames <= --max-frames, got 10 and 8"),
    (["--eval-lengths", "16", "5"], "--eval-lengths must be even frame counts >= 2, got 5"),
    (["--device", "tpu"], "unknown device 'tpu'; use cpu, cuda or cuda:N"),
])
def test_bad_options_end_in_one_line_before_anything_is_written(argv, message, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--out", str(out), *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert not out.exists()


def test_an_out_path_that_is_a_file_is_reported(tmp_path, capsys):
    taken = tmp_path / "a-file"
    taken.write_text("")
    assert main(["--out", str(taken)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: cannot create the folder {taken}: File exists"]
