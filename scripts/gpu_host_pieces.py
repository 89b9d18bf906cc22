"""Host microseconds of each piece of one dense-fallback call on the Hopper kernel (`flash_prefill`
below `min_seq_len`), down to Triton's compiled launcher: our checks and descriptors, the launch
key, Triton's TMA map encoding and its C launcher. Each piece: the median over `--rounds` rounds,
the pieces alternated, of `--calls` calls (the GPU synchronised every 25 calls); `--profile`, then
the whole call under cProfile. A development script (results
go to BENCHMARKS.md).

    PYTHONPATH=$PWD python3 scripts/gpu_host_pieces.py [--tokens 1024] [--calls 300] [--profile]
"""

import argparse
import cProfile
import inspect
import pstats
import statistics

import torch
from gpu_launch_host import host_us

from kernels import FlashPrefillConfig, flash_prefill, runtime
from kernels.flash_prefill import api
from kernels.flash_prefill import sparse_attention_sm90 as hk

BELOW_MIN = FlashPrefillConfig.for_model("qwen2.5-vl", min_seq_len=2**30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--profile", action="store_true", help="then the whole call under cProfile")
    args = parser.parse_args()
    from triton.backends.nvidia import driver as nvidia_driver
    from triton.runtime import driver

    t = args.tokens
    q = torch.randn(1, t, 28, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, t, 4, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    causal = api._kernel_causal_pattern(1, 28, t, t, 128, q.device)
    n, ids = causal.kv_num_blocks, causal.kv_indices
    kept_flash, api.DENSE_FLASH_BELOW = api.DENSE_FLASH_BELOW, 0
    for _ in range(3):
        flash_prefill(q, k, v, config=BELOW_MIN)
    launcher = hk._sparse_attention_sm90_ws_launch
    captured = {}
    plain_launch = launcher.launch

    def capture(grid, a, kw):
        captured.update(grid=grid, args=a, kwargs=kw)
        return plain_launch(grid, a, kw)

    launcher.launch = capture
    prepared, runtime.PREPARED_LAUNCHES = getattr(runtime, "PREPARED_LAUNCHES", 0), 0  # (built in full)
    hk.sparse_attention_sm90(q, k, v, n, ids, 128**-0.5, out=out)
    runtime.PREPARED_LAUNCHES = prepared
    launcher.launch = plain_launch
    grid, kargs, kwargs = captured["grid"], captured["args"], captured["kwargs"]
    args_key = getattr(runtime, "_args_key", None) or (lambda a: tuple(map(runtime._arg_key, a)))  # (before it)
    keys = args_key(kargs)
    device = driver.active.get_current_device()
    compiled, constexprs = launcher.compiled[(device, keys, tuple(kwargs.items()))]
    full = (*kargs, *constexprs)
    stream = driver.active.get_current_stream(device)
    size = tuple(grid) + (1, 1)
    meta = compiled.launch_metadata(grid, stream, *full)
    hooks = launcher.knobs
    descriptors = [a for a in kargs if hasattr(a, "block_shape")]
    tensordesc_meta = getattr(compiled.metadata, "tensordesc_meta", None) or [None] * len(descriptors)

    def run():
        compiled.run(size[0], size[1], size[2], stream, compiled.function, compiled.packed_metadata, meta,
                     hooks.launch_enter_hook, hooks.launch_exit_hook, *full)

    extra = (None,) * (len(inspect.signature(nvidia_driver.make_tensordesc_arg).parameters) - 2)

    def encode():
        for d, m in zip(descriptors, tensordesc_meta):
            nvidia_driver.make_tensordesc_arg(d, m, *extra)

    def built_in_full(fn):  # (the launch not prepared: before the twenty-first session)
        def run_it():
            kept, runtime.PREPARED_LAUNCHES = runtime.PREPARED_LAUNCHES, 0
            try:
                fn()
            finally:
                runtime.PREPARED_LAUNCHES = kept
        return run_it

    sparse = FlashPrefillConfig.for_model("qwen2.5-vl", min_seq_len=0)
    find = lambda: api._find_pattern_triton(q, k, sparse, 128**-0.5)  # noqa: E731
    whole = lambda: flash_prefill(q, k, v, config=BELOW_MIN)  # noqa: E731
    wrapper = lambda: hk.sparse_attention_sm90(q, k, v, n, ids, 128**-0.5, out=out)  # noqa: E731
    pieces = {
        "pattern stage (block means and index build; twenty-first session)": find,
        "pattern stage, launches built in full": built_in_full(find),
        "flash_prefill below min_seq_len on the Hopper kernel (whole call)": whole,
        "whole call, launch built in full": built_in_full(whole),
        "sparse_attention_sm90 (the wrapper, out given)": wrapper,
        "the wrapper, launch built in full": built_in_full(wrapper),
        "Launcher.launch with the arguments built": lambda: launcher.launch(grid, kargs, kwargs),
        "compiled.run (Triton's compiled launcher)": run,
        "make_tensordesc_arg x4 (TMA maps encoded)": encode,
        "FlashPrefillConfig check + _resolve_backend + _check": lambda: (
            isinstance(BELOW_MIN, FlashPrefillConfig), api._resolve_backend("auto", q.device),
            api._check(q, k, v, "triton")),
        "_dense_on_flash_kernel + _dense_on_hopper_kernel": lambda: (api._dense_on_flash_kernel(q, k, v),
                                                                     api._dense_on_hopper_kernel(q, k, v, 128)),
        "_kernel_causal_pattern (cached)": lambda: api._kernel_causal_pattern(1, 28, t, t, 128, q.device),
        "torch.empty (the output)": lambda: torch.empty(q.shape, dtype=q.dtype, device=q.device),
        "_work_counter": lambda: hk._work_counter(q.device),
        "4 TMA descriptors (ours)": lambda: [hk._descriptor(x, hk.BLOCK, 128) for x in (q, k, v, out)],
        "launch key": lambda: (device, args_key(kargs), tuple(kwargs.items())),
        "launch_metadata": lambda: compiled.launch_metadata(grid, stream, *full),
        "current device + stream (Triton's getters)": lambda: driver.active.get_current_stream(
            driver.active.get_current_device()),
    }
    print(f"{t} tokens, {len(kargs)} runtime arguments ({len(descriptors)} descriptors), {len(constexprs)} constexprs")
    times = {name: [] for name in pieces}
    for fn in pieces.values():
        fn()
    for _ in range(args.rounds):  # (pieces alternated, so that a slower spell of the host meets each)
        for name, fn in pieces.items():
            times[name].append(host_us(fn, args.calls))
    print("| piece | host us (median) | min | max |")
    print("|---|---|---|---|")
    for name, spent in times.items():
        print(f"| {name} | {statistics.median(spent):.1f} | {min(spent):.1f} | {max(spent):.1f} |")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            flash_prefill(q, k, v, config=BELOW_MIN)
        profiler.disable()
        torch.cuda.synchronize()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    api.DENSE_FLASH_BELOW = kept_flash


if __name__ == "__main__":
    main()
