"""The mean correction of pruned blocks (FlashPrefillConfig.mean_correction, FlashPrefill V2).

The reference against what the correction claims (exact where a pruned block's keys are equal,
nothing to do where no block is pruned), the Triton kernel and (on an sm90 GPU) the Hopper kernel
against the reference on the same pattern, and flash_prefill's use of the option. On CPU the
Triton kernel runs under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels import FlashPrefillConfig, block_sparse_attention, flash_prefill
from kernels.flash_prefill import api, reference
from kernels.testing import max_abs_error, random_pattern, random_qkv, relative_error, structured_qkv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (batch, q_len, kv_len, query heads, kv heads, head dim, dtype, block size)
CASES = [
    (2, 300, 300, 4, 2, 64, torch.float16, 32),
    (1, 97, 301, 4, 1, 80, torch.bfloat16, 32),  # Tq < Tk, prefix not block aligned, head dim padded
    (1, 200, 200, 2, 1, 128, torch.float16, 16),
    (1, 256, 256, 7, 1, 64, torch.bfloat16, 64),
]


def case_id(case) -> str:
    b, tq, tk, hq, h, d, dtype, bs = case
    return f"B{b}-Tq{tq}-Tk{tk}-HQ{hq}-H{h}-D{d}-{str(dtype)[6:]}-BS{bs}"


def inputs(case, seed: int = 0, equal_keys_per_block: bool = False):
    b, tq, tk, hq, h, d, dtype, bs = case
    q, k, v = random_qkv(b, tq, tk, hq, h, d, dtype=torch.float32, device=DEVICE, seed=seed)
    q = q * 2.0  # peakier rows than unit Gaussians give, so pruning changes the output
    if equal_keys_per_block:  # every key of a block is the block's first key
        k = k[:, ::bs].repeat_interleave(bs, dim=1)[:, :tk].contiguous()
    pattern = random_pattern(b, hq, tk, bs, 0.3, DEVICE, seed=seed, q_len=tq)
    return q.to(dtype), k.to(dtype), v.to(dtype), pattern


def full(q, k, v, pattern) -> torch.Tensor:
    causal = reference.causal_pattern(q.shape[0], q.shape[2], q.shape[1], k.shape[1], pattern.block_size, q.device)
    return reference.sparse_attention(q.double(), k.double(), v.double(), causal, q.shape[-1] ** -0.5, torch.float64)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_correction_is_exact_where_a_pruned_blocks_keys_are_equal(case):
    """A block of equal keys k: sum_j exp(q.k) v_j = |B| exp(q.k) vbar, which is the correction's
    token, so the corrected attention over any pattern is the full attention."""
    q, k, v, pattern = inputs(case, equal_keys_per_block=True)
    q, k, v = q.double(), k.double(), v.double()
    assert pattern.density() < 0.7
    scale = q.shape[-1] ** -0.5
    exact = full(q, k, v, pattern)
    corrected = reference.sparse_attention(q, k, v, pattern, scale, torch.float64, mean_correction=True)
    plain = reference.sparse_attention(q, k, v, pattern, scale, torch.float64)
    assert max_abs_error(corrected, exact) < 1e-10
    assert max_abs_error(plain, exact) > 1e-2  # the pruned blocks mattered


def test_reference_correction_changes_nothing_when_no_block_is_pruned():
    case = CASES[1]
    q, k, v, _ = inputs(case)
    b, tq, tk, hq, h, d, dtype, bs = case
    causal = reference.causal_pattern(b, hq, tq, tk, bs, q.device)
    scale = d**-0.5
    torch.testing.assert_close(
        reference.sparse_attention(q, k, v, causal, scale, mean_correction=True),
        reference.sparse_attention(q, k, v, causal, scale), atol=0, rtol=0,
    )


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_correction_follows_the_formula_on_one_row(case):
    """One query row written out: its kept keys plus one token per pruned block before its own."""
    q, k, v, pattern = inputs(case)
    q, k, v = q.double(), k.double(), v.double()
    b, tq, tk, hq, h, d, dtype, bs = case
    scale = d**-0.5
    out = reference.sparse_attention(q, k, v, pattern, scale, torch.float64, mean_correction=True)
    row, head = tq - 1 - bs, hq - 1  # a row with blocks before its own
    pos = tk - tq + row
    own = pos // bs
    kept = pattern.to_dense()[0, head, own - pattern.first_q_block]
    qi = q[0, row, head]
    kh, vh = k[0, :, head // (hq // h)], v[0, :, head // (hq // h)]
    logits, values = [], []
    for j in range(own + 1):
        keys = range(j * bs, min((j + 1) * bs, pos + 1))
        if kept[j]:
            logits += [scale * float(qi @ kh[t]) for t in keys]
            values += [vh[t] for t in keys]
        elif j < own:  # pruned and seen whole
            logits.append(scale * float(qi @ kh[j * bs : (j + 1) * bs].mean(0)) + math.log(bs))
            values.append(vh[j * bs : (j + 1) * bs].mean(0))
    weights = torch.softmax(torch.tensor(logits, dtype=torch.float64, device=q.device), 0)
    expected = (weights[:, None] * torch.stack(values)).sum(0)
    assert not kept.all()
    torch.testing.assert_close(out[0, row, head], expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_correction_matches_reference_on_same_pattern(case):
    q, k, v, pattern = inputs(case, seed=1)
    scale = q.shape[-1] ** -0.5
    out = block_sparse_attention(q, k, v, pattern, scale, backend="triton", mean_correction=True)
    exact = reference.sparse_attention(q.double(), k.double(), v.double(), pattern, scale, torch.float64,
                                       mean_correction=True)
    low = reference.sparse_attention(q, k, v, pattern, scale, compute_dtype=None, mean_correction=True)
    plain = reference.sparse_attention(q.double(), k.double(), v.double(), pattern, scale, torch.float64)
    assert max_abs_error(out, exact) <= 2 * max_abs_error(low, exact) + 1e-3
    assert max_abs_error(plain, exact) > 10 * max_abs_error(out, exact)  # the correction is there


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=case_id)
def test_kernel_correction_is_exact_where_a_pruned_blocks_keys_are_equal(case):
    q, k, v, pattern = inputs(case, seed=2, equal_keys_per_block=True)
    out = block_sparse_attention(q, k, v, pattern, q.shape[-1] ** -0.5, backend="triton", mean_correction=True)
    assert relative_error(out, full(q, k, v, pattern)) < 0.02


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_flash_prefill_applies_the_configured_correction(backend):
    """flash_prefill with mean_correction: the corrected attention over the pattern it selects."""
    b, tq, tk, hq, h, d, dtype, bs = CASES[0]
    q, k, v = structured_qkv(b, tq, tk, hq, h, d, bs, dtype=dtype, device=DEVICE, seed=3)
    config = FlashPrefillConfig(block_size=bs, alpha=0.3, sink_blocks=1, window_blocks=1, last_full_blocks=0,
                                min_seq_len=0, mean_correction=True)
    out, pattern = flash_prefill(q, k, v, config=config, backend=backend, return_pattern=True)
    assert pattern.density() < 1.0
    scale = d**-0.5
    corrected = reference.sparse_attention(q, k, v, pattern, scale, mean_correction=True)
    plain = reference.sparse_attention(q, k, v, pattern, scale)
    assert max_abs_error(out, corrected) < 0.2 * max_abs_error(plain, corrected)


def test_block_means_of_the_kernel_path_are_the_blocks_means():
    from kernels.flash_prefill import sparse_attention as attention_kernels

    x = torch.randn(2, 100, 3, 40, device=DEVICE)
    means = attention_kernels.block_means(x, 32, 64, torch.float32)
    assert means.shape == (2, 3, 4, 64)
    torch.testing.assert_close(means[..., :40], reference.block_means(x, 32), atol=1e-5, rtol=1e-5)
    assert not means[..., 40:].any()


@pytest.mark.parametrize("row_multiple", [1, 16])
def test_kept_blocks_marks_exactly_the_kept_blocks(row_multiple):
    """The map, its rows padded with zeros to a multiple of row_multiple flags (17 blocks here)."""
    from kernels.flash_prefill import sparse_attention as attention_kernels

    pattern = random_pattern(2, 3, 530, 32, 0.4, DEVICE, seed=4, q_len=300)
    kept = attention_kernels.kept_blocks(pattern.kv_num_blocks, pattern.kv_indices, row_multiple)
    assert kept.dtype == torch.uint8 and kept.is_contiguous()
    assert kept.shape == (*pattern.kv_indices.shape[:-1], 17 if row_multiple == 1 else 32)
    assert torch.equal(kept[..., :17].bool(), pattern.to_dense())
    assert not kept[..., 17:].any()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; run on the GPU machine")
def test_correction_on_the_gpu_at_the_7b_shape():
    """Hopper or not, the corrected attention runs on the Triton kernel and matches the reference."""
    q, k, v = random_qkv(1, 2048, 2048, 28, 4, 128, dtype=torch.bfloat16, device="cuda", seed=5)
    pattern = random_pattern(1, 28, 2048, 128, 0.2, "cuda", seed=5)
    scale = 128**-0.5
    out = api._sparse_attention_triton(q, k, v, pattern, scale, mean_correction=True)
    exact = reference.sparse_attention(q.double(), k.double(), v.double(), pattern, scale, torch.float64,
                                       mean_correction=True)
    low = reference.sparse_attention(q, k, v, pattern, scale, compute_dtype=None, mean_correction=True)
    assert max_abs_error(out, exact) <= 2 * max_abs_error(low, exact) + 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; run on the GPU machine")
@pytest.mark.parametrize("d, dtype", [(128, torch.bfloat16), (64, torch.float16)])
def test_hopper_kernel_attends_the_mean_tokens_itself(d, dtype):
    """The warp-specialised Hopper kernel's own mean correction, past 128 key blocks (so more than
    one tile of block means per query tile), with queries the last of the keys, a partial last
    block (157 blocks: the kept-block map's rows padded) and one head whose rows keep every block
    (nothing to correct there)."""
    from kernels.flash_prefill import sparse_attention_sm90 as hopper_kernels
    from kernels.flash_prefill.config import BlockSparsePattern

    tq, tk, bs = 800, 20000, 128
    q, k, v = random_qkv(1, tq, tk, 4, 1, d, dtype=torch.float32, device="cuda", seed=9)
    q, k, v = (q * 2.0).to(dtype), k.to(dtype), v.to(dtype)
    if not hopper_kernels.supported(q, k, v, bs):
        pytest.skip("the Hopper kernel does not run here (needs an sm90 GPU)")
    keep = random_pattern(1, 4, tk, bs, 0.1, "cuda", seed=9, q_len=tq).to_dense()
    keep[:, 3] = reference.causal_pattern(1, 1, tq, tk, bs, "cuda").to_dense()[:, 0]
    pattern = BlockSparsePattern.from_dense(keep, bs, tq, tk)
    scale = d**-0.5
    out = hopper_kernels.sparse_attention_sm90(q, k, v, pattern.kv_num_blocks, pattern.kv_indices, scale,
                                               mean_correction=True)
    exact = reference.sparse_attention(q.double(), k.double(), v.double(), pattern, scale, torch.float64,
                                       mean_correction=True)
    low = reference.sparse_attention(q, k, v, pattern, scale, compute_dtype=None, mean_correction=True)
    assert max_abs_error(out, exact) <= 2 * max_abs_error(low, exact) + 1e-3
    uncorrected = hopper_kernels.sparse_attention_sm90(q, k, v, pattern.kv_num_blocks, pattern.kv_indices, scale)
    assert max_abs_error(uncorrected[:, :, :3], exact[:, :, :3]) > 10 * max_abs_error(out, exact)
    torch.testing.assert_close(out[:, :, 3], uncorrected[:, :, 3], atol=0, rtol=0)
