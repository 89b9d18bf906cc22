"""Whether the Hopper kernel compiles to the same PTX as an earlier version of its module (line
and debug information and the parameter list left out), by running both once on one input: a
check that a change behind a constexpr off by default leaves the default kernel as it was.

A development script; the earlier module is a copy in the package, e.g. from
`git show REV:kernels/flash_prefill/sparse_attention_sm90.py > kernels/flash_prefill/_sm90_before.py`.

    PYTHONPATH=$PWD python3 scripts/gpu_same_ptx.py _sm90_before
"""

import importlib
import sys

import torch

from kernels.flash_prefill import sparse_attention_sm90 as current
from kernels.testing import random_pattern, random_qkv


def ptx(module) -> list[str]:
    q, k, v = random_qkv(1, 4096, 4096, 28, 4, 128, dtype=torch.bfloat16, device="cuda", seed=1)
    pattern = random_pattern(1, 28, 4096, 128, 0.3, "cuda", seed=1)
    module.sparse_attention_sm90(q, k, v, pattern.kv_num_blocks, pattern.kv_indices, 128**-0.5)
    torch.cuda.synchronize()
    kernels = [c for entry in module._sparse_attention_sm90_ws_kernel.device_caches.values() for c in entry[0].values()]
    assert len(kernels) == 1, len(kernels)
    code = kernels[0].asm["ptx"].split(".section")[0]  # (the debug sections name the file)
    return [line for line in code.splitlines() if not line.lstrip().startswith((".loc", ".file", "//"))
            and "_param_" not in line]


def main() -> None:
    before = importlib.import_module(f"kernels.flash_prefill.{sys.argv[1]}")
    old, new = ptx(before), ptx(current)
    differ = [(i, a, b) for i, (a, b) in enumerate(zip(old, new)) if a != b]
    print(f"PTX lines: {len(old)} before, {len(new)} now; differing lines: {len(differ) + abs(len(old) - len(new))}")
    for i, a, b in differ[:20]:
        print(f"{i}: {a.strip()}  |  {b.strip()}")


if __name__ == "__main__":
    main()
