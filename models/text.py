"""The language model of a loaded Qwen-VL model without transformers' slow elementwise paths.

Beside attention and the linear layers, a Qwen-VL language-model layer runs two RMSNorms, the
rotary embedding of q and k and a gated MLP activation as chains of elementwise kernels: at 128K
tokens in the 7B model these took about 0.8 s of GPU time in a 3.5 s prefill at 5% density on an
H200; fused, the prefill takes 0.48 s less (BENCHMARKS.md). `prepare_language_model` runs them
fused:

- the RMSNorms and the MLP activation by models.fused (per module instance);
- on CUDA, over at least FUSED_ADDS_MIN_TOKENS tokens, each decoder layer's add after the
  attention with the RMSNorm after it as one kernel, and its add after the MLP inside the MLP's
  down projection (`fuse_layer_adds`, models.fused.norm_and_mlp_residuals);
- one token's linear projections (every `nn.Linear` of the language model, and the head) as
  kernels.gemv launches inside `models.fused.one_token_gemvs`, which models.decode enters while it
  captures a decoding step; each attention's q, k and v projections of one input in one launch
  (`fuse_one_token_projections`); with the fused adds too (a captured step), each layer's norms
  and residual adds inside those launches (`_one_token_layer`, `NORMS_IN_GEMVS`);
- the rotary embedding by kernels.rope, on CUDA. The attention modules call their modeling
  file's `apply_rotary_pos_emb(q, k, cos, sin)` (the same function in all three families), so
  `fuse_text_rope` replaces that module-level function by one that runs the fused kernel when
  its inputs fit it (q, k as (B, H, T, D), cos / sin as (B, T, D), on CUDA) and the original
  otherwise. It is the same map within one rounding (the original rounds after each of its
  steps), and being module-level it holds for every model of that family in the process.

Attention is untouched (it is models.attention's, FlashPrefill or SDPA). `models.load` and the
7B bench call `prepare_language_model`; enabled=False gives the language model as transformers
runs it.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys

import torch

from kernels import gemv as one_token
from kernels.rope import launch as launch_rope
from kernels.rope import supported as rope_supported

from .fused import (
    PATCHED,
    PENDING,
    RESIDUAL,
    fuse_mlp_activations,
    fuse_rms_norms,
    is_rms_norm,
    norm_and_mlp_residuals,
    one_token_norm_and_mlp_residual,
    one_token_pending,
    set_forward,
    tower,
)

_STOCK_ROPE = "_videoprefill_stock_apply_rotary_pos_emb"


def _fused_rope_shapes(q, k, cos, sin, unsqueeze_dim) -> bool:
    """q, k as (B, H, T, D) and cos / sin as (B, T, D) on CUDA, broadcast over the heads."""
    if unsqueeze_dim != 1 or not q.is_cuda or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return False
    b, _, t, d = q.shape
    return k.shape[0] == b and k.shape[2:] == (t, d) and cos.shape == (b, t, d) and sin.shape == (b, t, d)


def _make_fused_rope(stock):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        """kernels.rope where the inputs fit it, else the modeling file's own function. It runs in
        every decoding step of every layer, so kernels.rope's rules are checked once, on the
        tensors it is given (kernels.rope.launch)."""
        if not _fused_rope_shapes(q, k, cos, sin, unsqueeze_dim):
            return stock(q, k, cos, sin, unsqueeze_dim)
        b, hq, t, d = q.shape
        hk = k.shape[1]
        # (B, H, T, D) views of (B, T, H, D) projections: tokens first, views again.
        rows = (q.transpose(1, 2).reshape(b * t, hq, d), k.transpose(1, 2).reshape(b * t, hk, d),
                cos.reshape(b * t, d), sin.reshape(b * t, d))
        if not rope_supported(*rows):  # dtypes, head dim, unit last stride
            return stock(q, k, cos, sin, unsqueeze_dim)
        q_out, k_out = launch_rope(*rows)
        return q_out.view(b, t, hq, d).transpose(1, 2), k_out.view(b, t, hk, d).transpose(1, 2)

    apply_rotary_pos_emb._videoprefill_fused = True
    return apply_rotary_pos_emb


def _attention_modules(root: torch.nn.Module):
    return [m for m in root.modules()
            if type(m).__name__.endswith("Attention") and hasattr(sys.modules.get(type(m).__module__),
                                                                  "apply_rotary_pos_emb")]


def fuse_text_rope(model: torch.nn.Module, enabled: bool = True) -> int:
    """Run the rotary embedding of the language model's attention through kernels.rope on CUDA
    (enabled) or as the modeling file writes it (not enabled), for every model of the family.
    Returns how many of this model's attention modules run it fused now."""
    modules = _attention_modules(_language_model(model))
    count = 0
    for modeling in {sys.modules[type(m).__module__] for m in modules}:
        current = modeling.apply_rotary_pos_emb
        fused = getattr(current, "_videoprefill_fused", False)
        if enabled and not fused:
            setattr(modeling, _STOCK_ROPE, current)
            modeling.apply_rotary_pos_emb = _make_fused_rope(current)
        elif not enabled and fused:
            modeling.apply_rotary_pos_emb = getattr(modeling, _STOCK_ROPE)
            delattr(modeling, _STOCK_ROPE)
    for m in modules:
        count += getattr(sys.modules[type(m).__module__].apply_rotary_pos_emb, "_videoprefill_fused", False)
    return count


