"""The CPU-side helpers of videoprefill.bench (the benchmark itself needs a CUDA GPU)."""

import pytest

from videoprefill.bench import main, markdown_table


def test_markdown_table_formats_each_column():
    rows = [{"tokens": 16384, "mode": "dense", "density": 1.0, "s": 0.42438},
            {"tokens": 65536, "mode": "sparse", "density": 0.0537, "s": 1.5}]
    table = markdown_table(rows, [("tokens", "tokens", ""), ("attention", "mode", ""), ("density", "density", ".1%"),
                                  ("LLM prefill s", "s", ".3f")])
    assert table.splitlines() == [
        "| tokens | attention | density | LLM prefill s |",
        "|---|---|---|---|",
        "| 16384 | dense | 100.0% | 0.424 |",
        "| 65536 | sparse | 5.4% | 1.500 |",
    ]


def test_prefill_bench_needs_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["prefill"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--video-tokens", "16384", "0"], "--video-tokens must be at least 1, got 0"),
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--fixed-density", "0.05", "1.5"], "--fixed-density must be in (0, 1], got 1.5"),
    (["--fixed-density", "0"], "--fixed-density must be in (0, 1], got 0.0"),
])
def test_prefill_bench_refuses_bad_options_in_one_line(argv, message, capsys):
    """Checked before anything else, on any machine: one error line and exit status 2."""
    assert main(["prefill", *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


@pytest.mark.parametrize("flag", ["--pattern-per-kv-head", "--per-kv-head"])
def test_accuracy_bench_takes_the_per_kv_head_flag_as_the_other_commands_spell_it(flag):
    """The accuracy benchmark's per-KV-head variant answers to `--pattern-per-kv-head`, as in
    `videoprefill.run` and batch QA (and to its earlier spelling)."""
    from videoprefill.accuracy import build_parser

    assert build_parser().parse_args([flag]).per_kv_head
    assert not build_parser().parse_args([]).per_kv_head


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "16", "3"], "--lengths must be even frame counts >= 2, got 3"),
    (["--depths", "-0.5"], "--depths must be fractions in [0, 1], got -0.5"),
    (["--per-cell", "0"], "--per-cell must be >= 1, got 0"),
    (["--block-size", "100"], "block_size must be a power of two in [16, 256], got 100"),
    (["--alphas", "0.1", "1.5"], "alpha must be in [0, 1], got 1.5"),
    (["--model", "/no/such/checkpoint"], "cannot load a model config from '/no/such/checkpoint': no such folder"),
])
def test_accuracy_bench_refuses_bad_options_in_one_line(argv, message, tmp_path, capsys):
    """Options the sweep cannot run with, or a model that does not load, end it with one error line
    and exit status 2 before any video is made, and no results file."""
    from videoprefill.accuracy import main as accuracy_main

    out = tmp_path / "accuracy.json"
    assert accuracy_main([*argv, "--json", str(out), "--heatmap", str(tmp_path / "a.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert not out.exists()


def test_accuracy_bench_runs_on_the_demo_model_in_the_dtype_asked(tmp_path):
    """One needle video through dense and one alpha on the demo model, loaded in the dtype the
    shared `--dtype` option asks for: the results file holds both modes' summaries and the dtype the
    model ran in."""
    import json

    from videoprefill.accuracy import main as accuracy_main

    out, heatmap = tmp_path / "accuracy.json", tmp_path / "acc.png"
    argv = ["--lengths", "16", "--depths", "0.5", "--per-cell", "1", "--alphas", "0.1", "--dtype", "fp32",
            "--device", "cpu", "--json", str(out), "--heatmap", str(heatmap)]
    assert accuracy_main(argv) == 0
    result = json.loads(out.read_text())
    assert result["args"]["dtype"] == "fp32" and result["model_dtype"] == "float32"
    assert set(result["summary"]) == {"dense", "alpha=0.1"}
    assert len(result["rows"]) == 1 and result["rows"][0]["frames"] == 16
    for summary in result["summary"].values():
        assert 0.0 <= summary["accuracy"] <= 1.0 and 0.0 < summary["density"] <= 1.0
    assert heatmap.exists() and (tmp_path / "acc-dense.png").exists()
