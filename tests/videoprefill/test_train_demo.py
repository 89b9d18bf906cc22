"""The demo training script: a few steps, a checkpoint, and a resume from it."""

from __future__ import annotations

import json

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
