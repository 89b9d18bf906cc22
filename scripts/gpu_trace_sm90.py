"""On the H200: where the warp-specialised Hopper kernel spends a work item's time.

`python3 scripts/gpu_trace_sm90.py [--tokens 65536] [--selected 16384 ...] [--modules M ...] [--json FILE]`.
Times each case (random block masks at --tokens; with --selected also the patterns FlashPrefill
selects on the sink / local input at the paper code's density for those lengths, as in
`kernels.bench`; --modules: several versions of the Hopper module, timed alternately --rounds times (3)
on the same inputs, outputs compared with the first), then runs the --trace cases
once with clock stamps (`sparse_attention_sm90(..., trace=...)`: each program's first ITEMS work
items, the first consumer warpgroup and the producer warp, SM clock cycles converted to us with
the clock rate measured against the global timer) and prints the median of each phase per work
item, by kept blocks per row. A development script (results go to BENCHMARKS.md).

Stamps, per (program, item): consumer 0 item start (Q ready and the item's index read), 1 kept
count known, 2 first K ready, 3 first S done, 4 last S issued (the loop over blocks done), 5 last
P V done, 6 output stored, 7 kept count, 12 the global timer at 0; producer 8 item decoded and
its kept count loaded, 9 Q buffer free (both consumers have copied the previous item's Q into
registers; before the eighteenth session: both past its last S), 10 all the item's K/V loads
issued.
"""

from __future__ import annotations

import argparse
import importlib
import json

import torch

from kernels.bench import bench_ms, cudnn_dense_ms, environment, sink_local_case
from kernels.flash_prefill import FlashPrefillConfig
from kernels.flash_prefill import sparse_attention_sm90 as sm90
from kernels.testing import random_pattern, random_qkv

ITEMS = 512
# (label, start stamp, end stamp, end on the next item): the consumer's phases, then the producer's.
PHASES = [
    ("item (start to next start)", 0, 0, True),
    ("kept count load", 0, 1, False),
    ("wait first K", 1, 2, False),
    ("first S", 2, 3, False),
    ("blocks 2..n (loop)", 3, 4, False),
    ("last P V", 4, 5, False),
    ("epilogue + store", 5, 6, False),
    ("wait next Q", 6, 0, True),
    ("producer: wait Q free", 8, 9, False),
    ("producer: issue K/V", 9, 10, False),
    ("producer: claim + decode + count", 10, 8, True),
    ("Q issued -> consumer sees Q", 9, 0, False),
]
BUCKETS = [(1, 1), (2, 4), (5, 16), (17, 10**9)]


def trace_case(mod, q, k, v, pattern, scale):
    programs = min(pattern.kv_num_blocks.numel(), sm90._sm_count(q.device.index))
    trace = torch.zeros(programs, ITEMS, 16, dtype=torch.int64, device=q.device)
    mod.sparse_attention_sm90(q, k, v, pattern.kv_num_blocks, pattern.kv_indices, scale, trace=trace)
    torch.cuda.synchronize()
    return trace.cpu()


