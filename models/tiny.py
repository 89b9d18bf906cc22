"""Small Qwen-VL models built locally: the offline demo model and the test models.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a fixed word list with
Qwen's special tokens and a Qwen-style chat template; the weights are initialised from a seed.
The result is a real Qwen2-VL / Qwen2.5-VL / Qwen3-VL architecture of a few million
parameters, saved as an ordinary checkpoint folder that `from_pretrained` reloads offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a an this that video frame frames scene shows show describe what which where when how many is are was "
    "were there in on of at to from with and or but not yes no color colour red green blue yellow white black "
    "orange purple pink grey gray brown square circle triangle star shape shapes moving moves left right up down "
    "still flash flashes bright dark background object objects person people car ball first last middle second "
    "time seconds answer question option letter A B C D E one two three four five six seven eight nine ten "
    "zero 0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' \" ( ) - You are a helpful assistant system user assistant"
).split()

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


def build_tokenizer(vocab_size: int = 1024):
    """Byte-level BPE over a fixed corpus plus Qwen's 14 special tokens, deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(0, len(_WORDS), 7)]
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:], padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _ids(tokenizer) -> dict[str, int]:
    get = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": get("<|image_pad|>"), "video_token_id": get("<|video_pad|>"),
        "vision_start_token_id": get("<|vision_start|>"), "vision_end_token_id": get("<|vision_end|>"),
    }


def build_config(family: str, tokenizer, hidden: int = 128, layers: int = 4, heads: int = 2, kv_heads: int = 1):
    """A small config of the family's real architecture; text head dim 64 (mrope sections sum to 32)."""
    ids = _ids(tokenizer)
    vocab = len(tokenizer)
    text = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    if family == "qwen2.5-vl":
        from transformers import Qwen2_5_VLConfig

        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]}
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "qwen2-vl":
        from transformers import Qwen2VLConfig

        vision = dict(depth=2, embed_dim=64, hidden_size=hidden, mlp_ratio=2, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]}
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "qwen3-vl":
        from transformers import Qwen3VLConfig

        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
        text["head_dim"] = hidden // heads
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [8, 12, 12],
                                   "mrope_interleaved": True}
        return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def build_processor(family: str, tokenizer):
    if family == "qwen3-vl":
        from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

        return Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessor(patch_size=16), tokenizer=tokenizer,
            video_processor=Qwen3VLVideoProcessor(patch_size=16), chat_template=CHAT_TEMPLATE,
        )
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    cls_name = "Qwen2_5_VLProcessor" if family == "qwen2.5-vl" else "Qwen2VLProcessor"
    import transformers

    return getattr(transformers, cls_name)(
        image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE,
    )


def model_class(family: str):
    import transformers

    return {
        "qwen2-vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2.5-vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen3-vl": transformers.Qwen3VLForConditionalGeneration,
    }[family]


def build_tiny(family: str, path: str | os.PathLike, seed: int = 0, **config_overrides) -> Path:
    """Build and save a small model of `family` with its tokenizer and processor at `path`."""
    path = Path(path)
    tokenizer = build_tokenizer()
    config = build_config(family, tokenizer, **config_overrides)
    torch.manual_seed(seed)
    model = model_class(family)(config).eval()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    build_processor(family, tokenizer).save_pretrained(tmp)
    (tmp / "videoprefill.json").write_text(json.dumps({"family": family, "seed": seed, "trained": False}))
    tmp.replace(path) if not path.exists() else None
    return path


SHIPPED_DEMO = Path(__file__).parent / "demo_model"


def shipped_demo() -> Path | None:
    """The trained demo model that ships with the project (videoprefill.train_demo), if present."""
    return SHIPPED_DEMO if (SHIPPED_DEMO / "model.safetensors").exists() else None


def demo_path() -> Path:
    """Where the demo model is cached: $VIDEOPREFILL_HOME/demo-qwen2.5-vl or ~/.cache/videoprefill/..."""
    home = Path(os.environ.get("VIDEOPREFILL_HOME", Path.home() / ".cache" / "videoprefill"))
    return home / "demo-qwen2.5-vl-v1"


def ensure_demo() -> Path:
    """The demo model folder: the shipped trained one, else an untrained one built on first use
    (a few seconds, no downloads)."""
    shipped = shipped_demo()
    if shipped is not None:
        return shipped
    path = demo_path()
    if not (path / "videoprefill.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_tiny("qwen2.5-vl", path, seed=0)
    return path
