"""On the GPU: where the language model's prefill time goes (Qwen2.5-VL-7B architecture, random weights).

`python3 scripts/gpu_llm_profile.py [--video-tokens 131072] [--density 0.05] [--order stock prepared]
[--no-accuracy] [--out DIR]`: the
language model's forward on a synthetic video request of that many video tokens (its inputs
captured from the whole model's forward, so the vision tower runs once), with its RMSNorms and
MLP activations as transformers runs them and as models.text prepares them, for dense attention
and for FlashPrefill at a fixed density (benchmark only, as `videoprefill.bench --fixed-density`).
Each is warmed up once and timed `--repeats` times (the fastest kept, synchronised host clock),
the variants in `--order`; with nvidia-ml-py installed, the GPU's SM clock and power are sampled
every 5 ms during the kept run.
Then a torch.profiler table of the top GPU kernels of each variant at the fixed density, the two
variants' outputs against each other, and at `--accuracy-tokens` both against the language
model run in fp32 (dense attention). A development script (results go to BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import sys
import time
from pathlib import Path

import torch

from kernels import FlashPrefillConfig
from models.attention import RequestSettings, request_settings, set_attention
from models.text import prepare_language_model
from videoprefill.bench import build_7b, synthetic_request
from videoprefill.pipeline import VideoQA


class _Captured(Exception):
    pass


def language_model_inputs(model, inputs) -> dict:
    """The keyword arguments the whole model's forward passes to its language model."""
    lm = model.model.language_model
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)
        raise _Captured

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=False, logits_to_keep=1)
    except _Captured:
        pass
    finally:
        handle.remove()
    seen["use_cache"] = False
    seen.pop("past_key_values", None)
    seen.pop("cache", None)
    return seen


def forward(model, kwargs, mode: str, density: float | None, config) -> torch.Tensor:
    set_attention(model, mode)
    settings = RequestSettings(config=config, fixed_density=density if mode == "sparse" else None)
    with torch.inference_mode(), request_settings(settings):
        return model.model.language_model(**kwargs).last_hidden_state


