"""models.load: a Qwen-VL model and its processor, with FlashPrefill in the language model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from kernels import FlashPrefillConfig

from .attention import DENSE_NAME, RequestSettings, register, set_default_settings
from .text import prepare_language_model
from .vision import prepare_vision_tower

# model_type in config.json -> (family, transformers class name)
SUPPORTED = {
    "qwen2_vl": ("qwen2-vl", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("qwen3-vl", "Qwen3VLForConditionalGeneration"),
}

# The demo model is small and its prompts short: small blocks and no dense floor, so the
# sparsity it shows is FlashPrefill's own choice.
DEMO_CONFIG = FlashPrefillConfig(block_size=32, alpha=0.1, sink_blocks=1, window_blocks=2, last_full_blocks=1,
                                 min_seq_len=0)


class ModelLoadError(ValueError):
    """The model id or path cannot be loaded as a supported Qwen-VL checkpoint."""


@dataclasses.dataclass
class ModelInfo:
    name: str
    family: str
    path: str
    trained: bool
    config: FlashPrefillConfig
    dense_layers: int
    note: str | None = None  # what a small local model can and cannot answer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """The device to load on: `device` (cpu, cuda or cuda:N), checked against this machine, or
    the default."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this machine has no usable CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def _model_config(source: str):
    from transformers import AutoConfig

    # An absolute or ./ ~/ path is a local folder, never a hub id: say so when it is missing
    # instead of passing on the hub's complaint about the id's characters.
    if source.startswith(("/", ".", "~")) and not Path(source).expanduser().is_dir():
        raise ModelLoadError(f"cannot load a model config from {source!r}: no such folder")
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as err:
        raise ModelLoadError(f"cannot load a model config from {source!r}: {str(err).splitlines()[0][:300]}") from err


def load(
    model: str = "demo",
    attention: str = "sparse",
    config: FlashPrefillConfig | None = None,
    dense_layers: int = 0,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
):
    """Load (model, processor). `model` is "demo", a hub id or a local checkpoint folder.

    The text tower runs FlashPrefill ("sparse") or SDPA ("dense"). The vision tower is prepared by
    models.vision.prepare_vision_tower: attention in one call per layer (variable-length flash
    attention on CUDA, SDPA batched per chunk length elsewhere), MLP width padded to a
    multiple of 64, fused RMSNorms, the patch embedding as a matmul and on CUDA the fused rotary
    embedding (the same outputs within bf16 rounding). The language model's RMSNorms and, on CUDA,
    its rotary embedding and gated MLP activations run fused (models.text.prepare_language_model).
    `config` defaults to the family's preset; the first `dense_layers` layers stay dense.
    The model gets a `videoprefill` attribute (ModelInfo).
    """
    import transformers

    from .tiny import ensure_demo

    if attention not in ("sparse", "dense"):
        raise ValueError(f"attention must be 'sparse' or 'dense', got {attention!r}")
    if dense_layers < 0:
        raise ValueError(f"dense_layers must be >= 0, got {dense_layers}")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    is_demo = model == "demo"
    source = str(ensure_demo()) if is_demo else model
    model_config = _model_config(source)
    model_type = model_config.model_type
    if model_type not in SUPPORTED:
        raise ModelLoadError(f"{model!r} is a {model_type!r} model; supported: {', '.join(sorted(SUPPORTED))}")
    layers = getattr(getattr(model_config, "text_config", model_config), "num_hidden_layers", None)
    if layers is not None and dense_layers > layers:
        raise ValueError(f"dense_layers ({dense_layers}) exceeds the {layers} language-model layers of {model!r}")
    family, class_name = SUPPORTED[model_type]
    if config is None:
        config = DEMO_CONFIG if is_demo else FlashPrefillConfig.for_model(family)
    name = register()
    text_attention = name if attention == "sparse" else DENSE_NAME
    cls = getattr(transformers, class_name)
    try:
        net = cls.from_pretrained(
            source, dtype=torch_dtype, attn_implementation={"text_config": text_attention, "vision_config": "sdpa"}
        )
        processor = transformers.AutoProcessor.from_pretrained(source)
    except Exception as err:
        raise ModelLoadError(f"cannot load {model!r}: {str(err).splitlines()[0][:300]}") from err
    net = net.to(device).eval()
    prepare_vision_tower(net)
    prepare_language_model(net)
    record = {"trained": True}
    marker = Path(source) / "videoprefill.json"
    if marker.exists():
        record = json.loads(marker.read_text())
    net.videoprefill = ModelInfo(model, family, source, bool(record.get("trained", False)), config, dense_layers,
                                 record.get("note"))
    set_default_settings(RequestSettings(config=config, dense_layers=dense_layers))
    return net, processor
