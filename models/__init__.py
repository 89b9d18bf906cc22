"""Qwen-VL models with FlashPrefill in the language model: loader, attention function, small local models."""

from .attention import (
    ATTENTION_NAME,
    RequestSettings,
    SparsityRecorder,
    register,
    request_settings,
    set_attention,
)
from .loader import DEMO_CONFIG, ModelInfo, ModelLoadError, load

__all__ = [
    "ATTENTION_NAME", "DEMO_CONFIG", "ModelInfo", "ModelLoadError", "RequestSettings", "SparsityRecorder", "load",
    "register", "request_settings", "set_attention",
]
