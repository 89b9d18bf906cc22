"""Where the Triton kernels run: CUDA tensors, or CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, read when a kernel module is imported; the tests set it on CPU machines)."""

from __future__ import annotations

import collections
import functools
import inspect
import itertools
import os
import sys

import torch


def interpreting() -> bool:
    """Whether Triton's CPU interpreter runs the kernels."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def capability(index: int | None) -> tuple[int, int]:
    """The compute capability of CUDA device `index` (None: the current one), looked up once."""
    return torch.cuda.get_device_capability(index)


@functools.cache
def current_stream_getter():
    """Triton's getter of the current CUDA stream's raw handle on a device index (what its launch
    passes; no torch.cuda.Stream object made per call)."""
    from triton.runtime import driver

    return driver.active.get_current_stream


@functools.cache
def flash_attention_available(device: torch.device) -> bool:
    """Whether PyTorch's flash-attention kernel (`torch.ops.aten._flash_attention_forward`, the one
    SDPA's flash backend runs) can be called directly on CUDA `device`: NVIDIA's build, sm_80+."""
    return (torch.version.hip is None  # NVIDIA's: ROCm's flash build differs
            and hasattr(torch.ops.aten, "_flash_attention_forward")
            and torch.backends.cuda.is_flash_attention_available() and capability(device.index) >= (8, 0))


def flash_attention_takes(q: torch.Tensor) -> bool:
    """Whether PyTorch's flash-attention kernel runs on queries like `q` (head dim last): CUDA, a
    16-bit float type, head dim a multiple of 8 up to 256, the kernel available on the device."""
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256
            and flash_attention_available(q.device))


def check_device(name: str, device: torch.device) -> None:
    """Raise ValueError unless a Triton kernel can run on tensors on `device`."""
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(f"{name} runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), got {device}")


# Launcher: call a compiled kernel's launcher directly once Triton has picked it for a call's
# specialisation (BENCHMARKS.md, nineteenth session). False: every launch through Triton's.
DIRECT_LAUNCH = True

MAX_SPECIALISATIONS = 64  # per kernel; past it the kernel goes back to Triton's launch
_I32 = (-(2**31), 2**31)


def _arg_key(arg):
    """What Triton's choice of a compiled kernel can depend on in one runtime argument, or finer:
    its type (a tensor's dtype), an int's range and whether it is 1 or a multiple of 16, a
    tensor's 16-byte alignment; a TMA descriptor's dtype, block and shared layout."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or arg is None:
        return arg
    if isinstance(arg, int):
        return int, arg == 1, arg % 16 == 0, _I32[0] <= arg < _I32[1]
    if isinstance(arg, float):
        return float
    key = _descriptor_key(arg)
    _DESCRIPTOR_TYPES.add(type(arg))
    return key


_DESCRIPTOR_TYPES: set = set()  # (the types `_arg_key` has keyed as TMA descriptors)


def _descriptor_key(arg):
    layout = getattr(arg, "layout", None)  # (a host TMA descriptor; a Gluon one has a shared layout)
    try:
        hash(layout)
    except TypeError:
        layout = repr(layout)
    return (type(arg), arg.base.dtype, tuple(arg.block_shape), layout, getattr(arg, "padding", None),
            getattr(arg, "round_f32_to_tf32", None))


def _args_key(args: tuple) -> tuple:
    """`tuple(map(_arg_key, args))` in one loop, ints, tensors, None and descriptors of a type
    `_arg_key` has met keyed at once. The key is built at every launch (a Hopper kernel call has 23
    arguments), and a call of `_arg_key` per argument cost 60-80% of the host time of Triton's
    compiled launcher itself (BENCHMARKS.md, twentieth session)."""
    key = []
    for arg in args:
        kind = type(arg)
        if kind is int:
            key.append((int, arg == 1, arg % 16 == 0, _I32[0] <= arg < _I32[1]))
        elif kind is torch.Tensor:
            key.append((arg.dtype, arg.data_ptr() % 16 == 0))
        elif arg is None:
            key.append(None)
        elif kind in _DESCRIPTOR_TYPES:
            key.append(_descriptor_key(arg))
        else:
            key.append(_arg_key(arg))
    return tuple(key)


def _owner(args: tuple) -> int:
    """The CUDA device index of a launch's first tensor argument (a TMA descriptor's base tensor
    counts), -1 when it is not on CUDA or there is none. Triton launches on the current device
    whatever the tensors' device is: on another device's tensors FlashPrefill failed ("invalid
    resource handle"), and a launch prepared for one device and made again with another's tensors
    was an illegal memory access (two H200s, BENCHMARKS.md, twenty-seventh session)."""
    for arg in args:
        if type(arg) is torch.Tensor:
            return arg.get_device()
        base = getattr(arg, "base", None)
        if isinstance(base, torch.Tensor):
            return base.get_device()
    return -1


class Launcher:
    """`kernel[grid](*args, **constexprs)` with less host time, for kernels launched per layer.

    Triton's launch binds every argument, computes its specialisation key and looks it up before
    calling the compiled kernel's launcher: skipping that saved 11-30 us of host time a launch on
    an H200's host (BENCHMARKS.md, nineteenth session). This goes through Triton's launch the first time it meets a
    call's `_arg_key`s and constexprs, keeps the compiled kernel it returns, and later calls its
    launcher directly. The key holds at least what Triton specialises a compiled kernel on (types,
    ints equal to 1 or multiples of 16, 16-byte aligned tensors), so two calls share a compiled
    kernel here only where Triton would pick the same one. Each compiled kernel's recorded
    specialisation is checked to hold nothing else (only 16-divisibility, of arguments the key
    says are divisible); any other (another Triton version's rules) turns the direct path off for
    this kernel, and its calls then all go through Triton's launch, as under the interpreter.
    Launch hooks (a profiler's) are called as Triton calls them. A launch whose first tensor is on
    another CUDA device than the current one runs with that device made current (`_owner`).

    Runtime arguments are passed positionally, constexprs and options by keyword.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.direct = not interpreting()
        self.names = list(getattr(kernel, "arg_names", ()))
        self.compiled: dict = {}
        self.device = self.stream = None  # (Triton's own getters, bound at the first launch)
        # False once a compiled kernel's launcher is found that `prepare` cannot read: callers then
        # stop asking (a failed read costs more than it would save).
        self.preparable = self.direct

    def __getitem__(self, grid: tuple):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple, args: tuple, kwargs: dict):
        owner = _owner(args)
        if owner >= 0 and owner != torch.cuda.current_device():  # Triton launches on the current device
            with torch.cuda.device(owner):
                return self.launch(grid, args, kwargs)
        if not (self.direct and DIRECT_LAUNCH):
            return self.kernel[grid](*args, **kwargs)
        if self.device is None:
            from triton import knobs
            from triton.runtime import driver

            self.device, self.stream = driver.active.get_current_device, current_stream_getter()
            self.knobs = knobs.runtime
        device = self.device()
        try:
            keys = _args_key(args)
            key = (device, keys, tuple(kwargs.items()))
            entry = self.compiled.get(key)
        except (AttributeError, TypeError):  # (an argument of a kind the key does not cover)
            self.direct = False
            return self.kernel[grid](*args, **kwargs)
        if entry is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if not self._checked(compiled, args, keys):
                self.direct = False
                return compiled
            rest = [name for name in self.names[len(args):] if name in kwargs]
            if len(args) + len(rest) != len(self.names):
                self.direct = False  # (a parameter left at its default: not handled here)
                return compiled
            if len(self.compiled) >= MAX_SPECIALISATIONS:
                self.direct = False  # (keys that never repeat: a caller building new layouts per call)
                return compiled
            self.compiled[key] = (compiled, tuple(kwargs[name] for name in rest))
            return compiled
        compiled, constexprs = entry
        size = tuple(grid) + (1, 1)
        stream = self.stream(device)
        full = (*args, *constexprs)
        enter, leave = self.knobs.launch_enter_hook, self.knobs.launch_exit_hook
        if _hooks_set(enter, leave):
            meta = compiled.launch_metadata(grid, stream, *full)
        else:  # (no launch metadata to build, no empty hook chain to call)
            meta = enter = leave = None
        compiled.run(size[0], size[1], size[2], stream, compiled.function, compiled.packed_metadata, meta,
                     enter, leave, *full)
        return compiled

    def prepare(self, grid: tuple, args: tuple, kwargs: dict, varying: tuple[int, ...] = ()):
        """A callable `again(*values)` that makes the launch `launch(grid, args, kwargs)` again, on
        the stream current at each call, with the runtime arguments at positions `varying` replaced
        by `values`: a tensor (or its address) for a tensor, and for a TMA descriptor the tensor it
        is over (taking the shape, strides and block of the descriptor in `args`). Everything else
        is converted for the compiled kernel's C launcher once (TMA maps encoded, tensors as their
        addresses): a call skips the launch key, Triton's argument handling, and the map encoding
        of all but the varying descriptors. The caller must key the callable on everything it does not replace
        (shapes, strides, values, the alignment of replaced tensors) and pass replacements that
        keep the kernel's specialisation; it holds no reference to any tensor. None: before a
        launch with this specialisation has gone through Triton once, under the interpreter, or
        where the compiled launcher is not the one `_c_launcher` reads. `again` returns False,
        launching nothing, while a launch hook (a profiler's) is set, another device is current or
        direct launches are off (DIRECT_LAUNCH); then launch as usual. None too where the tensors are
        on another device than the current one (the compiled kernel found would be the current
        device's)."""
        if not (self.direct and DIRECT_LAUNCH) or self.device is None:
            return None
        device = self.device()
        if _owner(args) not in (device, -1):
            return None  # (its tensors on another device: `launch` switches to it, each time)
        try:
            entry = self.compiled.get((device, _args_key(args), tuple(kwargs.items())))
        except (AttributeError, TypeError):
            return None
        if entry is None:
            return None
        compiled, constexprs = entry
        reader = _c_launcher(compiled)
        if reader is None:
            self.preparable = False
            return None
        c_launch, metas, make_descriptor_arg = reader
        parts = []  # the C launcher's arguments, per runtime argument
        for i, arg in enumerate((*args, *constexprs)):
            if i in metas:
                parts.append(tuple(make_descriptor_arg(arg, metas[i])))
            elif isinstance(arg, torch.Tensor):
                parts.append((arg.data_ptr(),))
            else:
                parts.append((arg,))
        slots = [(i, metas.get(i), _Rebased.template(args[i]) if i in metas else None) for i in varying]
        run = compiled.run
        size = (*grid, 1, 1)[:3]
        head = (compiled.function, run.launch_cooperative_grid, run.launch_pdl, None, None, compiled.packed_metadata,
                None, None, None)
        current, stream, hooks = self.device, self.stream, self.knobs
        chain = itertools.chain.from_iterable

        def again(*values) -> bool:
            if (not (DIRECT_LAUNCH and self.direct) or _hooks_set(hooks.launch_enter_hook, hooks.launch_exit_hook)
                    or current() != device):
                return False
            now = list(parts)
            for (i, meta, template), value in zip(slots, values):
                if meta is not None:
                    now[i] = make_descriptor_arg(_Rebased(value, template), meta)
                else:
                    now[i] = (value if type(value) is int else value.data_ptr(),)
            c_launch(*size, stream(device), *head, *chain(now))
            return True

        return again

    def _checked(self, compiled, args: tuple, keys: tuple) -> bool:
        attrs = getattr(getattr(compiled, "src", None), "attrs", None)
        if attrs is None or not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            return False
        for path, values in attrs.items():
            if not values:
                continue
            if len(path) != 1 or path[0] >= len(args):
                return False
            arg, key = args[path[0]], keys[path[0]]
            divisible = key[1] if isinstance(arg, torch.Tensor) else isinstance(key, tuple) and key[0] is int and key[2]
            if not divisible or any(list(v) != ["tt.divisibility", 16] for v in values):
                return False
        return True


# Launches made again with other tensors of the same shapes (`Launcher.prepare`): per launch site
# the last PREPARED_LAUNCHES of them, by their caller's key (BENCHMARKS.md, twenty-first session:
# a Hopper attention call's host time 64-110 -> 39-71 us by host, the attention launches of short
# requests 97% found; with every site prepared a decoding step 3-8% and a 2K prompt's prefill 4-10%
# shorter). 0: every launch built in full.
PREPARED_LAUNCHES = 32


class PreparedLaunches:
    """One launch site's prepared launches (`Launcher.prepare`), made again with the tensors at
    positions `varying` given per call, by a key the caller builds from everything else: shapes,
    strides, values, and the 16-byte alignment of the tensors it passes per call (its part of
    Triton's specialisation)."""

    def __init__(self, launcher: Launcher, varying: tuple[int, ...]):
        self.launcher, self.varying = launcher, varying
        self.launches: collections.OrderedDict = collections.OrderedDict()

    def active(self) -> bool:
        """Whether to build a key for this call: on, the launcher's kind readable, and no CUDA graph
        being captured (a captured launch takes what the capture allocates)."""
        return bool(PREPARED_LAUNCHES) and self.launcher.preparable and not torch.cuda.is_current_stream_capturing()

    def launch(self, key, values: tuple, build) -> None:
        """The launch prepared for `key` with `values` at the varying positions; where none is (or
        `key` is None), `build()` -> (grid, args, kwargs) launched in full, and prepared for `key`."""
        if key is not None:
            again = self.launches.get(key)
            if again is not None and again(*values):
                return
        grid, args, kwargs = build()
        again = None if key is None else self.launcher.prepare(grid, args, kwargs, self.varying)
        if again is not None and again(*values):
            while len(self.launches) >= PREPARED_LAUNCHES:
                try:
                    self.launches.popitem(last=False)  # (the oldest)
                except KeyError:  # (emptied by another thread meanwhile)
                    break
            self.launches[key] = again
        else:
            self.launcher.launch(grid, args, kwargs)


class _Rebased:
    """A TMA descriptor's fields with another base tensor, for Triton's descriptor-argument maker."""
    __slots__ = ("base", "shape", "strides", "padding")

    def __init__(self, base, template: tuple):
        self.base = base
        self.shape, self.strides, self.padding = template

    @staticmethod
    def template(descriptor) -> tuple:
        """What a rebased copy of `descriptor` keeps of it (no reference to its tensor)."""
        return list(descriptor.shape), list(descriptor.strides), getattr(descriptor, "padding", "zero")


# The base arguments of Triton 3.6's C launch function, before the kernel's own: grid (3 ints),
# stream and function (2 handles), cooperative grid and PDL (2 flags), global and profile scratch,
# kernel metadata, launch metadata, enter and exit hooks (6 objects).
_BASE_ARGS_FORMAT = "iiiKKppOOOOOO"


def _hooks_set(enter, leave) -> bool:
    """Whether a launch hook is set: Triton's hook knobs are None or a hook, or (Triton 3.6) a chain
    of hooks, empty unless a profiler added one."""
    return any(hook is not None and bool(getattr(hook, "calls", True)) for hook in (enter, leave))


@functools.lru_cache(maxsize=MAX_SPECIALISATIONS)
def _c_launcher(compiled):
    """(C launch function, {argument position: TMA metadata}, Triton's descriptor-argument maker)
    of a compiled kernel whose launcher is Triton 3.6's `CudaLauncher` without scratch memory: its
    C function parses the 13 base arguments `prepare` passes (its module's `_BASE_ARGS_FORMAT`),
    and its `launch` is that function itself, or Triton's wrapper (`wrap_handle_tensordesc`)
    around it that turns each tensor descriptor at those positions into its encoded map, shape and
    strides before calling it. None for any other launcher (other Triton versions differ)."""
    run = getattr(compiled, "run", None)
    if type(run).__name__ != "CudaLauncher" or getattr(run, "global_scratch_size", 1) or getattr(
            run, "profile_scratch_size", 1):
        return None
    module = sys.modules.get(type(run).__module__)
    if getattr(module, "_BASE_ARGS_FORMAT", None) != _BASE_ARGS_FORMAT:
        return None
    launch = run.launch
    if inspect.isbuiltin(launch):  # (no descriptor arguments: no wrapper)
        return launch, {}, None
    try:
        names = inspect.getclosurevars(launch)
    except TypeError:
        return None
    c_launch, positions, metas = (names.nonlocals.get(n) for n in ("launcher", "tensordesc_indices", "tensordesc_meta"))
    make = names.globals.get("make_tensordesc_arg")
    if (not callable(c_launch) or not isinstance(positions, set) or not isinstance(metas, list)
            or len(metas) != len(positions) or any(m is None for m in metas) or not callable(make)
            or names.globals.get("_BASE_ARGS_FORMAT_LEN") != 13
            or len(inspect.signature(make).parameters) != 2):
        return None
    return c_launch, dict(zip(sorted(positions), metas)), make
