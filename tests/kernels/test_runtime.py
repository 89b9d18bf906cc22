"""kernels.runtime.Launcher's choice between Triton's launch and a compiled kernel's own launcher.

A stand-in kernel plays Triton here: it specialises as Triton does (16-byte aligned tensors, ints
that are multiples of 16), compiles one stand-in kernel per specialisation and records every
launch. The GPU tests run the real kernels through the launcher (test_flash_prefill_cuda.py)."""

from __future__ import annotations

import sys
import weakref
from types import SimpleNamespace

import pytest
import torch

from kernels import runtime
from kernels.runtime import MAX_SPECIALISATIONS, Launcher, _arg_key


class Compiled:
    def __init__(self, attrs: dict, kernel: Kernel):
        self.src = SimpleNamespace(attrs=attrs)
        self.function, self.packed_metadata = object(), object()
        self.kernel = kernel

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *launch):
        self.kernel.direct_launches.append((self, launch))


class Kernel:
    arg_names = ["X", "N", "scale", "BLOCK", "num_warps"]

    def __init__(self, extra_attr=None):
        self.extra_attr = extra_attr
        self.compiled: dict = {}
        self.triton_launches: list = []
        self.direct_launches: list = []

    def __getitem__(self, grid):
        def launch(x, n, scale, BLOCK, num_warps):
            spec = (x.dtype, x.data_ptr() % 16 == 0, n % 16 == 0, BLOCK, num_warps)
            if spec not in self.compiled:
                attrs = {(0,): [["tt.divisibility", 16]] if spec[1] else [],
                         (1,): [["tt.divisibility", 16]] if spec[2] else [], (2,): [], (3,): [], (4,): []}
                if self.extra_attr:
                    attrs[(1,)] = attrs[(1,)] + [self.extra_attr]
                self.compiled[spec] = Compiled(attrs, self)
            self.triton_launches.append((grid, x, n, scale))
            return self.compiled[spec]

        return launch


def launcher_for(kernel: Kernel) -> Launcher:
    launcher = Launcher(kernel)
    launcher.direct = launcher.preparable = True  # (off under the interpreter, which the CPU tests run)
    launcher.device, launcher.stream = (lambda: 0), (lambda device: 1234)
    launcher.knobs = SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    return launcher


def test_a_seen_specialisation_launches_directly_with_every_argument_in_order():
    kernel = Kernel()
    launch = launcher_for(kernel)
    x = torch.zeros(64)
    first = launch[(3,)](x, 32, 0.5, BLOCK=128, num_warps=4)
    assert len(kernel.triton_launches) == 1 and not kernel.direct_launches
    y = torch.ones(64)
    again = launch[(5, 2)](y, 48, 0.25, BLOCK=128, num_warps=4)
    assert again is first and len(kernel.triton_launches) == 1
    compiled, args = kernel.direct_launches[0]
    assert compiled is first
    assert args[:4] == (5, 2, 1, 1234)
    assert args[4] is first.function and args[5] is first.packed_metadata
    assert args[9] is y and args[10:] == (48, 0.25, 128, 4)


def test_each_specialisation_gets_its_own_compiled_kernel():
    kernel = Kernel()
    launch = launcher_for(kernel)
    x = torch.zeros(64, dtype=torch.int32)
    divisible = launch[(1,)](x, 32, 1.0, BLOCK=64, num_warps=4)
    odd = launch[(1,)](x, 33, 1.0, BLOCK=64, num_warps=4)
    misaligned = launch[(1,)](x[1:], 32, 1.0, BLOCK=64, num_warps=4)
    other_block = launch[(1,)](x, 32, 1.0, BLOCK=128, num_warps=4)
    other_dtype = launch[(1,)](x.float(), 32, 1.0, BLOCK=64, num_warps=4)
    assert len({id(c) for c in (divisible, odd, misaligned, other_block, other_dtype)}) == 5
    assert len(kernel.triton_launches) == 5 and not kernel.direct_launches
    assert launch[(1,)](x[4:], 16, 1.0, BLOCK=64, num_warps=4) is divisible
    assert launch[(1,)](x[5:], 17, 1.0, BLOCK=64, num_warps=4) is launch[(1,)](x[9:], 33, 1.0, BLOCK=64, num_warps=4)
    assert len(kernel.triton_launches) == 6  # (misaligned and odd: not seen before)
    assert [c for c, _ in kernel.direct_launches] == [divisible, kernel.compiled[(torch.int32, False, False, 64, 4)]]


