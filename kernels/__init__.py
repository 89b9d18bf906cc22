"""GPU kernels of videoprefill. torch and triton only: nothing here knows of transformers or video."""

from .flash_prefill import (
    BlockSparsePattern,
    FlashPrefillConfig,
    block_sparse_attention,
    dense_attention,
    find_pattern,
    flash_prefill,
    flash_prefill_varlen,
)

__all__ = [
    "BlockSparsePattern", "FlashPrefillConfig", "block_sparse_attention", "dense_attention", "find_pattern",
    "flash_prefill", "flash_prefill_varlen",
]