class ClockSampler:
    """The SM clock (MHz) and power (W) of the current GPU sampled every 5 ms on a thread, while
    in the `with` block (NVML, from nvidia-ml-py; nothing sampled without it)."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:  # no nvidia-ml-py, or no NVML on this machine
            self._nvml = None
        self.samples: list[tuple[float, float]] = []

    def __enter__(self):
        import threading

        self.samples = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while self._nvml is not None and not self._stop.wait(0.005):
            clock = self._nvml.nvmlDeviceGetClockInfo(self._handle, self._nvml.NVML_CLOCK_SM)
            self.samples.append((clock, self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        clocks, watts = zip(*self.samples)
        return {"sm_clock_mhz_mean": sum(clocks) / len(clocks), "sm_clock_mhz_min": min(clocks),
                "power_w_mean": sum(watts) / len(watts), "samples": len(clocks)}


def timed(model, kwargs, mode, density, config, repeats, sampler=None) -> tuple[float, torch.Tensor, dict]:
    forward(model, kwargs, mode, density, config)  # warm-up
    best, clocks = float("inf"), {}
    sampler = sampler or ClockSampler()
    for _ in range(repeats):
        torch.cuda.synchronize()
        with sampler:
            start = time.perf_counter()
            out = forward(model, kwargs, mode, density, config)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        if seconds < best:
            best, clocks = seconds, sampler.summary()
    return best, out, clocks


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def accuracy(model, qa, config, tokens: int) -> tuple[int, dict]:
    """Both variants against the language model in fp32 (dense attention; no TF32) at a shorter
    length: (the tokens, {variant: relative L2 error of the final hidden states})."""
    small = language_model_inputs(model, synthetic_request(qa, tokens).inputs)
    outputs = {}
    for variant in ("stock", "prepared"):
        prepare_language_model(model, enabled=variant == "prepared")
        outputs[variant] = forward(model, small, "dense", None, config).double()
    prepare_language_model(model, enabled=False)
    lm32 = copy.deepcopy(model.model.language_model).float()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    small32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in small.items()}
    set_attention(model, "dense")
    with torch.inference_mode():
        exact = lm32(**small32).last_hidden_state.double()
    return int(small["inputs_embeds"].shape[1]), {v: relative(outputs[v], exact) for v in outputs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video-tokens", type=int, default=131072)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--accuracy-tokens", type=int, default=16384)
    parser.add_argument("--order", nargs=2, default=["stock", "prepared"], choices=["stock", "prepared"],
                        help="the order the two variants are timed and profiled in")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the fp32 comparison")
    parser.add_argument("--out", help="folder for results.json, the profiler tables and transformers' source")
    args = parser.parse_args()
    if len(set(args.order)) != 2:
        parser.error("--order names each variant once")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    model, processor = build_7b()
    qa = VideoQA(model, processor, mask_layers=(), warmup=False)
    config = FlashPrefillConfig.for_model("qwen2.5-vl")
    modeling = sys.modules[type(model).__module__]
    if out:  # what the installed transformers runs in a language-model layer
        names = ("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLAttention", "Qwen2_5_VLRMSNorm", "Qwen2_5_VLRotaryEmbedding",
                 "Qwen2MLP", "Qwen2_5_VLMLP", "apply_rotary_pos_emb", "apply_multimodal_rotary_pos_emb")
        parts = [getattr(modeling, n) for n in names if hasattr(modeling, n)]
        (out / "transformers_source.py").write_text("\n\n".join(inspect.getsource(p) for p in parts))
    result: dict = {"density": args.density}
    kwargs = language_model_inputs(model, synthetic_request(qa, args.video_tokens).inputs)
    result["tokens"] = int(kwargs["inputs_embeds"].shape[1])
    result["order"] = args.order
    outputs = {}
    sampler = ClockSampler()
    for variant in args.order:
        prepare_language_model(model, enabled=variant == "prepared")
        for mode in ("sparse", "dense"):
            seconds, outputs[variant, mode], clocks = timed(model, kwargs, mode, args.density, config, args.repeats,
                                                            sampler)
            result[f"{variant}_{mode}_s"] = seconds
            result[f"{variant}_{mode}_clocks"] = clocks
            print(f"{variant:9s} {mode:6s} {seconds:.3f} s {clocks}", flush=True)
        peak = torch.cuda.max_memory_allocated() / 2**30
        result[f"{variant}_peak_gib"] = peak
        torch.cuda.reset_peak_memory_stats()
    for mode in ("sparse", "dense"):
        result[f"{mode}_prepared_vs_stock"] = relative(outputs["prepared", mode], outputs["stock", mode])
    outputs.clear()
    tables = {}
    for variant in args.order:
        prepare_language_model(model, enabled=variant == "prepared")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof, sampler:
            forward(model, kwargs, "sparse", args.density, config)
            torch.cuda.synchronize()
        result[f"{variant}_profiled_clocks"] = sampler.summary()
        tables[variant] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=22,
                                                    max_name_column_width=60)
        if out:
            (out / f"kernels_{variant}.txt").write_text(tables[variant])
    # The PyTorch operators behind the kernels (prepared variant), with their input shapes.
    prepare_language_model(model)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        forward(model, kwargs, "sparse", args.density, config)
        torch.cuda.synchronize()
    tables["operators"] = prof.key_averages(group_by_input_shape=True).table(
        sort_by="cuda_time_total", row_limit=30, max_name_column_width=40, max_shapes_column_width=70)
    if out:
        (out / "operators_prepared.txt").write_text(tables["operators"])
    del kwargs
    torch.cuda.empty_cache()
    if not args.no_accuracy:
        result["accuracy_tokens"], result["relative_error_to_fp32"] = accuracy(model, qa, config, args.accuracy_tokens)
    prepare_language_model(model)
    if out:
        (out / "results.json").write_text(json.dumps(result, indent=1))
    for variant in (*args.order, "operators"):
        print(f"--- top GPU kernels / operators, {variant}, sparse at fixed {args.density:.0%}")
        print(tables[variant])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
