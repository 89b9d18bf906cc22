"""Module rewrites shared by both towers: RMSNorm as one kernel, the gated MLP's activation fused.

transformers writes Qwen-VL's RMSNorm as a chain of fp32 operations (cast, power, mean, rsqrt,
product, cast back, weight product) and the gated MLP's middle as `silu(gate) * up`, two kernels
that each write a tensor of the MLP's width. Over long inputs these elementwise passes add up
(BENCHMARKS.md). Here:

- `fuse_rms_norms` runs every RMSNorm under a module through `torch.nn.functional.rms_norm`;
- `fuse_mlp_activations` runs every SiLU-gated MLP as `down(silu_mul(gate(x), up(x)))` with
  `kernels.activation.silu_mul` writing over gate in place, on CUDA (the stock forward
  elsewhere), and without autograd over as many tokens at a time as fit `MLP_CHUNK_BYTES`, so
  that a long prefill never holds the MLP's hidden width for every token;
- `add_into` runs such an MLP with its product added into a residual in place (without the
  down projection's bias, which the caller has added); `norm_and_mlp_residuals`, the second half
  of a pre-norm block, uses it after the residual add and the RMSNorm in one kernel
  (`kernels.rms_norm`), so that neither residual add costs a pass of its own.

All compute the same functions within bf16 rounding. The first two replace `forward` per module
instance (transformers has no interface point for either without the `kernels` hub package,
which downloads) and are undone by calling them with enabled=False.
"""

from __future__ import annotations

import contextlib
import contextvars
import types

import torch
import torch.nn.functional as F

from kernels import gemv as one_token
from kernels.activation import silu_mul
from kernels.rms_norm import add_rms_norm
from kernels.rms_norm import supported as add_norm_supported

PATCHED = "_videoprefill_stock_forward"
PENDING = "_videoprefill_pending"  # a linear layer's result computed by another's launch (models.text)
RESIDUAL = "_videoprefill_residual"  # a residual a linear layer's launch adds to its product (models.text)

# Within `one_token_gemvs()`: the modules' list of linear layers holding a result computed for them
# by another's launch or a residual to add (models.text), emptied when the block ends. Outside: None.
_ONE_TOKEN: contextvars.ContextVar[list | None] = contextvars.ContextVar("one_token_gemvs", default=None)


@contextlib.contextmanager
def one_token_gemvs(enabled: bool = True):
    """Within the block (when enabled), one token's projections run as kernels.gemv launches: the
    gated MLPs' (`_gated_rows`) and the linear layers models.text prepares. models.decode enters it
    while it captures a decoding step into a CUDA graph, where the launches' host time is paid once
    and the GEMVs read the weights faster than cuBLAS (BENCHMARKS.md, thirtieth session)."""
    if not enabled:
        yield
        return
    held: list = []
    token = _ONE_TOKEN.set(held)
    try:
        yield
    finally:
        _ONE_TOKEN.reset(token)
        for module in held:
            module.__dict__.pop(PENDING, None)
            module.__dict__.pop(RESIDUAL, None)


def one_token_pending() -> list | None:
    """Inside `one_token_gemvs`, its list of modules holding a pending result; None outside."""
    return _ONE_TOKEN.get()


def tower(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """`model.model.<name>` of a loaded Qwen-VL model: "visual" or "language_model"."""
    found = getattr(getattr(model, "model", model), name, None)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no {name} (model.model.{name})")
    return found


def set_forward(modules, recognised, forward, enabled: bool) -> int:
    """Give each recognised module `forward` (its own kept as PATCHED), or take it back.
    Returns how many of `modules` run `forward` now."""
    count = 0
    for module in modules:
        patched = getattr(module.__dict__.get("forward"), "__func__", None) is forward
        if enabled and not patched and PATCHED not in module.__dict__ and recognised(module):
            setattr(module, PATCHED, module.forward)
            module.forward = types.MethodType(forward, module)
            patched = True
        elif not enabled and patched:
            del module.forward
            delattr(module, PATCHED)
            patched = False
        count += patched
    return count


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype:  # transformers' result takes the wider dtype
        return getattr(self, PATCHED)(hidden_states)
    return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)


