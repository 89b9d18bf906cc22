"""The vision tower of a loaded Qwen-VL model without transformers' slow paths: attention in one
call per layer (on CUDA variable-length flash attention, or for Qwen2.5-VL's windows our kernel
with the rotary embedding; SDPA batched per chunk length elsewhere), MLP widths aligned, the
rotary embedding and the RMSNorms fused, the patch embedding as a matmul. Same outputs within
bf16 rounding (BENCHMARKS.md: 8x less vision time at 128K video tokens on an H200).

Qwen-VL vision towers attend within chunks of the packed patch sequence: windows of 8 x 8
patches in Qwen2.5-VL's windowed layers, one frame pair otherwise (`cu_seqlens`). On every
attention implementation but flash-attn, transformers' vision attention splits the sequence at
`cu_seqlens` and calls SDPA once per chunk: for 128K video tokens that is about 8K windows x 28
layers, a quarter of a million launches, and the vision encoder is bound by host time
(BENCHMARKS.md). Here, on CUDA, all chunks of a layer run as one call of PyTorch's
variable-length flash-attention kernel (`VARLEN_FLASH`), which takes the packed sequence and its
chunk bounds as they are, or, where no chunk is longer than 64 tokens (Qwen2.5-VL's windowed
layers), as one call of `kernels.window_attention` with the rotary embedding (`FUSED_WINDOWS`).
Elsewhere, and for inputs that kernel does not take, chunks of one
length, independent attention problems of one shape, run as the batch of one SDPA call; a video
at one resolution has one to four distinct lengths (windows at the right and bottom edges are
smaller). All compute the same attention: the batched SDPA calls bit-identical to the per-chunk
ones on an H200 at 128K video tokens, the two kernels within bf16 rounding (BENCHMARKS.md).

transformers gives no interface point for packed chunks outside flash-attn (a registered
function is called once per chunk, after the split), so `batch_vision_attention` replaces the
`forward` of each vision attention module of a loaded model by `_batched_forward`: the module's
own `qkv` and `proj` layers, the rotary embedding (`kernels.rope` on CUDA, the modeling file's
`apply_rotary_pos_emb_vision` elsewhere: the same map), and `chunked_attention` where the
per-chunk loop was. Modules it does not recognise stay as they are.

`align_mlp_width` zero-pads the hidden width of the vision tower's gated MLPs to a multiple of 64.
Qwen2.5-VL's is 3420: rows of 6840 bytes, which cuBLAS's Hopper (TMA) kernels do not take, so
its MLP products ran on Ampere-generation kernels at well under half the speed (BENCHMARKS.md).
The padded features are 0 after `up_proj`, so `act(gate) * up` is 0 there and `down_proj`'s
padded columns add nothing: the same function.

`fuse_norms` runs Qwen2.5-VL's RMSNorms through `torch.nn.functional.rms_norm` (one kernel)
instead of transformers' fp32 chain of casts, power, mean and products (models.fused, which also
fuses the gated MLPs' `silu(gate) * up` on CUDA); `fuse_block_adds` runs each block's residual
add after the attention and the RMSNorm after it as one kernel on CUDA (`kernels.rms_norm`: four
passes over the hidden states instead of five), which also adds the MLP's output bias to the sum
it writes, so that the MLP's down projection then adds its product into it in place
(`ACCUMULATE_MLP`): the residual add after the MLP has no pass of its own; `patch_embed_as_matmul`
runs the patch embedding's Conv3d, whose kernel is its stride and its input one patch, as the
matmul it is (cuDNN's implicit-GEMM convolution took 62 ms at 128K video tokens, the matmul 2.4).

`prepare_vision_tower` applies all of them; `models.load` and the 7B bench call it. Each is
undone by the same function with enabled=False (benchmarks compare with transformers' tower).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from kernels.rope import launch as launch_rope
from kernels.rope import supported as rope_supported
from kernels.runtime import flash_attention_takes
from kernels.window_attention import MAX_CHUNK, window_attention
from kernels.window_attention import supported as windows_supported

from .fused import (
    PATCHED,
    fuse_mlp_activations,
    fuse_rms_norms,
    gated_mlp_width,
    is_rms_norm,
    norm_and_mlp_residuals,
    set_forward,
    tower,
)
from .host import ReadOnce

# On CUDA the rotary embedding runs as one Triton kernel (kernels.rope) instead of transformers'
# dozen fp32 passes; False keeps transformers' function (for comparisons).
FUSED_ROPE = True
_WIDTH = "_videoprefill_stock_width"


class _Layout:
    """A cu_seqlens tensor read on the host: its bounds, whether they rise from 0, the one chunk
    length when every non-empty chunk has it, and, per device, the token ids of its chunks
    grouped by length."""

    def __init__(self, bounds: list[int]):
        self.bounds = bounds
        self.rising = len(bounds) >= 2 and bounds[0] == 0 and all(b >= a for a, b in zip(bounds, bounds[1:]))
        lengths = {b - a for a, b in zip(bounds, bounds[1:])} - {0}
        self.uniform = next(iter(lengths)) if len(lengths) == 1 else None
        self.longest = max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.packed: dict[str, torch.Tensor] = {}

    def grouped(self, device: torch.device) -> list[torch.Tensor]:
        """For each chunk length n, the (chunks, n) token ids of the chunks of that length, on `device`."""
        if str(device) not in self.rows:
            starts = torch.tensor(self.bounds[:-1])
            sizes = torch.tensor(self.bounds[1:]) - starts
            self.rows[str(device)] = [(starts[sizes == n][:, None] + torch.arange(n)).to(device)
                                      for n in sorted(set(sizes.tolist()) - {0})]
        return self.rows[str(device)]

    def offsets(self, device: torch.device) -> torch.Tensor:
        """The bounds without empty chunks, int32 on `device` (variable-length kernels' cu_seqlens)."""
        if str(device) not in self.packed:
            unique = [b for i, b in enumerate(self.bounds) if i == 0 or b != self.bounds[i - 1]]
            self.packed[str(device)] = torch.tensor(unique, dtype=torch.int32).to(device)
        return self.packed[str(device)]


_LAYOUT_READS = ReadOnce()

# On NVIDIA GPUs, for the inputs PyTorch's flash-attention kernel takes (fp16 / bf16, head dim a
# multiple of 8 up to 256, sm80+), all chunks run as one variable-length call of that kernel: no
# gathers and no per-shape plans. SDPA's own choice on Hopper, cuDNN, builds a plan for each new
# set of batch sizes, and the windows' batch sizes change with every video length (0.08-0.39 s more
# on the first call at each new length). At 131K video tokens the flash call also takes 7-10% less
# time on a 640 x 360 video, and as long where every window is whole (BENCHMARKS.md, twelfth
# session). False: SDPA per chunk length everywhere.
VARLEN_FLASH = True

# On CUDA, in fp16 / bf16, layers whose chunks are all at most kernels.window_attention.MAX_CHUNK
# tokens long (Qwen2.5-VL's windowed layers) run the rotary embedding and the attention in one
# kernel of ours, which neither pads a window to a 128-row tile nor writes q and k back rotated:
# 2.23 against 4.68 ms per layer at 131K video tokens on an H200 (BENCHMARKS.md). Needs
# FUSED_ROPE. False: the rotary embedding, then the attention as above.
FUSED_WINDOWS = True

# In the blocks that fuse_block_adds prepares, on CUDA, the residual add after the gated MLP is done
# by its down projection: the add and norm2 kernel writes the sum plus the projection's bias, and
# the product is added into it in place (models.fused.add_into), so that add reads and writes
# nothing of its own (BENCHMARKS.md, thirteenth session). False: `h + mlp(norm2 output)`.
ACCUMULATE_MLP = True

# Where SDPA runs, chunks of unequal lengths are gathered into a batch per length, at most this
# many tokens at a time: the copies of q, k and v and the result then hold at most 4 x 65,536
# tokens (0.67 GB in Qwen2.5-VL's tower) instead of most of the video's patches (3.2 GB at 131K
# video tokens of 640 x 360 frames, BENCHMARKS.md). 0: all at once.
GATHER_TOKENS = 65536


def _layout(cu_seqlens: torch.Tensor, s: int) -> _Layout:
    """cu_seqlens read on the host, with its chunks' token ids: once per tensor (models.host; the
    tower hands every layer of a kind the same one). Each read waits for the GPU, and so does each
    copy of token ids to it. ValueError unless the bounds rise from 0 to the sequence length s."""
    layout = _LAYOUT_READS.get(cu_seqlens, lambda: _Layout(cu_seqlens.tolist()))
    bounds = layout.bounds
    if not layout.rising or bounds[-1] != s:
        raise ValueError(f"cu_seqlens must rise from 0 to the sequence length {s}, got {bounds[:4]}...{bounds[-2:]}")
    return layout


def _takes_varlen_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `_varlen_flash` runs on these (S, H, D) inputs."""
    return VARLEN_FLASH and k.dtype == v.dtype == q.dtype and k.shape == v.shape == q.shape and flash_attention_takes(q)


def _varlen_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, longest: int,
                  scale: float) -> torch.Tensor:
    """Non-causal attention within the chunks [offsets[i], offsets[i + 1]) of packed (S, H, D)
    inputs, in one call of PyTorch's variable-length flash-attention kernel (the one SDPA's flash
    backend runs). `longest`: the longest chunk."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return torch.ops.aten._flash_attention_forward(q, k, v, offsets, offsets, longest, longest, 0.0, False, False,
                                                   scale=scale)[0]


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Non-causal attention within each chunk [cu_seqlens[i], cu_seqlens[i + 1]) of a packed sequence.

    q, k, v: (S, H, D), any strides; cu_seqlens: int (n + 1,), 0 first and S last, non-decreasing.
    Returns (S, H, D) in q's dtype. One variable-length flash-attention call for the inputs it
    takes (VARLEN_FLASH), otherwise one SDPA call per distinct chunk length (per GATHER_TOKENS
    tokens of it when the lengths differ); reads the lengths on the host once per cu_seqlens tensor
    (`_layout`).
    """
    s, h, d = q.shape
    layout = _layout(cu_seqlens, s)
    if s and _takes_varlen_flash(q, k, v):
        return _varlen_flash(q, k, v, layout.offsets(q.device), layout.longest, scale)
    if layout.uniform is not None:  # every chunk of one length: a view, no copy
        n = layout.uniform
        qb, kb, vb = (x.unflatten(0, (s // n, n)).transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(qb, kb, vb, scale=scale).transpose(1, 2).reshape(s, h, d)
    out = torch.empty(s, h, d, dtype=q.dtype, device=q.device)
    for group in layout.grouped(q.device):  # (chunks, n) token ids
        step = max(1, GATHER_TOKENS // group.shape[1]) if GATHER_TOKENS else group.shape[0]
        for first in range(0, group.shape[0], step):
            rows = group[first : first + step]
            qb, kb, vb = (x[rows].transpose(1, 2) for x in (q, k, v))
            out[rows] = F.scaled_dot_product_attention(qb, kb, vb, scale=scale).transpose(1, 2)
    return out


# Devices where the fused window kernel did not fit (the error), so the unfused path runs there.
_NO_WINDOWS: dict[str, str] = {}


def _windows_here(q: torch.Tensor) -> bool:
    """Whether the fused window kernel runs for q's device: CUDA (the tests also run it on the CPU,
    under Triton's interpreter)."""
    return q.is_cuda


