"""On the H200: check the Hopper (Gluon) attention kernel against the Triton one and the
reference, then time both against cuDNN dense on random and selected patterns.

`python3 scripts/gpu_sm90_eval.py [--lengths ...] [--json FILE]`; a development script for the
kernel choice (results go to BENCHMARKS.md), not part of the product.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import torch

from kernels import FlashPrefillConfig
from kernels.bench import ANCHOR_V1, bench_ms, cudnn_dense_ms, environment, sink_local_case
from kernels.flash_prefill import api, reference
from kernels.flash_prefill import sparse_attention_sm90 as sm90
from kernels.testing import random_pattern, random_qkv, structured_qkv


def check(name, b, tq, tk, hq, h, d, dtype, density, strided=False, seed=0, vs_reference=False, ws=True):
    q, k, v = random_qkv(b, tq, tk, hq, h, d, dtype=dtype, device="cuda", seed=seed)
    if strided:  # transformers' (B, H, T, D) storage seen as (B, T, H, D)
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    pattern = random_pattern(b, hq, tk, 128, density, "cuda", seed=seed, q_len=tq)
    scale = d**-0.5
    ok_shape = sm90.supported(q, k, v, 128)
    if not ok_shape:
        return {"case": name, "supported": False}
    api.USE_HOPPER_KERNEL = False
    base = api._sparse_attention_triton(q, k, v, pattern, scale)
    api.USE_HOPPER_KERNEL = True
    row = {"case": name, "supported": True, "density": pattern.density()}
    if vs_reference:
        ref = reference.sparse_attention(q.float(), k.float(), v.float(), pattern, scale)
        row["triton_max_abs_vs_reference"] = (base.float() - ref).abs().max().item()
    variants = (("sm90", False, True), ("ws", True, True), ("ws_static", True, False))
    for label, warp_specialized, dynamic in variants if ws else variants[:1]:
        ours = torch.full_like(q, float("nan"))
        try:
            sm90.sparse_attention_sm90(q, k, v, pattern.kv_num_blocks, pattern.kv_indices, scale, out=ours,
                                       warp_specialized=warp_specialized, dynamic=dynamic)
            torch.cuda.synchronize()
        except Exception as err:
            row[f"{label}_error"] = str(err).splitlines()[0][:300]
            continue
        row[f"{label}_max_abs_vs_triton"] = (ours.float() - base.float()).abs().max().item()
        row[f"{label}_finite"] = bool(torch.isfinite(ours).all())
        if vs_reference:
            row[f"{label}_max_abs_vs_reference"] = (ours.float() - ref).abs().max().item()
    return row


# (label, ring slots, group order, warp-specialised persistent, dynamic work items)
VARIANTS = [("sm90_s3", 3, True, False, True), ("ws_s3", 3, True, True, True), ("ws_s3_static", 3, True, True, False),
            ("ws_s2", 2, True, True, True), ("ws_s3_head", 3, False, True, True)]


def timing(t, densities, hq=28, h=4, d=128):
    q, k, v = random_qkv(1, t, t, hq, h, d, dtype=torch.bfloat16, device="cuda")
    cudnn = cudnn_dense_ms(q, k, v)
    scale = d**-0.5
    cfg = FlashPrefillConfig(block_size=128, alpha=0.1, min_seq_len=0)
    sq, sk, sv = structured_qkv(1, t, t, hq, h, d, 128, dtype=torch.bfloat16, device="cuda")
    cases = [("random", q, k, v, random_pattern(1, hq, t, 128, dens, "cuda", seed=t)) for dens in densities]
    cases.append(("selected", sq, sk, sv, api._find_pattern_triton(sq, sk, cfg, scale)))
    if t in ANCHOR_V1:  # the whole-prefill comparison's input, at the paper code's density
        cases.append(("sink_local", *sink_local_case(t, hq, h, d, cfg)))
    rows = []
    for kind, cq, ck, cv, pattern in cases:
        dens = pattern.density()
        row = {"tokens": t, "pattern": kind, "density": dens, "cudnn_ms": cudnn}
        api.USE_HOPPER_KERNEL = False
        row["triton_ms"] = bench_ms(lambda: api._sparse_attention_triton(cq, ck, cv, pattern, scale))
        api.USE_HOPPER_KERNEL = True
        for key, stages, order, ws, dynamic in VARIANTS:
            try:
                row[key + "_ms"] = bench_ms(lambda: sm90.sparse_attention_sm90(
                    cq, ck, cv, pattern.kv_num_blocks, pattern.kv_indices, scale, group_order=order,
                    stages=stages, warp_specialized=ws, dynamic=dynamic))
            except Exception as err:
                row[key + "_ms"] = None
                print(f"  {key} failed: {str(err).splitlines()[0][:300]}", file=sys.stderr)
        for name in list(row):
            if name.endswith("_ms") and name != "cudnn_ms" and row[name]:
                row[name.replace("_ms", "_ratio")] = row[name] / (dens * cudnn)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.25, 1.0])
    parser.add_argument("--json")
    parser.add_argument("--checks-only", action="store_true")
    parser.add_argument("--no-ws", action="store_true", help="leave the warp-specialised variants out")
    parser.add_argument("--variants", nargs="+", help="time only these variants (labels of VARIANTS)")
    args = parser.parse_args()
    print(environment(), flush=True)
    run = functools.partial(check, ws=not args.no_ws)
    checks = [
        run("16K 28/4 d128 bf16 10%", 1, 16384, 16384, 28, 4, 128, torch.bfloat16, 0.1),
        run("16K 28/4 d128 bf16 diag only", 1, 16384, 16384, 28, 4, 128, torch.bfloat16, 0.0),
        run("16K 28/4 d128 bf16 100%", 1, 16384, 16384, 28, 4, 128, torch.bfloat16, 1.0),
        run("prefix 4K of 16K d128 bf16", 1, 4096, 16384, 28, 4, 128, torch.bfloat16, 0.2, seed=1),
        run("unaligned 9000 d128 fp16 b2 strided", 2, 9000, 9000, 8, 2, 128, torch.float16, 0.3, strided=True,
            seed=2),
        run("d64 fp16 group 1 3000", 1, 3000, 3000, 4, 4, 64, torch.float16, 0.5, seed=3),
        run("4K 28/4 d128 bf16 vs reference", 1, 4096, 4096, 28, 4, 128, torch.bfloat16, 0.3, seed=4,
            vs_reference=True),
        run("2K prefix 640 of 2048 d64 bf16 vs reference", 1, 640, 2048, 7, 1, 64, torch.bfloat16, 0.5, seed=5,
            vs_reference=True),
    ]
    for c in checks:
        print(json.dumps(c), flush=True)
    if args.checks_only:
        return 0
    if args.no_ws:
        VARIANTS[:] = [v for v in VARIANTS if not v[3]]
    if args.variants:
        VARIANTS[:] = [v for v in VARIANTS if v[0] in args.variants]
    rows = []
    for t in args.lengths:
        start = time.time()
        rows += timing(t, args.densities)
        print(f"  {t}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "checks": checks, "timing": rows}, f, indent=1)
    keys = ["triton"] + [v[0] for v in VARIANTS]
    print("| tokens | pattern | density | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{r.get(k + '_ratio', float('nan')):.2f}" for k in keys]
        print(f"| {r['tokens']} | {r['pattern']} | {100 * r['density']:.1f}% | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
