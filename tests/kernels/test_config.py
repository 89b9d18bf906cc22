import pytest
import torch

from kernels import BlockSparsePattern, FlashPrefillConfig


def test_defaults_match_the_paper():
    cfg = FlashPrefillConfig()
    assert (cfg.block_size, cfg.alpha, cfg.sink_blocks, cfg.window_blocks, cfg.last_full_blocks) == (128, 0.1, 2, 4, 2)


def test_frozen():
    with pytest.raises(AttributeError):
        FlashPrefillConfig().alpha = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("block_size", [0, 8, 48, 100, 512, 2.0])
def test_block_size_must_be_power_of_two(block_size):
    with pytest.raises(ValueError, match=str(block_size)):
        FlashPrefillConfig(block_size=block_size)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_range(alpha):
    with pytest.raises(ValueError, match="alpha"):
        FlashPrefillConfig(alpha=alpha)


def test_negative_counts_rejected():
    with pytest.raises(ValueError, match="window_blocks"):
        FlashPrefillConfig(window_blocks=-1)


def test_mean_correction_is_a_bool_and_off_by_default():
    assert FlashPrefillConfig().mean_correction is False
    assert FlashPrefillConfig.for_model("qwen2.5-vl", mean_correction=True).mean_correction is True
    with pytest.raises(ValueError, match="mean_correction"):
        FlashPrefillConfig(mean_correction="yes")  # type: ignore[arg-type]


def test_pattern_per_kv_head_is_a_bool_and_off_by_default():
    assert FlashPrefillConfig().pattern_per_kv_head is False
    with pytest.raises(ValueError, match="pattern_per_kv_head"):
        FlashPrefillConfig(pattern_per_kv_head=1)  # type: ignore[arg-type]


def test_keeps_every_block_is_the_last_full_blocks_rule():
    """True exactly when every query block of the call (the last q_len of kv_len positions) is one of
    the sequence's last `last_full_blocks` (DESIGN.md step 3), checked block by block; `full_rows`
    counts the call's queries in those blocks, position by position."""
    for last_full in (0, 1, 2, 3):
        cfg = FlashPrefillConfig(block_size=32, last_full_blocks=last_full)
        for kv_len in (1, 31, 32, 33, 64, 100, 301):
            num_blocks = -(-kv_len // 32)
            for q_len in range(1, kv_len + 1):
                blocks = {p // 32 for p in range(kv_len - q_len, kv_len)}
                expected = all(b >= num_blocks - last_full for b in blocks)
                assert cfg.keeps_every_block(q_len, kv_len) is expected, (last_full, kv_len, q_len)
                rows = sum(p // 32 >= num_blocks - last_full for p in range(kv_len - q_len, kv_len))
                assert cfg.full_rows(q_len, kv_len) == rows, (last_full, kv_len, q_len)
    assert not FlashPrefillConfig().keeps_every_block(0, 1000)


def test_presets():
    assert FlashPrefillConfig.for_model("qwen2.5-vl").alpha == 0.1
    assert FlashPrefillConfig.for_model("Qwen3-VL").alpha == 0.22
    assert FlashPrefillConfig.for_model("qwen2.5-vl", block_size=64).block_size == 64
    with pytest.raises(ValueError, match="unknown model family"):
        FlashPrefillConfig.for_model("gpt-2")


def test_pattern_dense_round_trip_and_density():
    mask = torch.tensor([[[[1, 0, 0], [1, 1, 0], [0, 1, 1]]]], dtype=torch.bool)
    pattern = BlockSparsePattern.from_dense(mask, block_size=16, q_len=48, kv_len=48)
    assert pattern.kv_num_blocks.tolist() == [[[1, 2, 2]]]
    assert pattern.kv_indices[0, 0, 2, :2].tolist() == [1, 2]
    assert torch.equal(pattern.to_dense(), mask)
    assert pattern.density() == pytest.approx(5 / 6)
    assert "shape=(1, 1, 3, 3)" in repr(pattern)