# On CUDA, decoder layers over at least this many tokens run their residual adds fused
# (models.fused.norm_and_mlp_residuals): the add after the attention and the post-attention RMSNorm
# as one kernel, the add after the MLP inside its down projection; at 128K tokens on an H200 no
# tensor of the hidden states is allocated for the last add, and the layer's second half took
# 0.38-0.87 ms less in three of four measurements (level in one; run-to-run spread of about 1% of
# its 82 ms). Shorter inputs (a question over a kept prefix, a decoding step) keep the stock layer:
# there the calls are host-bound and the Triton launch costs more than the adds it saves. Measured
# on an H200, eager with the host's time (BENCHMARKS.md, fourteenth session): the fused second half
# took 1.40x the stock one's time at 16 and 64 tokens, 0.97-0.99x from 256 tokens up.
FUSED_ADDS_MIN_TOKENS = 256
_EVERY_LENGTH: contextvars.ContextVar[bool] = contextvars.ContextVar("fused_adds_at_every_length", default=False)


@contextlib.contextmanager
def fused_adds_at_every_length():
    """Within the block, decoder layers run their fused residual adds whatever the length (the
    warm-up: its short request then compiles and loads what a long one runs)."""
    token = _EVERY_LENGTH.set(True)
    try:
        yield
    finally:
        _EVERY_LENGTH.reset(token)


def _add_norm_here(x: torch.Tensor) -> bool:
    """Whether the fused residual adds run for x's device: CUDA (the tests also run them on the
    CPU, under Triton's interpreter)."""
    return x.is_cuda


