"""kernels.runtime.Launcher's choice between Triton's launch and a compiled kernel's own launcher.

A stand-in kernel plays Triton here: it specialises as Triton does (16-byte aligned tensors, ints
that are multiples of 16), compiles one stand-in kernel per specialisation and records every
launch. The GPU tests run the real kernels through the launcher (test_flash_prefill_cuda.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

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
    launcher.direct = True  # (off under the interpreter, which the CPU tests run)
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


def test_under_the_interpreter_every_launch_is_tritons():
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

    from kernels import runtime
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