def is_rms_norm(module: torch.nn.Module) -> bool:
    """transformers' RMSNorm: weight * (x * rsqrt(mean(x^2) + eps)) over the last dim."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.nn.Parameter)
            and weight.dim() == 1 and isinstance(getattr(module, "variance_epsilon", None), float))


def fuse_rms_norms(root: torch.nn.Module, enabled: bool = True) -> int:
    """Run the RMSNorms under `root` as F.rms_norm (enabled) or as transformers wrote them (not
    enabled). Returns how many run fused now."""
    return set_forward(root.modules(), is_rms_norm, _rms_norm_forward, enabled)


def gated_mlp_width(module: torch.nn.Module, stock_width_attr: str | None = None) -> int | None:
    """The hidden width of a `down(act(gate(x)) * up(x))` MLP, None for anything else."""
    layers = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not type(module).__name__.endswith("MLP") or not all(isinstance(x, torch.nn.Linear) for x in layers):
        return None
    gate, up, down = layers
    width = getattr(module, stock_width_attr, gate.out_features) if stock_width_attr else gate.out_features
    return width if gate.out_features == up.out_features == down.in_features else None


def _is_silu(act) -> bool:
    return act is F.silu or type(act).__name__ in ("SiLU", "SiLUActivation")


def is_silu_gated_mlp(module: torch.nn.Module) -> bool:
    return gated_mlp_width(module) is not None and _is_silu(getattr(module, "act_fn", None))


# Bytes of the two hidden-width tensors a gated MLP holds at a time over a long input: it takes
# MLP_CHUNK_BYTES // (2 x width x element size) tokens at a time. In the 7B language model (width
# 18,944) that is 17,712 tokens and 1.25 GiB, against 9.9 GB for 131K tokens at once, the largest
# buffer of a long prefill; in its vision tower (width 3,456 padded) 97,090 of the 4 x 131K patch
# tokens (BENCHMARKS.md). The products stay large enough to run at full speed. 0: the whole input
# at once.
MLP_CHUNK_BYTES = 5 * 2**28


def chunk_tokens(width: int, dtype: torch.dtype) -> int:
    """Tokens per chunk of a gated MLP of hidden `width` (0: all at once)."""
    if not MLP_CHUNK_BYTES:
        return 0
    return max(1, MLP_CHUNK_BYTES // (2 * width * dtype.itemsize))


def _gated_rows(self, x: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) (the activation fused on CUDA), written into `out` when given;
    with `accumulate` (CUDA, checked by `adds_into`), added to out without down's bias. One token
    inside `one_token_gemvs`: two GEMV launches (gate, up and the activation; down)."""
    if _ONE_TOKEN.get() is not None:
        y = _gated_gemv(self, x, out, accumulate)
        if y is not None:
            return y
    if not (x.is_cuda or accumulate):
        y = getattr(self, PATCHED)(x)
        return y if out is None else out.copy_(y)
    gate = self.gate_proj(x)
    hidden = silu_mul(gate, self.up_proj(x), out=gate)
    down = self.down_proj
    if accumulate:
        return out.addmm_(hidden, down.weight.t())
    if out is None:
        return down(hidden)
    if type(down) is torch.nn.Linear and hidden.dtype == down.weight.dtype == out.dtype:
        # the product straight into out: what F.linear runs, without a copy
        if down.bias is None:
            return torch.mm(hidden, down.weight.t(), out=out)
        return torch.addmm(down.bias, hidden, down.weight.t(), out=out)
    out.copy_(down(hidden))
    return out


def _gated_gemv(self, x: torch.Tensor, out: torch.Tensor | None, accumulate: bool, norm=None,
                down_bias: bool | None = None) -> torch.Tensor | None:
    """`_gated_rows` for one token as two kernels.gemv launches (None where they do not take the
    tensors): silu(gate(x)) * up(x), then down's product written into out (made when None), or with
    `accumulate` added to it, without down's bias unless `down_bias`. With `norm` (weight, eps), of
    x's RMS norm, computed in the first launch."""
    gate, up, down = self.gate_proj, self.up_proj, self.down_proj
    parts = ((gate.weight, gate.bias), (up.weight, up.bias))
    down_parts = ((down.weight, down.bias if (not accumulate if down_bias is None else down_bias) else None),)
    if type(down) is not torch.nn.Linear or not (
            one_token.supported(x, parts, norm)
            and one_token.weights_supported(down_parts, gate.out_features, x.dtype, x.device)):
        return None
    if out is not None and not (out.is_contiguous() and out.dtype == x.dtype and out.device == x.device
                                and out.numel() == down.out_features):
        return None
    hidden = one_token.gated_gemv(x, *parts, norm=norm)
    return one_token.gemv(hidden, down_parts, add=accumulate, out=None if out is None else [out])[0]


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    differentiable = torch.is_grad_enabled() and (x.requires_grad or self.gate_proj.weight.requires_grad)
    if differentiable:
        return getattr(self, PATCHED)(x)
    rows = x.reshape(-1, x.shape[-1])
    chunk = chunk_tokens(self.gate_proj.out_features, x.dtype)
    if not chunk or rows.shape[0] <= chunk:
        return _gated_rows(self, x)
    # each token's output depends on that token alone
    out = torch.empty(rows.shape[0], self.down_proj.out_features, dtype=x.dtype, device=x.device)
    _chunked(self, rows, out, chunk)
    return out.view(*x.shape[:-1], out.shape[-1])


