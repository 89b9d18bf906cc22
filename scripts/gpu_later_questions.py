"""Later questions over a kept video prefix with the language model's fused residual adds allowed
(models.text.FUSED_ADDS_MIN_TOKENS as kept) and not (every layer stock), alternating, on the
Qwen2.5-VL-7B architecture (random bf16 weights): whether the patched layers cost a short call
anything. One untimed first question; then per repeat a later question each way.

    PYTHONPATH=$PWD python3 scripts/gpu_later_questions.py VIDEO --max-pixels 200704 --fixed-density 0.05
"""

from __future__ import annotations

import argparse
import statistics


def main() -> int:
    from videoprefill.bench import add_file_arguments, file_sampling

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_file_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import models.text as text
    from kernels import FlashPrefillConfig
    from videoprefill.bench import build_7b
    from videoprefill.pipeline import VideoQA

    model, processor = build_7b()
    qa = VideoQA(model, processor, mask_layers=(), warmup=True)
    sampling = file_sampling(args)
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    kept = text.FUSED_ADDS_MIN_TOKENS

    def ask(question):
        answer = qa.run(qa.prepare(args.video, question, sampling), "sparse", max_new_tokens=2, config=config,
                        fixed_density=args.fixed_density)
        return answer.tokens["cached"], answer.timings["prefill_s"], answer.timings["ttft_s"]

    ask("Describe this video.")
    times = {"fused adds allowed": [], "stock layers": []}
    for n in range(args.repeats):
        for way, threshold in (("fused adds allowed", kept), ("stock layers", 10**12)):
            text.FUSED_ADDS_MIN_TOKENS = threshold
            cached, prefill, ttft = ask(f"What happens at second {n}?")
            assert cached > 0
            times[way].append((prefill, ttft))
    text.FUSED_ADDS_MIN_TOKENS = kept
    for way, rows in times.items():
        print(f"{way}: LLM prefill median {statistics.median(r[0] for r in rows):.4f} s, TTFT median "
              f"{statistics.median(r[1] for r in rows):.4f} s over {len(rows)} later questions "
              f"({', '.join(f'{r[1]:.3f}' for r in rows)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