def _batched_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
    stock = getattr(self, PATCHED)
    if position_embeddings is None or (self.training and self.attention_dropout > 0):
        return stock(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    s = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(s, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    if FUSED_WINDOWS and FUSED_ROPE and _windows_here(q) and str(q.device) not in _NO_WINDOWS:
        layout = _layout(cu_seqlens, s)
        offsets = layout.offsets(q.device)
        if s and layout.longest <= MAX_CHUNK and windows_supported(q, k, v, offsets, cos, sin):
            try:
                out = window_attention(q, k, v, offsets, self.scaling, cos, sin)
                return self.proj(out.reshape(s, -1))
            except OutOfResources as error:  # less shared memory than the kernel holds: not on this GPU
                _NO_WINDOWS[str(q.device)] = str(error)
    if FUSED_ROPE and q.is_cuda and rope_supported(q, k, cos, sin):
        q, k = launch_rope(q, k, cos, sin)
    else:
        q, k = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
    out = chunked_attention(q, k, v, cu_seqlens, self.scaling)
    return self.proj(out.reshape(s, -1))


def _recognised(module: torch.nn.Module) -> bool:
    """A Qwen-VL vision attention module with the layout `_batched_forward` relies on."""
    return (
        type(module).__name__.endswith("VisionAttention")
        and all(hasattr(module, a) for a in ("qkv", "proj", "num_heads", "scaling", "config"))
        and hasattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb_vision")
        and getattr(module.config, "_attn_implementation", None) == "sdpa"
    )


def batch_vision_attention(model: torch.nn.Module, enabled: bool = True) -> int:
    """Run the vision attention modules of `model` as `chunked_attention` (enabled) or as
    transformers wrote them (not enabled). Returns how many modules are now batched."""
    return set_forward(_vision_tower(model).modules(), _recognised, _batched_forward, enabled)


def fuse_norms(model: torch.nn.Module, enabled: bool = True) -> int:
    """Run the vision tower's RMSNorms as torch.nn.functional.rms_norm (enabled) or as
    transformers wrote them (not enabled). Returns how many run fused now."""
    return fuse_rms_norms(_vision_tower(model), enabled)


def _add_norm_here(x: torch.Tensor) -> bool:
    """Whether the fused add and RMSNorm runs for x's device: CUDA (the tests also run it on the
    CPU, under Triton's interpreter)."""
    return x.is_cuda


def _add_norm_block_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The block's `h = h + attn(norm1(h)); h + mlp(norm2(h))` with the middle add and norm2 as one
    kernel, the sum written over the attention's output; while ACCUMULATE_MLP, where the MLP runs
    the fused forward, the last add done by the MLP's down projection adding into that sum."""
    stock = getattr(self, PATCHED)
    differentiable = torch.is_grad_enabled() and (hidden_states.requires_grad or self.norm2.weight.requires_grad)
    if differentiable or not _add_norm_here(hidden_states):
        return stock(hidden_states, *args, **kwargs)
    attn = self.attn(self.norm1(hidden_states), *args, **kwargs)
    return norm_and_mlp_residuals(hidden_states, attn, self.norm2, self.mlp, accumulate=ACCUMULATE_MLP)


def _is_rms_norm_block(module: torch.nn.Module) -> bool:
    """A vision block of the form `h + attn(norm1(h))`, then `h + mlp(norm2(h))`, with RMSNorms
    (Qwen2.5-VL's; Qwen2-VL's blocks use LayerNorm)."""
    return (type(module).__name__.endswith("VisionBlock") and all(hasattr(module, a) for a in ("attn", "mlp"))
            and is_rms_norm(getattr(module, "norm1", None)) and is_rms_norm(getattr(module, "norm2", None)))


def fuse_block_adds(model: torch.nn.Module, enabled: bool = True) -> int:
    """Run each RMSNorm vision block's middle residual add and norm2 as one kernel on CUDA, and its
    last add in the MLP's down projection while ACCUMULATE_MLP (enabled), or the blocks as
    transformers wrote them (not enabled). Returns how many blocks run fused now."""
    return set_forward(_vision_tower(model).modules(), _is_rms_norm_block, _add_norm_block_forward, enabled)


def _patch_matmul_forward(self, x: torch.Tensor) -> torch.Tensor:
    if tuple(x.shape[2:]) != tuple(self.kernel_size):
        return getattr(self, PATCHED)(x)
    flat = F.linear(x.reshape(x.shape[0], -1), self.weight.reshape(self.out_channels, -1), self.bias)
    return flat.reshape(x.shape[0], self.out_channels, 1, 1, 1)


def _is_patch_conv(module: torch.nn.Module) -> bool:
    """A Conv3d whose kernel is its stride: on one kernel-sized input, a matmul."""
    return (isinstance(module, torch.nn.Conv3d) and tuple(module.kernel_size) == tuple(module.stride)
            and tuple(module.padding) == (0, 0, 0) and tuple(module.dilation) == (1, 1, 1) and module.groups == 1)


def patch_embed_as_matmul(model: torch.nn.Module, enabled: bool = True) -> int:
    """Run the vision tower's patch embedding as a matmul (enabled) or as transformers' Conv3d (not
    enabled). Returns how many convolutions run as matmuls now."""
    return set_forward(_vision_tower(model).modules(), _is_patch_conv, _patch_matmul_forward, enabled)


def _resized(layer: torch.nn.Linear, out_features: int | None = None, in_features: int | None = None):
    """A copy of `layer` with its weight (and bias) cut or zero-padded to the given sizes."""
    out_features = out_features or layer.out_features
    in_features = in_features or layer.in_features
    w = layer.weight
    new = torch.nn.Linear(in_features, out_features, bias=layer.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.zero_()
        rows, cols = min(out_features, layer.out_features), min(in_features, layer.in_features)
        new.weight[:rows, :cols] = w[:rows, :cols]
        if layer.bias is not None:
            new.bias.zero_()
            new.bias[:rows] = layer.bias[:rows]
    return new.train(layer.training).requires_grad_(w.requires_grad)


def align_mlp_width(model: torch.nn.Module, multiple: int = 64, enabled: bool = True) -> int:
    """Zero-pad the hidden width of the vision tower's gated MLPs to a multiple of `multiple`
    (enabled), or cut them back to their own width (not enabled). Returns how many are padded."""
    count = 0
    for module in _vision_tower(model).modules():
        width = gated_mlp_width(module, _WIDTH)
        if width is None:
            continue
        padded = -(-width // multiple) * multiple if enabled else width
        if module.gate_proj.out_features != padded:
            module.gate_proj = _resized(module.gate_proj, out_features=padded)
            module.up_proj = _resized(module.up_proj, out_features=padded)
            module.down_proj = _resized(module.down_proj, in_features=padded)
            if enabled:
                setattr(module, _WIDTH, width)
            else:
                delattr(module, _WIDTH)
        count += module.gate_proj.out_features != width
    return count


def _vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    return tower(model, "visual")


def prepare_vision_tower(model: torch.nn.Module, enabled: bool = True) -> dict[str, int]:
    """Batched attention (with the fused rotary embedding on CUDA while FUSED_ROPE), aligned MLP
    widths, fused RMSNorms, the blocks' residual adds fused (on CUDA), the patch embedding as a
    matmul and the fused MLP activation (on CUDA) in the vision tower of a loaded Qwen-VL model
    (enabled), or the tower as transformers runs it (not enabled). Returns how many modules of
    each kind run the prepared way now."""
    return {"batched_attention": batch_vision_attention(model, enabled),
            "padded_mlps": align_mlp_width(model, enabled=enabled),
            "fused_norms": fuse_norms(model, enabled),
            "fused_adds": fuse_block_adds(model, enabled),
            "patch_matmul": patch_embed_as_matmul(model, enabled),
            "fused_mlps": fuse_mlp_activations(_vision_tower(model), enabled)}