def _chunked(module: torch.nn.Module, rows: torch.Tensor, out: torch.Tensor, chunk: int,
             accumulate: bool = False) -> None:
    """`_gated_rows` over `chunk` rows of (tokens, width) `rows` at a time, into the same rows of out."""
    for a in range(0, rows.shape[0], chunk):
        _gated_rows(module, rows[a : a + chunk], out[a : a + chunk], accumulate)


def _accumulates_here(x: torch.Tensor) -> bool:
    """Whether `add_into` runs for x's device: CUDA (the tests also run it on the CPU, under
    Triton's interpreter)."""
    return x.is_cuda


def adds_into(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `add_into(module, x, out)` runs: a gated MLP running the fused forward, with a plain
    Linear down projection, on CUDA tensors of its weights' dtype, without autograd."""
    if getattr(module.__dict__.get("forward"), "__func__", None) is not _fused_mlp_forward:
        return False
    down = module.down_proj
    return (type(down) is torch.nn.Linear and _accumulates_here(x) and out.is_contiguous()
            and x.dtype == out.dtype == module.gate_proj.weight.dtype == down.weight.dtype
            and x.shape[:-1] == out.shape[:-1] and out.shape[-1] == down.out_features
            and not (torch.is_grad_enabled() and (x.requires_grad or down.weight.requires_grad)))


def add_into(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out += down(silu_mul(gate(x), up(x))) without down's bias, which the caller has already added
    to out, over the fused forward's chunks of tokens: cuBLAS adds the product to out as it writes
    it, so a residual add `out + mlp(x)` costs no pass of its own. Needs `adds_into`."""
    rows = x.reshape(-1, x.shape[-1])
    chunk = chunk_tokens(module.gate_proj.out_features, x.dtype) or max(1, rows.shape[0])
    _chunked(module, rows, out.view(-1, out.shape[-1]), chunk, accumulate=True)
    return out


def norm_and_mlp_residuals(hidden_states: torch.Tensor, attn: torch.Tensor, norm: torch.nn.Module,
                           mlp: torch.nn.Module, accumulate: bool = True) -> torch.Tensor:
    """The second half of a pre-norm block, `h = hidden_states + attn; h + mlp(norm(h))`, with the add
    and the RMSNorm as one kernel (kernels.rms_norm) writing the sum over attn, and with
    `accumulate`, where `adds_into` allows, the last add done by the MLP's down projection adding
    into that sum (which then carries the projection's bias). Where the kernel does not take the
    tensors (not contiguous, a norm weight of another dtype), the stock computation."""
    d = attn.shape[-1]
    flat = hidden_states.is_contiguous() and attn.is_contiguous() and hidden_states.shape == attn.shape
    x, y = (hidden_states.view(-1, d), attn.view(-1, d)) if flat else (None, None)
    if not (flat and add_norm_supported(x, y, norm.weight, out=y)):
        hidden_states = hidden_states + attn
        return hidden_states + mlp(norm(hidden_states))
    eps = norm.variance_epsilon
    if accumulate and adds_into(mlp, y, y):  # the MLP's input will have y's shape and dtype
        down = mlp.down_proj
        total, normed = add_rms_norm(x, y, norm.weight, eps, out=y, bias=down.bias)
        return add_into(mlp, normed, total).view(attn.shape)
    total, normed = add_rms_norm(x, y, norm.weight, eps, out=y)
    return (total + mlp(normed)).view(attn.shape)


def one_token_norm_and_mlp_residual(total: torch.Tensor, norm: torch.nn.Module, mlp: torch.nn.Module) -> torch.Tensor:
    """`total + mlp(norm(total))` for one token inside `one_token_gemvs`: the RMSNorm inside the gate,
    up and activation launch, the add (with down's bias) inside the down projection's, written over
    total, which the caller owns. The stock computation where the launches do not take the tensors."""
    if _ONE_TOKEN.get() is not None and is_rms_norm(norm) and adds_into(mlp, total, total):
        y = _gated_gemv(mlp, total, total, accumulate=True, norm=(norm.weight, norm.variance_epsilon),
                        down_bias=True)
        if y is not None:
            return y.view(total.shape)
    return total + mlp(norm(total))


def fuse_mlp_activations(root: torch.nn.Module, enabled: bool = True) -> int:
    """Run the SiLU-gated MLPs under `root` with the fused activation (enabled) or as transformers
    wrote them (not enabled). Returns how many run fused now."""
    return set_forward(root.modules(), is_silu_gated_mlp, _fused_mlp_forward, enabled)
