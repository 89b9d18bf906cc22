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


@pytest.mark.parametrize("flag", ["--pattern-per-kv-head", "--per-kv-head"])
def test_accuracy_bench_takes_the_per_kv_head_flag_as_the_other_commands_spell_it(flag):
    """The accuracy benchmark's per-KV-head variant answers to `--pattern-per-kv-head`, as in
    `videoprefill.run` and batch QA (and to its earlier spelling)."""
    from videoprefill.accuracy import build_parser

    assert build_parser().parse_args([flag]).per_kv_head
    assert not build_parser().parse_args([]).per_kv_head