def summarise(tr: torch.Tensor) -> dict:
    """Median us of each phase per kept-count bucket, over items whose stamps are all present."""
    valid = (tr[:, :, 0] > 0) & (tr[:, :, 6] > 0)
    # SM clock rate from the first and last traced item of each program: cycles / ns.
    rates = []
    for p in range(tr.shape[0]):
        ok = valid[p].nonzero().flatten()
        if len(ok) > 1:
            a, b = ok[0], ok[-1]
            rates.append((tr[p, b, 0] - tr[p, a, 0]).item() / max(1, (tr[p, b, 12] - tr[p, a, 12]).item()))
    ghz = float(torch.tensor(rates).median())
    out = {"clock_ghz": ghz, "buckets": {}}
    kept = tr[:, :, 7]
    for lo, hi in BUCKETS:
        rows = {}
        for label, a, b, nxt in PHASES:
            end = tr[:, 1:, b] if nxt else tr[:, :-1, b]
            start = tr[:, :-1, a]
            sel = valid[:, :-1] & (kept[:, :-1] >= lo) & (kept[:, :-1] <= hi) & (end > 0) & (start > 0)
            if nxt:
                sel &= valid[:, 1:]
            d = (end - start)[sel].double() / ghz / 1000.0
            if d.numel():
                rows[label] = {"median_us": float(d.median()), "p90_us": float(d.quantile(0.9)), "n": d.numel()}
        if rows:
            n = int(((kept >= lo) & (kept <= hi) & valid).sum())
            mean_kept = float(kept[(kept >= lo) & (kept <= hi) & valid].double().mean()) if n else 0.0
            out["buckets"][f"{lo}-{hi if hi < 10**9 else 'max'}"] = {"items": n, "mean_kept": mean_kept,
                                                                       "phases": rows}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[65536])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.0, 0.01, 0.02, 0.05, 0.10, 0.25])
    parser.add_argument("--selected", type=int, nargs="*", default=[],
                        help="lengths at which to time selected patterns (sink / local input)")
    parser.add_argument("--modules", nargs="+", default=[sm90.__name__])
    parser.add_argument("--trace", nargs="*", type=float, default=[0.0, 0.05], help="densities to trace")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the modules (median taken)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    mods = {name.rsplit(".", 1)[-1]: importlib.import_module(name) for name in args.modules}
    hq, h, d = 28, 4, 128
    scale = d**-0.5
    print(environment())
    results = {"environment": environment(), "modules": args.modules, "cases": []}
    table = []
    inputs = [(t, False) for t in args.tokens] + [(t, True) for t in args.selected]
    for t, selected in inputs:
        if selected:
            q, k, v, pattern = sink_local_case(t, hq, h, d, FlashPrefillConfig(alpha=0.1, min_seq_len=0))
            cases = [("selected (sink / local input)", None, pattern)]
        else:
            q, k, v = random_qkv(1, t, t, hq, h, d, dtype=torch.bfloat16, device="cuda")
            cases = [(f"random {dens:.0%}", dens, random_pattern(1, hq, t, 128, dens, "cuda", seed=2))
                     for dens in args.densities]
            shared = random_pattern(1, hq, t, 128, 0.05, "cuda", seed=3, group=hq // h)
            cases.append(("random 5%, shared by each KV group", 0.05, shared))
        cudnn = cudnn_dense_ms(q, k, v)
        for name, asked, pattern in cases:
            dens = pattern.density()
            row = {"tokens": t, "case": name, "density": dens, "cudnn_ms": cudnn}
            outs = {}
            for label, mod in mods.items():
                outs[label] = mod.sparse_attention_sm90(q, k, v, pattern.kv_num_blocks, pattern.kv_indices, scale)
            first = next(iter(outs))
            for label in outs:
                row[f"{label}_max_abs_vs_{first}"] = (outs[label].float() - outs[first].float()).abs().max().item()
            del outs
            times = {label: [] for label in mods}
            for _ in range(args.rounds):
                for label, mod in mods.items():
                    times[label].append(bench_ms(lambda m=mod, p=pattern, q=q, k=k, v=v: m.sparse_attention_sm90(
                        q, k, v, p.kv_num_blocks, p.kv_indices, scale)))
            for label in mods:
                row[f"{label}_ms"] = sorted(times[label])[len(times[label]) // 2]
                row[f"{label}_all_ms"] = times[label]
                row[f"{label}_ratio"] = row[f"{label}_ms"] / (dens * cudnn)
                if asked is not None and asked in args.trace and "shared" not in name:
                    row[f"{label}_trace"] = summarise(trace_case(mods[label], q, k, v, pattern, scale))
            results["cases"].append(row)
            table.append(row)
            print(json.dumps({key: val for key, val in row.items() if not key.endswith("_trace")}), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    for row in table:
        for label in mods:
            tr = row.get(f"{label}_trace")
            if not tr:
                continue
            print(f"\n## {label}, {row['tokens']} tokens, {row['case']} ({100 * row['density']:.2f}%), "
                  f"SM clock {tr['clock_ghz']:.2f} GHz")
            for bucket, info in tr["buckets"].items():
                print(f"kept {bucket}: {info['items']} items, mean kept {info['mean_kept']:.1f}")
                for phase, ph in info["phases"].items():
                    print(f"  {phase:36s} median {ph['median_us']:7.3f} us  p90 {ph['p90_us']:7.3f} us")
    for label, mod in mods.items():  # spills would show here (ptxas' count, per compiled variant)
        for entry in mod._sparse_attention_sm90_ws_kernel.device_caches.values():
            for kernel in entry[0].values():
                print(f"{label}: ws kernel registers {kernel.n_regs}, spilled {kernel.n_spills}")
    labels = list(mods)
    head = " | ".join(f"{lb} ms (ratio)" for lb in labels)
    print(f"\n| tokens | case | density | cuDNN ms | {head} | max abs diff |")
    print("|---|---|---|---|" + "---|" * (len(labels) + 1))
    for row in table:
        cells = " | ".join(f"{row[f'{lb}_ms']:.3f} ({row[f'{lb}_ratio']:.2f})" for lb in labels)
        diff = max(row[f"{lb}_max_abs_vs_{labels[0]}"] for lb in labels)
        print(f"| {row['tokens']} | {row['case']} | {100 * row['density']:.2f}% | {row['cudnn_ms']:.3f} | {cells} "
              f"| {diff:.3g} |")


if __name__ == "__main__":
    main()
