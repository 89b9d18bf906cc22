"""Compile the Hopper kernel for sm_90 on a machine without a GPU and print what ptxas reports
(registers, stack, spill stores and loads, warnings such as serialised warpgroup MMAs), so that a
change's register cost is seen before any GPU time is spent on it.

A development script: the compiler runs against a stand-in for Triton's CUDA driver (nothing is
launched), with the Triton installed here, which may be newer than the GPU machine's; spill counts
can differ a little between versions (BENCHMARKS.md, eighteenth session).

    .venv/bin/python scripts/sm90_resources.py [MODULE ...] [--mean-correction] [--ptx DIR] [--schedule]

MODULE: a module holding `_sparse_attention_sm90_ws_kernel` (default
kernels.flash_prefill.sparse_attention_sm90; e.g. a copy made for an experiment).

--short-query SETTING ... compiles kernels.short_query_attention's span kernel instead, for 200 queries
over 131K keys, at each block_m/block_n/warps/stages SETTING (e.g. 128/64/8/3).

--schedule disassembles the kernel (`nvdisasm`) and prints, for each consumer's loop over kept
blocks, its length and where in it the warpgroup-MMA waits (`WARPGROUP.DEPBAR`), the exponentials
and the first packing of P fall. ptxas places the wait for P V before the softmax in the kept
kernel (BENCHMARKS.md, twenty-fifth session); this shows whether a change moves it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver
from triton.runtime.driver import driver


def _stand_in_driver() -> CudaDriver:
    """Triton's CUDA driver object without its initialisation (which needs libcuda): enough for
    the compiler, which asks only for the device, the stream and the target."""
    fake = CudaDriver.__new__(CudaDriver)
    fake.get_current_device = lambda: 0
    fake.get_current_stream = lambda device=None: 0
    fake.get_current_target = lambda: GPUTarget("cuda", 90, 32)
    return fake


def compile_ws_kernel(module, mean_correction: bool):
    """The warp-specialised kernel compiled for a 4K-token, 28 / 4-head, head-dim-128 bf16 call."""
    b, t, hq, h, d = 1, 4096, 28, 4, 128
    nkb = t // module.BLOCK
    q = torch.empty(b, t, hq, d, dtype=torch.bfloat16)
    k = torch.empty(b, t, h, d, dtype=torch.bfloat16)
    num = torch.zeros(b, hq, nkb, dtype=torch.int32)
    idx = torch.zeros(b, hq, nkb, nkb, dtype=torch.int32)
    means = kept = None
    if mean_correction:
        means = module._means_descriptor(torch.empty(b, h, nkb, d, dtype=torch.bfloat16))
        kept = module._kept_descriptor(torch.zeros(b, hq, nkb, module.KEPT_ROW_MULTIPLE * 2, dtype=torch.uint8))
    kernel = module._sparse_attention_sm90_ws_kernel
    extra = [module.KEPT_ROW_MULTIPLE * 2 if mean_correction else None] if "KEPT_ROW" in kernel.arg_names else []
    return kernel.warmup(
        module._descriptor(q, module.BLOCK, d), module._descriptor(k, module.BLOCK, d),
        module._descriptor(k, module.BLOCK, d), module._descriptor(q, module.BLOCK // 2, d), means, means, kept,
        num, idx, torch.zeros(2, dtype=torch.int32), t, t, hq, hq // h, nkb, nkb, 0, nkb, nkb * hq, 0.1, num,
        2.0 if mean_correction else None, *extra,
        D_PAD=d, BM=module.BLOCK, STAGES=module.DEFAULT_STAGES, GROUP_ORDER=True, DYNAMIC=True,
        CONSUMER_REGS=module.CONSUMER_REGS, TRACE_ITEMS=0, MEAN_CORRECTION=mean_correction, num_warps=4, grid=(132,),
    )


def compile_short_query_kernel(setting: str):
    """kernels.short_query_attention's span kernel compiled for 200 queries over 131K keys, the 7B
    heads in bf16, at a block_m/block_n/warps/stages setting."""
    from kernels import short_query_attention as module

    block_m, block_n, warps, stages = (int(x) for x in setting.split("/"))
    tq, tk, hq, h, d = 200, 131072, 28, 4, 128
    q = torch.empty(1, tq, hq, d, dtype=torch.bfloat16)
    k = torch.empty(1, tk, h, d, dtype=torch.bfloat16)
    part_o, part_ml = torch.empty(1, d, dtype=torch.float32), torch.empty(1, 2, dtype=torch.float32)
    tiles = -(-tq * (hq // h) // block_m)
    return module._short_query_spans_kernel.warmup(
        q, k, k, part_o, part_ml, 0.1, tq, tk, h, tiles, 16384, 8, *q.stride()[:3], *k.stride()[:3], *k.stride()[:3],
        GROUP=hq // h, BLOCK_M=block_m, D=d, BLOCK_D=d, BLOCK_N=block_n, PRECISION="tf32", UPCAST=False,
        num_warps=warps, num_stages=stages, grid=(h * tiles, 8),
    )


def consumer_loops(sass: str) -> list[str]:
    """One line per loop of the disassembly with 16 warpgroup MMA instructions (a consumer's loop
    over kept blocks: 8 for S, 8 for P V): its length and the positions, counted from its first
    instruction, of its MMA waits, its exponentials and its first packing of P into bf16 pairs."""
    ins, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"\.(L_x_\d+):", line.strip())
        if label:
            labels[label.group(1)] = len(ins)
        instruction = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if instruction:
            ins.append(instruction.group(1))
    found = []
    for end, text in enumerate(ins):
        branch = re.search(r"BRA.*?\.(L_x_\d+)", text)
        if not branch or labels.get(branch.group(1), end) >= end:
            continue
        body = ins[labels[branch.group(1)]:end + 1]
        # (a spin-wait's retry branch back into a loop from the end of the code spans an EXIT)
        if sum("HGMMA" in x for x in body) != 16 or any(x.startswith("EXIT") for x in body):
            continue
        waits = [k for k, x in enumerate(body) if "WARPGROUP.DEPBAR" in x]
        exps = [k for k, x in enumerate(body) if "MUFU.EX2" in x]
        packs = [k for k, x in enumerate(body) if "F2FP" in x]
        found.append(f"loop of {len(body)} instructions: MMA waits at {waits}, exponentials "
                     f"{exps[0] if exps else '-'}..{exps[-1] if exps else '-'}, first P pack "
                     f"{packs[0] if packs else '-'}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=["kernels.flash_prefill.sparse_attention_sm90"])
    parser.add_argument("--mean-correction", action="store_true")
    parser.add_argument("--ptx", help="also write each module's PTX into this folder")
    parser.add_argument("--short-query", nargs="+", metavar="SETTING",
                        help="compile kernels.short_query_attention's span kernel at these settings instead")
    parser.add_argument("--schedule", action="store_true",
                        help="disassemble and print where each consumer loop's MMA waits and exponentials fall")
    args = parser.parse_args()
    driver.set_active(_stand_in_driver())
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if args.short_query:
        jobs = [(f"short_query_attention {s}", lambda s=s: compile_short_query_kernel(s)) for s in args.short_query]
    else:
        jobs = [(name, lambda name=name: compile_ws_kernel(importlib.import_module(name), args.mean_correction))
                for name in args.modules]
    for name, compile_kernel in jobs:
        compiled = compile_kernel()
        ptx = compiled.asm["ptx"]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.ptx")
            with open(path, "w") as fh:
                fh.write(ptx)
            report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(tmp, "k.o")],
                                    capture_output=True, text=True)
            sass = ""
            if args.schedule:
                nvdisasm = os.path.join(os.path.dirname(ptxas), "nvdisasm")
                sass = subprocess.run([nvdisasm, "-c", os.path.join(tmp, "k.o")], capture_output=True, text=True).stdout
        if args.ptx:
            os.makedirs(args.ptx, exist_ok=True)
            stem = name.rsplit(".", 1)[-1].replace(" ", "_").replace("/", "-")
            with open(os.path.join(args.ptx, f"{stem}.ptx"), "w") as fh:
                fh.write(ptx)
        lines = [line.strip() for line in report.stderr.splitlines()
                 if "spill" in line or "registers" in line or "arning" in line or "Performance" in line]
        print(f"{name}{' (mean correction)' if args.mean_correction else ''}: {len(ptx.splitlines())} PTX lines")
        for line in lines + (consumer_loops(sass) if args.schedule else []):
            print(f"  {line}")


if __name__ == "__main__":
    main()