def test_an_int_equal_to_one_is_its_own_specialisation():
    kernel = Kernel()
    launch = launcher_for(kernel)
    x = torch.zeros(8)
    launch[(1,)](x, 3, 1.0, BLOCK=64, num_warps=4)
    launch[(1,)](x, 1, 1.0, BLOCK=64, num_warps=4)
    assert len(kernel.triton_launches) == 2  # (Triton makes 1 a constant)


@pytest.mark.parametrize("extra", [["tt.pointer_range", 32], ["tt.divisibility", 8]])
def test_a_specialisation_the_key_does_not_hold_turns_the_direct_path_off(extra):
    kernel = Kernel(extra_attr=extra)
    launch = launcher_for(kernel)
    x = torch.zeros(64)
    for _ in range(3):
        launch[(1,)](x, 32, 1.0, BLOCK=64, num_warps=4)
    assert len(kernel.triton_launches) == 3 and not kernel.direct_launches
    assert not launch.direct


def test_a_parameter_left_at_its_default_goes_through_triton():
    kernel = Kernel()
    kernel.arg_names = kernel.arg_names + ["EXTRA"]
    launch = launcher_for(kernel)
    x = torch.zeros(64)
    for _ in range(2):
        launch[(1,)](x, 32, 1.0, BLOCK=64, num_warps=4)
    assert len(kernel.triton_launches) == 2 and not kernel.direct_launches


def test_under_the_interpreter_every_launch_is_tritons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (read when a Launcher is made; set on CPU machines already)
    kernel = Kernel()
    launch = Launcher(kernel)
    assert not launch.direct
    x = torch.zeros(64)
    launch[(1,)](x, 32, 1.0, BLOCK=64, num_warps=4)
    launch[(1,)](x, 32, 1.0, BLOCK=64, num_warps=4)
    assert len(kernel.triton_launches) == 2 and not kernel.direct_launches


def test_descriptor_keys_hold_their_block_and_layout_whatever_the_triton_version():
    """Host TMA descriptors differ between Triton versions (one without round_f32_to_tf32, a layout
    that may not hash): the key is built either way and tells blocks and layouts apart."""
    base = torch.zeros(4, 128, dtype=torch.bfloat16)
    older = SimpleNamespace(base=base, block_shape=[64, 128], layout=["swizzle", 128], padding="zero")
    newer = SimpleNamespace(base=base, block_shape=[64, 128], layout=("swizzle", 128), padding="zero",
                            round_f32_to_tf32=False)
    keys = {_arg_key(d) for d in (older, newer)}
    assert len(keys) == 2
    wider = SimpleNamespace(base=base, block_shape=[128, 128], layout=("swizzle", 128), padding="zero",
                            round_f32_to_tf32=False)
    other_layout = SimpleNamespace(base=base, block_shape=[64, 128], layout=("swizzle", 64), padding="zero",
                                   round_f32_to_tf32=False)
    assert len({_arg_key(d) for d in (newer, wider, other_layout)}) == 3
    assert _arg_key(newer) == _arg_key(SimpleNamespace(**vars(newer)))


def test_keys_that_never_repeat_turn_the_direct_path_off():
    kernel = Kernel()
    launch = launcher_for(kernel)
    x = torch.zeros(64)
    for block in range(MAX_SPECIALISATIONS + 1):
        launch[(1,)](x, 32, 1.0, BLOCK=block, num_warps=4)
    assert len(launch.compiled) == MAX_SPECIALISATIONS and not launch.direct
    launch[(1,)](x, 32, 1.0, BLOCK=0, num_warps=4)
    assert len(kernel.triton_launches) == MAX_SPECIALISATIONS + 2 and not kernel.direct_launches


