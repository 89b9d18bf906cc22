"""Captured decoding steps with their projections as Triton GEMVs (kernels.gemv, models.fused.
one_token_gemvs) on the Qwen2.5-VL-7B architecture (random bf16 weights, `videoprefill.bench.cold_qa`).

1. The launch settings of each of a step's GEMV launches (q, k and v in one; o; gate, up and the
   activation; down adding into the residual; the head), GPU time only (`gpu_graph_decode.graph_ms`),
   with the weights in L2 (one copy, called again and again) and cold (copies taken in turn),
   against what cuBLAS runs for the same (the three `F.linear`s; `F.linear`; two `F.linear`s and
   `kernels.activation.silu_mul`; `addmm_`; `F.linear`), and with the setting `kernels.gemv.config`
   picks, which part 2 runs.
2. Whole requests of `--video-tokens` (sparse at a fixed density, benchmark only), streamed to a
   callback, the ways alternated `--rounds` times: graph decoding as before ("cuBLAS"), with the
   GEMVs, with the GEMVs and the residual adds fused, and with the norms and adds inside the GEMVs
   (models.text.NORMS_IN_GEMVS). ms per decoding step over the answer,
   (total - TTFT) / (new tokens - 1); a graph's replay timed alone (a step's GPU time); the capture's
   host wall time (synchronised before and after: the capture alone); the TTFT;
   whether the token ids are those of the first way.
3. Numerics: the logits of one-token forwards (no cache), bf16 with cuBLAS, with the GEMVs and
   with the layers' norms and adds inside them, against the same model in fp32 (cuBLAS, TF32 off):
   relative error, and how often the top token is the fp32 model's.
4. (`--norm-launches`) The layer's norms and adds as launches of their own (`F.rms_norm`,
   `kernels.rms_norm.add_rms_norm`) against inside the GEMVs (`norm=`, `residual=`), GPU time of
   each group of launches, cold weights.

A development script (results go to BENCHMARKS.md):

    PYTHONPATH=$PWD python3 scripts/gpu_gemv_steps.py [--video-tokens 16384 131072] [--new-tokens 33]
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import statistics
import time

import torch
import torch.nn.functional as F
from gpu_graph_decode import (  # (this script's folder is on the path)
    decoding_parser,
    graph_ms,
    record_chosen_ids,
    timed_step_graphs,
)

import kernels.gemv as gemv_module
import models.decode as decode
import models.text as text
import videoprefill.pipeline as pipeline
from kernels.activation import silu_mul
from videoprefill.bench import cold_qa, markdown_table, synthetic_request

HIDDEN, WIDTH, KV, VOCAB = 3584, 18944, 512, 152064
SETTINGS = [(n, k, w) for n, k, w in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8)) if n * k <= 8192]
WAYS = {"cuBLAS": (False, False, False), "GEMV": (True, False, False), "GEMV, fused adds": (True, True, False),
        "GEMV, norms and adds inside": (True, True, True)}
STOCK_CONFIG = gemv_module.config


def launches(cold: bool):
    """(name, rows (config's first argument), K, our launch, cuBLAS's) of one decoding step's calls.
    cold: each weight in as many copies as make 100 MB or more, the calls taking them in turn, so
    that a call does not find its weights in the 50 MB L2 (as in a step, where 28 layers' weights
    pass between two calls of one projection)."""
    def t(*shape, scale=0.02):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale

    def copies(*shape):
        count = max(1, -(-100 * 2**20 // (2 * shape[0] * (shape[1] if len(shape) > 1 else 1)))) if cold else 1
        return [t(*shape) for _ in range(count)]

    def turns(fn, count):
        calls = itertools.count()
        return lambda: fn(next(calls) % count)

    x, h = t(1, HIDDEN, scale=1.0), t(1, WIDTH, scale=1.0)
    qkv = [copies(n, HIDDEN) for n in (HIDDEN, KV, KV)]
    n_qkv = len(qkv[0])
    qb, kb, vb = (t(n) for n in (HIDDEN, KV, KV))
    o, gate, up = copies(HIDDEN, HIDDEN), copies(WIDTH, HIDDEN), copies(WIDTH, HIDDEN)
    down, head = copies(HIDDEN, WIDTH), copies(VOCAB, HIDDEN)
    residual = t(1, HIDDEN, scale=1.0)
    return [
        ("q, k, v", HIDDEN + 2 * KV, HIDDEN,
         turns(lambda i: gemv_module.gemv(x, [(qkv[0][i], qb), (qkv[1][i], kb), (qkv[2][i], vb)]), n_qkv),
         turns(lambda i: (F.linear(x, qkv[0][i], qb), F.linear(x, qkv[1][i], kb), F.linear(x, qkv[2][i], vb)),
               n_qkv)),
        ("o", HIDDEN, HIDDEN, turns(lambda i: gemv_module.gemv(x, [(o[i], None)]), len(o)),
         turns(lambda i: F.linear(x, o[i]), len(o))),
        ("gate, up, activation", 2 * WIDTH, HIDDEN,
         turns(lambda i: gemv_module.gated_gemv(x, (gate[i], None), (up[i], None)), len(gate)),
         turns(lambda i: silu_mul(F.linear(x, gate[i]), F.linear(x, up[i])), len(gate))),
        ("down, added", HIDDEN, WIDTH,
         turns(lambda i: gemv_module.gemv(h, [(down[i], None)], add=True, out=[residual]), len(down)),
         turns(lambda i: residual.addmm_(h, down[i].t()), len(down))),
        ("head", VOCAB, HIDDEN, turns(lambda i: gemv_module.gemv(x, [(head[i], None)]), len(head)),
         turns(lambda i: F.linear(x, head[i]), len(head))),
    ]


def sweep(cold: bool) -> tuple[dict, list]:
    """The best setting per launch ({(rows, K): setting}) and the table's rows."""
    best, rows = {}, []
    for name, n, k, ours, cublas in launches(cold):
        default = STOCK_CONFIG(n, k, gated="gate" in name)
        times = {}
        for setting in SETTINGS:
            gemv_module.config = lambda rows, k, gated=False, s=setting: s
            times[setting] = graph_ms(ours)
        gemv_module.config = STOCK_CONFIG
        chosen = min(times, key=times.get)
        best[(n, k)] = chosen
        gb = (n * k + (n if "added" in name else 0)) * 2 / 1e9
        rows.append({"launch": name, "rows": n, "k": k, "cublas": graph_ms(cublas) * 1e3,
                     "default": times.get(default, float("nan")) * 1e3, "default_setting": str(default),
                     "best": times[chosen] * 1e3, "setting": str(chosen), "tbs": gb / times[chosen],
                     "weights": "cold" if cold else "in L2"})
        print(rows[-1], {str(k): round(v * 1e3, 1) for k, v in sorted(times.items(), key=lambda kv: kv[1])},
              flush=True)
    return best, rows


def numerics(model, count: int) -> str:
    """Part 3's table."""
    import copy

    from models.fused import one_token_gemvs

    assert not torch.backends.cuda.matmul.allow_tf32
    exact_model = copy.deepcopy(model).float()
    ids = torch.randint(0, VOCAB, (count, 1, 1), generator=torch.Generator().manual_seed(0)).cuda()
    ways = {"cuBLAS": (False, False), "GEMV": (True, False), "GEMV, norms and adds inside": (True, True)}
    errors, top = {way: [] for way in ways}, dict.fromkeys(ways, 0)
    with torch.inference_mode():
        for token in ids:
            exact = exact_model(input_ids=token).logits.double()
            for way, (gemv, inside) in ways.items():
                adds = text.fused_adds_at_every_length() if inside else contextlib.nullcontext()
                with one_token_gemvs(gemv), adds:
                    got = model(input_ids=token).logits.double()
                errors[way].append(((got - exact).norm() / exact.norm()).item())
                top[way] += int(got.argmax() == exact.argmax())
    del exact_model
    torch.cuda.empty_cache()
    rows = [{"way": way, "median": statistics.median(errors[way]), "max": max(errors[way]),
             "top": f"{top[way]} of {count}"} for way in errors]
    return markdown_table(rows, [("bf16 way", "way", "s"), ("relative error of the logits (median)", "median", ".2e"),
                                 ("(max)", "max", ".2e"), ("top token as fp32", "top", "s")])


def use(qa, way: str) -> None:
    gemv, adds, inside = WAYS[way]
    qa.graph_decode = True
    pipeline.graph_decoding = functools.partial(decode.graph_decoding, gemv=None if gemv else False)
    decode.FUSED_ADDS_WITH_GEMVS = adds
    text.NORMS_IN_GEMVS = inside


def norm_launches() -> str:
    """Part 4's table: a layer's norms and adds around its GEMVs as launches of their own, and inside
    them; cold weights (copies taken in turn, as `launches(cold=True)`)."""
    from kernels.rms_norm import add_rms_norm

    def t(*shape, scale=0.02):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale

    def copies(*shape):
        return [t(*shape) for _ in range(max(1, -(-100 * 2**20 // (2 * shape[0] * shape[1]))))]

    x, residual, attn = t(1, HIDDEN, scale=1.0), t(1, HIDDEN, scale=1.0), t(1, HIDDEN, scale=1.0)
    g1, g2, gf = (t(HIDDEN, scale=0.1) + 1 for _ in range(3))
    eps = 1e-6
    q, k, v = copies(HIDDEN, HIDDEN), copies(KV, HIDDEN), copies(KV, HIDDEN)
    o, gate, up, head = copies(HIDDEN, HIDDEN), copies(WIDTH, HIDDEN), copies(WIDTH, HIDDEN), copies(VOCAB, HIDDEN)
    qb, kb, vb = t(HIDDEN), t(KV), t(KV)
    count = itertools.count()

    def qkv(i, norm):
        parts = [(q[i % len(q)], qb), (k[i % len(k)], kb), (v[i % len(v)], vb)]
        if norm:
            return gemv_module.gemv(x, parts, norm=(g1, eps))
        return gemv_module.gemv(F.rms_norm(x, (HIDDEN,), g1, eps), parts)

    def o_mlp(i, inside):
        j = i % len(gate)
        if inside:
            total = gemv_module.gemv(attn, [(o[i % len(o)], None)], residual=[residual])[0]
            return gemv_module.gated_gemv(total, (gate[j], None), (up[j], None), norm=(g2, eps))
        y = gemv_module.gemv(attn, [(o[i % len(o)], None)])[0]
        _, normed = add_rms_norm(residual, y, g2, eps)
        return gemv_module.gated_gemv(normed, (gate[j], None), (up[j], None))

    def final(i, norm):
        w = head[i % len(head)]
        if norm:
            return gemv_module.gemv(x, [(w, None)], norm=(gf, eps))
        return gemv_module.gemv(F.rms_norm(x, (HIDDEN,), gf, eps), [(w, None)])

    rows = []
    for name, fn in (("input norm; q, k, v", qkv), ("o; residual add, post-attention norm; gate, up", o_mlp),
                     ("final norm; head", final)):
        apart = graph_ms(lambda fn=fn: fn(next(count), False))
        inside = graph_ms(lambda fn=fn: fn(next(count), True))
        rows.append({"launches": name, "apart": apart * 1e3, "inside": inside * 1e3, "saved": (apart - inside) * 1e3})
        print(rows[-1], flush=True)
    return markdown_table(rows, [("launches", "launches", "s"), ("norms and adds apart us", "apart", ".1f"),
                                 ("inside the GEMVs us", "inside", ".1f"), ("less us", "saved", ".1f")])


def main() -> None:
    parser = decoding_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-sweep", action="store_true", help="skip part 1")
    parser.add_argument("--sweep-only", action="store_true", help="part 1 alone")
    parser.add_argument("--tokens-checked", type=int, default=16, help="one-token forwards in part 3 (0: skip it)")
    parser.add_argument("--norm-launches", action="store_true", help="part 4 first")
    args = parser.parse_args()
    if args.norm_launches:
        print(norm_launches(), flush=True)

    from kernels import FlashPrefillConfig

    if not args.no_sweep:
        table = sweep(cold=False)[1] + sweep(cold=True)[1]
        print(markdown_table(table, [
            ("launch", "launch", "s"), ("weights", "weights", "s"), ("weight rows", "rows", "d"), ("K", "k", "d"),
            ("cuBLAS us", "cublas", ".1f"),
            ("GEMV us, config()", "default", ".1f"), ("config() setting", "default_setting", "s"),
            ("GEMV us, best", "best", ".1f"), ("best (BLOCK_N, BLOCK_K, warps)", "setting", "s"),
            ("best TB/s", "tbs", ".2f")]), flush=True)
        if args.sweep_only:
            return

    qa = cold_qa()
    if args.tokens_checked:
        print(numerics(qa.model, args.tokens_checked), flush=True)
    made, chosen, replay_ms, capture_ms = [], {}, [], []

    class Counted(timed_step_graphs(made, replay_ms)):
        """Also the host's wall time of each capture (the GPU synchronised before and after)."""

        def _capture(self):
            torch.cuda.synchronize()
            start = time.perf_counter()
            super()._capture()
            torch.cuda.synchronize()
            capture_ms.append(1e3 * (time.perf_counter() - start))

    decode.StepGraphs = Counted
    record_chosen_ids(chosen)
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    rows = []
    for tokens in args.video_tokens:
        prepared = synthetic_request(qa, tokens)
        steps, ttft, replays, captures, ids = ({way: [] for way in WAYS} for _ in range(5))
        for r in range(args.rounds + 1):  # (round 0 untimed)
            for way in WAYS:
                use(qa, way)
                made.clear()
                replay_ms.clear()
                capture_ms.clear()
                answer = qa.run(prepared, "sparse", max_new_tokens=args.new_tokens, config=config,
                                fixed_density=args.fixed_density, on_text=lambda text, _: None)
                assert answer.new_tokens == args.new_tokens, "the request ended early"
                t = answer.timings
                ids[way] = chosen["ids"]
                if r:
                    steps[way].append(1e3 * (t["total_s"] - t["ttft_s"]) / (args.new_tokens - 1))
                    ttft[way].append(t["ttft_s"])
                    replays[way].append(replay_ms[-1] if replay_ms else float("nan"))
                    captures[way].append(capture_ms[-1] if capture_ms else float("nan"))
        for way in WAYS:
            rows.append({"tokens": tokens, "way": way, "ms": statistics.median(steps[way]),
                         "all": ", ".join(f"{v:.2f}" for v in steps[way]), "replay": statistics.median(replays[way]),
                         "capture": statistics.median(captures[way]),
                         "ttft": statistics.median(ttft[way]), "same": str(ids[way] == ids["cuBLAS"])})
            print(rows[-1], flush=True)
    use(qa, "GEMV, norms and adds inside")
    print(markdown_table(rows, [
        ("video tokens", "tokens", "d"), ("way", "way", "s"), ("ms/step (median)", "ms", ".2f"),
        ("ms/step (rounds)", "all", "s"), ("replay alone ms (GPU)", "replay", ".3f"),
        ("capture ms (host wall)", "capture", ".1f"), ("TTFT s", "ttft", ".3f"),
        ("ids as cuBLAS", "same", "s")]))


if __name__ == "__main__":
    main()
