"""FlashPrefill: block-sparse prefill attention (pattern discovery, max-based selection, sparse flash attention)."""

from .api import block_sparse_attention, dense_attention, find_pattern, flash_prefill, flash_prefill_varlen
from .config import BlockSparsePattern, FlashPrefillConfig

__all__ = [
    "BlockSparsePattern", "FlashPrefillConfig", "block_sparse_attention", "dense_attention", "find_pattern",
    "flash_prefill", "flash_prefill_varlen",
]