def test_the_launch_key_is_each_arguments_key():
    """The launch key's inline cases (ints, tensors, None, a descriptor type met before) give what
    `_arg_key` gives, argument by argument, and the rest goes to `_arg_key`."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from kernels.runtime import _args_key

    class Flag(int):  # (an int subclass: not the inline case)
        pass

    aligned, offset = torch.zeros(64), torch.zeros(64)[1:]
    args = (aligned, offset, torch.nn.Parameter(torch.zeros(4)), 1, 0, 16, 48, 17, -32, 2**31, -(2**31) - 1, 2**40,
            Flag(32), True, False, None, 0.5, torch.zeros(8, dtype=torch.float16))
    keys = _args_key(args)
    assert keys == tuple(_arg_key(a) for a in args)
    assert keys[0] == (torch.float32, True) and keys[1] == (torch.float32, False)
    assert keys[3] == (int, True, False, True) and keys[5] == (int, False, True, True)
    assert keys[9] == (int, False, True, False) and keys[13] is True and keys[15] is None

    descriptor = TensorDescriptor(torch.zeros(4, 64, dtype=torch.float16), [4, 64], [64, 1], [4, 32])
    runtime._DESCRIPTOR_TYPES.discard(TensorDescriptor)
    first = _args_key((descriptor,))  # (through `_arg_key`, which notes the type)
    assert TensorDescriptor in runtime._DESCRIPTOR_TYPES
    assert _args_key((descriptor,)) == first == (_arg_key(descriptor),)
    assert first[0][:3] == (TensorDescriptor, torch.float16, (4, 32))


# A stand-in of Triton 3.6's launcher of a kernel with tensor descriptors: `CudaLauncher` calls its
# `launch` with 13 base arguments, and `launch` is a wrapper closing over the C launch function
# (`launcher`), the descriptors' positions and their TMA metadata, which expands each descriptor
# with `make_tensordesc_arg` (a module global, as in Triton's driver) before calling it.
_BASE_ARGS_FORMAT = "iiiKKppOOOOOO"
_BASE_ARGS_FORMAT_LEN = 13


def make_tensordesc_arg(arg, metadata):
    return [("map", arg.base.data_ptr(), tuple(arg.shape), metadata["swizzle"]), *arg.shape, *arg.strides]


def descriptor_wrapper(launcher, tensordesc_indices, tensordesc_meta):
    def inner(*args):
        final_args, n = list(args[:_BASE_ARGS_FORMAT_LEN]), 0
        for i, arg in enumerate(args[_BASE_ARGS_FORMAT_LEN:]):
            if i in tensordesc_indices:
                final_args.extend(make_tensordesc_arg(arg, tensordesc_meta[n]))
                n += 1
            else:
                final_args.append(arg)
        return launcher(*final_args)

    return inner


class CudaLauncher:
    def __init__(self, launch):
        self.launch, self.global_scratch_size, self.profile_scratch_size = launch, 0, 0
        self.launch_cooperative_grid, self.launch_pdl = False, True

    def __call__(self, grid_x, grid_y, grid_z, stream, function, *args):
        self.launch(grid_x, grid_y, grid_z, stream, function, self.launch_cooperative_grid, self.launch_pdl, None, None,
                    *args)


class DescriptorKernel(Kernel):
    """(descriptor, tensor, n, scale, BLOCK, num_warps): one descriptor argument, at position 0."""
    arg_names = ["D", "X", "N", "scale", "BLOCK", "num_warps"]

    def __init__(self):
        super().__init__()
        self.c_launches: list = []

    def __getitem__(self, grid):
        def launch(desc, x, n, scale, BLOCK, num_warps):
            spec = (desc.base.dtype, x.dtype, n % 16 == 0, BLOCK)
            if spec not in self.compiled:
                compiled = Compiled({}, self)
                compiled.run = CudaLauncher(descriptor_wrapper(lambda *a: self.c_launches.append(a), {0},
                                                               [{"swizzle": 128}]))
                self.compiled[spec] = compiled
            self.triton_launches.append((grid, desc, x, n, scale))
            return self.compiled[spec]

        return launch


def test_a_prepared_launch_passes_the_c_launcher_what_a_direct_launch_passes(monkeypatch):
    kernel = DescriptorKernel()
    launch = launcher_for(kernel)
    current = [0]
    launch.device = lambda: current[0]

    def descriptor(base):
        return SimpleNamespace(base=base, shape=[64, 32], strides=[32, 1], block_shape=[16, 32],
                               layout=("swizzle", 128), padding="zero", round_f32_to_tf32=False)

    base, x = torch.zeros(64, 32), torch.zeros(16)
    args, kwargs = (descriptor(base), x, 48, 0.5), dict(BLOCK=64, num_warps=4)
    assert launch.prepare((3, 2), args, kwargs) is None  # (no launch of this specialisation yet)
    launch.launch((3, 2), args, kwargs)  # through Triton
    launch.launch((3, 2), args, kwargs)  # directly: the wrapper expands the descriptor
    assert len(kernel.triton_launches) == 1 and len(kernel.c_launches) == 1
    again = launch.prepare((3, 2), args, kwargs)
    assert again is not None and len(kernel.c_launches) == 1  # (prepared, not launched)
    assert again() is True
    direct, prepared = kernel.c_launches
    function = next(iter(kernel.compiled.values())).function
    assert direct[:13] == prepared[:13] == (3, 2, 1, 1234, function, False, True, None, None, direct[9], None,
                                            None, None)  # (grid, stream, launch options, no launch hooks)
    assert direct[13:18] == prepared[13:18] == (("map", base.data_ptr(), (64, 32), 128), 64, 32, 32, 1)
    assert direct[18] is x and prepared[18] == x.data_ptr()  # (a tensor as its address)
    assert direct[19:] == prepared[19:] == (48, 0.5, 64, 4)

    # Other tensors at the varying positions: what a direct launch over them passes.
    varying = launch.prepare((3, 2), args, kwargs, varying=(0, 1))
    other_base, other_x = torch.ones(64, 32), torch.ones(16)
    assert varying(other_base, other_x) is True and varying(other_base, other_x.data_ptr()) is True
    launch.launch((3, 2), (descriptor(other_base), other_x, 48, 0.5), kwargs)
    replaced, by_address, direct = kernel.c_launches[-3:]
    assert replaced == by_address
    assert replaced[13:18] == direct[13:18] == (("map", other_base.data_ptr(), (64, 32), 128), 64, 32, 32, 1)
    assert replaced[18] == other_x.data_ptr() and direct[18] is other_x
    assert replaced[19:] == direct[19:] and replaced[:9] == direct[:9]
    assert again() is True and kernel.c_launches[-1] == prepared  # (the first one unchanged)

    launch.knobs.launch_enter_hook = print  # (a profiler's hook: launch as usual)
    assert again() is False
    launch.knobs.launch_enter_hook = SimpleNamespace(calls=[])  # (Triton 3.6's chain of hooks, empty)
    assert again() is True
    launch.knobs.launch_exit_hook = SimpleNamespace(calls=[print])
    assert again() is False
    launch.knobs.launch_enter_hook = launch.knobs.launch_exit_hook = None
    current[0] = 1  # (another device current)
    calls = len(kernel.c_launches)
    assert again() is False and varying(other_base, other_x) is False
    current[0] = 0
    monkeypatch.setattr(runtime, "DIRECT_LAUNCH", False)  # (every launch through Triton's)
    assert again() is False
    assert len(kernel.c_launches) == calls

    # The prepared launches hold none of the tensors they were made from.
    refs = [weakref.ref(t) for t in (base, x, other_base, other_x)]
    kernel.triton_launches.clear()
    kernel.c_launches.clear()
    del base, x, other_base, other_x, args, direct, prepared, replaced, by_address
    assert all(ref() is None for ref in refs) and again is not None and varying is not None


def test_a_launcher_of_another_shape_is_not_prepared(monkeypatch):
    kernel = Kernel()  # (its compiled `run` is not Triton 3.6's CudaLauncher)
    launch = launcher_for(kernel)
    x = torch.zeros(64)
    launch[(1,)](x, 32, 1.0, BLOCK=64, num_warps=4)
    assert launch.prepare((1,), (x, 32, 1.0), dict(BLOCK=64, num_warps=4)) is None
    assert not launch.preparable  # (its callers stop asking)
    kernel = DescriptorKernel()  # (a launcher of Triton 3.6's shape, but its C function's base arguments differ)
    launch = launcher_for(kernel)
    monkeypatch.setattr(sys.modules[__name__], "_BASE_ARGS_FORMAT", "iiiKKppOOOOO")
    desc = SimpleNamespace(base=x, shape=[64], strides=[1], block_shape=[16], layout=None, padding="zero")
    for _ in range(2):
        launch.launch((1,), (desc, x, 16, 1.0), dict(BLOCK=64, num_warps=4))
    assert launch.prepare((1,), (desc, x, 16, 1.0), dict(BLOCK=64, num_warps=4)) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel = DescriptorKernel()
    launch = Launcher(kernel)  # (under the interpreter: never)
    desc = SimpleNamespace(base=x, shape=[64], strides=[1], block_shape=[16], layout=None, padding="zero")
    launch.launch((1,), (desc, x, 16, 1.0), dict(BLOCK=64, num_warps=4))
    assert launch.prepare((1,), (desc, x, 16, 1.0), dict(BLOCK=64, num_warps=4)) is None


def test_a_direct_launch_passes_launch_hooks_only_when_one_is_set():
    kernel = Kernel()
    launch = launcher_for(kernel)
    x = torch.zeros(64)
    empty, hooked = SimpleNamespace(calls=[]), SimpleNamespace(calls=[print])
    for enter in (None, empty, hooked):
        launch.knobs.launch_enter_hook = enter
        launch[(1,)](x, 32, 1.0, BLOCK=64, num_warps=4)
    _, empty_chain = kernel.direct_launches[0]
    _, hook_set = kernel.direct_launches[1]
    assert empty_chain[6:9] == (None, None, None)  # (launch metadata, enter and exit hooks)
    assert hook_set[7] is hooked and hook_set[8] is None


def test_prepared_launches_are_kept_by_key_and_built_only_where_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(runtime, "PREPARED_LAUNCHES", 2)
    kernel = DescriptorKernel()
    site = runtime.PreparedLaunches(launcher_for(kernel), varying=(0, 1))
    assert site.active()
    builds = []

    def call(key, base, x):
        def build():
            builds.append(key)
            desc = SimpleNamespace(base=base, shape=[64, 32], strides=[32, 1], block_shape=[16, 32],
                                   layout=("swizzle", 128), padding="zero")
            return (1,), (desc, x, 48, 0.5), dict(BLOCK=64, num_warps=4)

        site.launch(key, (base, x), build)
        return kernel.c_launches[-1] if kernel.c_launches else None

    tensors = [(torch.zeros(64, 32), torch.zeros(16)) for _ in range(4)]
    call("a", *tensors[0])  # through Triton: compiled, nothing to prepare from yet
    call("a", *tensors[0])  # built, prepared and launched from it
    launched = call("a", *tensors[1])  # found
    assert builds == ["a", "a"] and list(site.launches) == ["a"]
    assert launched[13][1] == tensors[1][0].data_ptr() and launched[18] == tensors[1][1].data_ptr()
    call("b", *tensors[2])
    call("c", *tensors[3])  # (two kept: the oldest goes)
    assert list(site.launches) == ["b", "c"] and builds == ["a", "a", "b", "c"]
    call(None, *tensors[0])
    call(None, *tensors[0])  # (no key: built every time, never kept)
    assert builds[-2:] == [None, None] and list(site.launches) == ["b", "c"]
    launches = len(kernel.c_launches)
    call("c", *tensors[0])
    assert len(kernel.c_launches) == launches + 1 and builds[-1] is None
    monkeypatch.setattr(runtime, "PREPARED_LAUNCHES", 0)
    assert not site.active()


@pytest.mark.cuda
def test_model_kernels_from_prepared_launches_equal_launches_built_in_full(monkeypatch):
    """RoPE, the residual add with RMSNorm and silu(gate) * up made again from their prepared
    launches with other tensors of the same shapes give what launches built in full give."""
    from kernels import activation, rms_norm, rope

    def calls() -> list:
        outs = []
        for seed in range(3):  # (compiled, prepared, found)
            g = torch.Generator(device="cuda").manual_seed(seed)
            x, y, w, gate, up, q, k, cos, sin = (
                torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)
                for shape in ((7, 3584), (7, 3584), (3584,), (7, 18944), (7, 18944), (7, 28, 128), (7, 4, 128),
                              (7, 128), (7, 128)))
            outs.append((*rms_norm.add_rms_norm(x, y, w, 1e-6), activation.silu_mul(gate, up),
                         *rope.rope(q, k, cos, sin)))
        return outs

    sites = (rope._rope_prepared, rms_norm._add_rms_norm_prepared, activation._silu_mul_prepared)
    for site in sites:
        site.launches.clear()
    prepared = calls()
    assert all(len(site.launches) == 1 for site in sites), "each kernel should have its launch prepared"
    monkeypatch.setattr(runtime, "PREPARED_LAUNCHES", 0)
    full = calls()
    for made, built in zip(prepared, full):
        for a, b in zip(made, built):
            assert torch.equal(a, b)


def test_flash_attention_takes_no_cpu_tensors():
    assert not runtime.flash_attention_takes(torch.zeros(1, 4, 2, 128, dtype=torch.bfloat16))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.is_available() and not runtime.flash_attention_available(torch.device("cuda", 0)),
                    reason="PyTorch's flash-attention kernel is not available on this GPU")
def test_flash_attention_takes_what_the_flash_kernel_runs():
    """16-bit floats with a head dim a multiple of 8 up to 256 go to PyTorch's flash-attention
    kernel (and it runs them); fp32, head dims off the multiple of 8 or past 256 do not."""
    def q(d: int, dtype=torch.bfloat16) -> torch.Tensor:
        return torch.randn(1, 64, 2, d, dtype=dtype, device="cuda")

    for d in (64, 80, 128, 256):
        for dtype in (torch.float16, torch.bfloat16):
            x = q(d, dtype)
            assert runtime.flash_attention_takes(x)
            out = torch.ops.aten._flash_attention_forward(x, x, x, None, None, 64, 64, 0.0, True, False)[0]
            assert out.shape == x.shape and torch.isfinite(out).all()
    assert not runtime.flash_attention_takes(q(128, torch.float32))
    assert not runtime.flash_attention_takes(q(100))
    assert not runtime.flash_attention_takes(q(264))
