"""GPU kernels of videoprefill. torch and triton only: nothing here knows of transformers or video."""

from .flash_prefill import BlockSparsePattern, FlashPrefillConfig, dense_attention, flash_prefill, flash_prefill_varlen

__all__ = ["BlockSparsePattern", "FlashPrefillConfig", "dense_attention", "flash_prefill", "flash_prefill_varlen"]