def _add_norm_layer_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The decoder layer `h = h + self_attn(input_layernorm(h)); h + mlp(post_attention_layernorm(h))`
    with its second half as models.fused.norm_and_mlp_residuals. The layer's keyword arguments go
    to the attention unchanged, as the stock layer passes them."""
    stock = getattr(self, PATCHED)
    differentiable = torch.is_grad_enabled() and (
        hidden_states.requires_grad or self.post_attention_layernorm.weight.requires_grad)
    short = hidden_states.numel() < FUSED_ADDS_MIN_TOKENS * hidden_states.shape[-1] and not _EVERY_LENGTH.get()
    if args or differentiable or short or not _add_norm_here(hidden_states):
        return stock(hidden_states, *args, **kwargs)
    if NORMS_IN_GEMVS and one_token_pending() is not None and hidden_states.numel() == hidden_states.shape[-1]:
        out = _one_token_layer(self, hidden_states, kwargs)
        if out is not None:
            return out
    out = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    attn = out[0] if isinstance(out, tuple) else out
    return norm_and_mlp_residuals(hidden_states, attn, self.post_attention_layernorm, self.mlp)


def _is_pre_norm_layer(module: torch.nn.Module) -> bool:
    """A decoder layer of the form `h + self_attn(input_layernorm(h))`, then
    `h + mlp(post_attention_layernorm(h))`, with RMSNorms (all three families')."""
    return (type(module).__name__.endswith("DecoderLayer")
            and all(hasattr(module, a) for a in ("self_attn", "mlp"))
            and is_rms_norm(getattr(module, "input_layernorm", None))
            and is_rms_norm(getattr(module, "post_attention_layernorm", None)))


def fuse_layer_adds(model: torch.nn.Module, enabled: bool = True) -> int:
    """Run the language model's decoder layers with fused residual adds on CUDA (enabled) or as
    transformers wrote them (not enabled). Returns how many layers run fused now."""
    return set_forward(_language_model(model).modules(), _is_pre_norm_layer, _add_norm_layer_forward, enabled)


GROUP = "_videoprefill_projection_group"  # the q, k, v projections one launch computes together


def _one_token_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A linear layer: inside `models.fused.one_token_gemvs`, one token as a kernels.gemv launch
    (with the other projections of its group, whose results wait for their own calls on the same
    input; plus the residual `_one_token_layer` gave it); the stock forward otherwise."""
    held = one_token_pending()
    if held is not None:
        pending = self.__dict__.pop(PENDING, None)
        if pending is not None:
            key, y, normed = pending
            if key is x:
                return y
            if normed:  # computed from the layer's normalised input, which this x is not
                raise RuntimeError(f"{type(self).__name__} was given another input than the one its result was "
                                   "computed for: the attention does not project its hidden states as q, k, v")
        residual = self.__dict__.pop(RESIDUAL, None)
        group = self.__dict__.get(GROUP, (self,))
        parts = [(m.weight, m.bias) for m in group]
        if one_token.supported(x, parts) and (residual is None or (
                len(parts) == 1 and residual.numel() == self.out_features and residual.is_contiguous()
                and residual.dtype == x.dtype and residual.device == x.device)):
            results = one_token.gemv(x, parts, residual=None if residual is None else [residual])
            for module, y in zip(group, results, strict=True):
                if module is not self:
                    module.__dict__[PENDING] = (x, y, False)
                    held.append(module)
            return results[next(i for i, m in enumerate(group) if m is self)]
        if residual is not None:
            return residual + getattr(self, PATCHED)(x)
    return getattr(self, PATCHED)(x)


# Inside one_token_gemvs with the fused adds (captured decoding steps), a decoder layer's two RMSNorms
# and two residual adds run inside its projections' GEMV launches (`_one_token_layer`): on an H200 a
# 7B step's GPU time 0.21 ms shorter (BENCHMARKS.md, thirty-second session). False: the fused adds'
# kernels (F.rms_norm, add_rms_norm) run them. (The final norm stays a launch of its own: inside the
# head's GEMV, whose 19K programs would each sum the squares again, it measured 1 us slower.)
NORMS_IN_GEMVS = True


def _runs_one_token_linear(module) -> bool:
    return type(module) is torch.nn.Linear and getattr(
        module.__dict__.get("forward"), "__func__", None) is _one_token_linear_forward


def _one_token_layer(layer: torch.nn.Module, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """One token through a pre-norm decoder layer inside `one_token_gemvs`, with no launch for its
    norms and adds: the input RMSNorm inside the q, k, v launch, the residual added inside the output
    projection's, the post-attention RMSNorm inside the gate, up launch and the last add inside the
    down projection's (models.fused.one_token_norm_and_mlp_residual). None where the layer does not
    have that form (the caller runs it otherwise).

    The attention runs as its modeling file writes it, given a view of the hidden states that its q,
    k and v projections recognise: they return the results computed here from the normalised input.
    All three families' attention reads its input only through those projections and its shape;
    an attention that gave them another input would raise (`_one_token_linear_forward`)."""
    attention = layer.self_attn
    group = getattr(getattr(attention, "q_proj", None), "__dict__", {}).get(GROUP)
    o_proj = getattr(attention, "o_proj", None)
    norm = layer.input_layernorm
    if group is None or not all(_runs_one_token_linear(m) for m in (*group, o_proj)):
        return None
    parts = [(m.weight, m.bias) for m in group]
    held = one_token_pending()
    weights = (norm.weight, norm.variance_epsilon)
    if held is None or not one_token.supported(hidden_states, parts, weights):
        return None
    given = hidden_states.view(hidden_states.shape)
    for module, y in zip(group, one_token.gemv(hidden_states, parts, norm=weights), strict=True):
        module.__dict__[PENDING] = (given, y, True)
        held.append(module)
    o_proj.__dict__[RESIDUAL] = hidden_states
    held.append(o_proj)
    out = attention(hidden_states=given, **kwargs)
    total = out[0] if isinstance(out, tuple) else out
    left = [m for m in (*group, o_proj) if PENDING in m.__dict__ or RESIDUAL in m.__dict__]
    if left:
        raise RuntimeError(f"{type(attention).__name__} did not run its q, k, v projections on its input and its "
                           f"output through o_proj: {len(left)} results left")
    return one_token_norm_and_mlp_residual(total, layer.post_attention_layernorm, layer.mlp)


def _projection_groups(root: torch.nn.Module) -> list[tuple[torch.nn.Linear, ...]]:
    """The (q_proj, k_proj, v_proj) of each attention under root that one gemv launch takes together:
    plain linear layers of one input width, dtype and device, all with a bias or none."""
    groups = []
    for module in root.modules():
        group = tuple(getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj"))
        if not all(type(m) is torch.nn.Linear for m in group):
            continue
        q = group[0].weight
        if one_token.weights_supported([(m.weight, m.bias) for m in group], q.shape[1], q.dtype, q.device):
            groups.append(group)
    return groups


def fuse_one_token_projections(model: torch.nn.Module, enabled: bool = True) -> int:
    """Run the language model's linear layers and the head as kernels.gemv launches for one token
    inside `models.fused.one_token_gemvs` (enabled), or always as transformers does (not enabled).
    Returns how many run so now."""
    root = _language_model(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [m for m in root.modules() if type(m) is torch.nn.Linear]
    if type(head) is torch.nn.Linear and all(head is not m for m in linears):
        linears.append(head)
    for module in linears:
        module.__dict__.pop(GROUP, None)
    count = set_forward(linears, lambda m: True, _one_token_linear_forward, enabled)
    if enabled:
        for group in _projection_groups(root):
            for module in group:
                module.__dict__[GROUP] = group
    return count


def _language_model(model: torch.nn.Module) -> torch.nn.Module:
    return tower(model, "language_model")


def prepare_language_model(model: torch.nn.Module, enabled: bool = True) -> dict[str, int]:
    """Fused RMSNorms and, on CUDA, the fused gated-MLP activation, rotary embedding and residual
    adds, and one token's projections as GEMVs in captured decoding steps, in the language model of
    a loaded Qwen-VL model (enabled), or as transformers runs it (not enabled). Returns how many
    modules of each kind run fused now."""
    root = _language_model(model)
    return {"fused_norms": fuse_rms_norms(root, enabled), "fused_mlps": fuse_mlp_activations(root, enabled),
            "fused_rope": fuse_text_rope(model, enabled), "fused_adds": fuse_layer_adds(model, enabled),
            "one_token_gemvs": fuse_one_token_projections(model, enabled)}
