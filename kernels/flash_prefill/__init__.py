"""FlashPrefill: block-sparse prefill attention (pattern discovery, max-based selection, sparse flash attention)."""

from .api import dense_attention, flash_prefill, flash_prefill_varlen
from .config import BlockSparsePattern, FlashPrefillConfig

__all__ = ["BlockSparsePattern", "FlashPrefillConfig", "dense_attention", "flash_prefill", "flash_prefill_varlen"]
