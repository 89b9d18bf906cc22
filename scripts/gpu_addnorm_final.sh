#!/usr/bin/env bash
# On the GPU machine (thirteenth and fourteenth sessions). STAGES picks from: cuda (every CUDA test),
# kernels (the Triton kernels' own tests), towers (both towers' tests), second-half (a block's
# second half with and without the fused adds, scripts/gpu_mlp_residual.py), warmup (first requests
# of fresh processes, scripts/gpu_warmup.py), bench (the end-to-end prefill bench at 128K video
# tokens), file (whole requests from the test file), down (the down projection adding into its
# residual, scripts/gpu_down_accumulate.py; fourteenth session), crossover (the language model's
# fused adds against stock by length, and the SM clock under each, scripts/gpu_adds_crossover.py;
# fourteenth session), decode-steps (time per decoding step over long prompts,
# scripts/gpu_decode_steps.py; fourteenth session); fifteenth session: short-prefill (dense prefill
# attention below min_seq_len by way and length, scripts/gpu_short_prefill.py), one-token (the fused
# elementwise ops' host time at decoding lengths, scripts/gpu_one_token_ops.py), fused-ab (decoding
# steps with the fused language model against the stock one, gpu_decode_steps.py --fused-ab),
# short-videos (first questions under min_seq_len, Hopper kernel against SDPA, gpu_short_videos.py),
# step-listing (a decoding step's host time per function, gpu_decode_steps.py --step-listing);
# sixteenth session: launch-host (the Hopper kernel call's host time by piece, gpu_launch_host.py; since the
# nineteenth session with Triton's launch against the direct one),
# flash-tests (FlashPrefill's tests, the mean correction's included, on the GPU), mean-correction
# (its cost and error by pattern, gpu_mean_correction.py), bench-mc (the 128K bench with its rows);
# eighteenth session: trace-ab (gpu_trace_sm90.py, the kernel against a copy of its earlier version in
# kernels/flash_prefill/_sm90_before.py); nineteenth session: launch-ab (kernels.bench at --lengths, 4K by
# default, with every kernel through Triton's launch, then launched directly: kernels.runtime.DIRECT_LAUNCH),
# pdl-ab (the same bench with the index build as two plain launches, then as a programmatic dependent
# launch of the block means: kernels.flash_prefill.pattern.PDL).
# Run 6 ran `cuda kernels second-half warmup bench`, run 7 `cuda towers second-half bench file` (then as scripts/gpu_layer_adds.sh). Needs .whl
# and .bench_media (carried).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export FORCE_QWENVL_VIDEO_READER=decord
quiet() { grep -v "Loading weights\|cap_pixels"; }
for stage in ${STAGES:-cuda kernels towers second-half warmup bench file}; do
  case $stage in
    cuda) timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 \
            | tee "$OUT/pytest_cuda.log" | tail -2 ;;
    kernels) timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_window_attention.py \
            tests/kernels/test_rms_norm.py tests/kernels/test_activation.py 2>&1 | tee "$OUT/pytest_kernels.log" | tail -2 ;;
    towers) timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_rms_norm.py \
            tests/models/test_text.py tests/models/test_vision.py 2>&1 | tee "$OUT/pytest_towers.log" | tail -2 ;;
    down) timeout ${KERNEL_TIMEOUT:-120} python3 scripts/gpu_down_accumulate.py 2>&1 | tee "$OUT/down.txt" ;;
    crossover) timeout ${KERNEL_TIMEOUT:-120} python3 scripts/gpu_adds_crossover.py --clocks 2>&1 \
            | tee "$OUT/crossover.txt" ;;
    decode-steps) timeout ${E2E_TIMEOUT:-240} python3 scripts/gpu_decode_steps.py 2>&1 | quiet \
            | tee "$OUT/decode_steps.txt" | grep "^|\|GPU kernels" ;;
    short-prefill) timeout ${KERNEL_TIMEOUT:-120} python3 scripts/gpu_short_prefill.py ${SHORT_PREFILL_ARGS:-} 2>&1 \
            | tee "$OUT/short_prefill.txt" ;;
    flash-tests) timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_mean_correction.py \
            tests/kernels/test_flash_prefill.py tests/kernels/test_config.py 2>&1 | tee "$OUT/pytest_flash.log" | tail -2 ;;
    mean-correction) timeout ${KERNEL_TIMEOUT:-200} python3 scripts/gpu_mean_correction.py 2>&1 \
            | tee "$OUT/mean_correction.txt" | grep "^|" ;;
    bench-mc) timeout ${E2E_TIMEOUT:-240} python3 -m videoprefill.bench prefill --video-tokens 131072 --repeats 1 \
            --fixed-density 0.05 --mean-correction --json "$OUT/e2e_mc.json" 2>&1 | quiet | tee "$OUT/e2e_mc.txt" \
            | grep "^|" ;;
    trace-ab) timeout ${KERNEL_TIMEOUT:-420} python3 scripts/gpu_trace_sm90.py ${TRACE_AB_ARGS:---tokens 65536 131072 \
            --densities 0.0 0.01 0.02 0.05 0.1 --trace 0.01 --selected 16384 65536 131072} \
            --modules kernels.flash_prefill._sm90_before kernels.flash_prefill.sparse_attention_sm90 \
            --json "$OUT/trace_ab.json" 2>&1 | tee "$OUT/trace_ab.txt" | grep "^|\|^## \|spilled\|^kept\|  item\|  blocks\|  first S" ;;
    launch-ab) for direct in False True; do
            timeout ${KERNEL_TIMEOUT:-200} python3 -c "import sys; from kernels import bench, runtime
runtime.DIRECT_LAUNCH = $direct; sys.exit(bench.main(sys.argv[1:]))" ${LAUNCH_AB_ARGS:---lengths 4096 --no-flex} \
            --json "$OUT/launch_ab_$direct.json" 2>&1 | tee "$OUT/launch_ab_$direct.txt" | grep "^|"; done ;;
    pdl-ab) for pdl in False True; do
            timeout ${KERNEL_TIMEOUT:-200} python3 -c "import sys; from kernels import bench
from kernels.flash_prefill import pattern
pattern.PDL = $pdl; sys.exit(bench.main(sys.argv[1:]))" ${PDL_AB_ARGS:---lengths 4096 16384 65536 --no-flex} \
            --json "$OUT/pdl_ab_$pdl.json" 2>&1 | tee "$OUT/pdl_ab_$pdl.txt" | grep "^|"; done ;;
    launch-host) timeout ${KERNEL_TIMEOUT:-120} python3 scripts/gpu_launch_host.py 2>&1 | tee "$OUT/launch_host.txt" ;;
    one-token) timeout ${KERNEL_TIMEOUT:-120} python3 scripts/gpu_one_token_ops.py 2>&1 | grep -v "Loading weights" \
            | tee "$OUT/one_token.txt" ;;
    fused-ab) timeout ${E2E_TIMEOUT:-240} python3 scripts/gpu_decode_steps.py --fused-ab 16384 2>&1 | quiet \
            | tee "$OUT/fused_ab.txt" | grep "^|" ;;
    short-videos) timeout ${E2E_TIMEOUT:-240} python3 scripts/gpu_short_videos.py 2>&1 | quiet \
            | tee "$OUT/short_videos.txt" | grep "^|" ;;
    step-listing) timeout ${E2E_TIMEOUT:-240} python3 scripts/gpu_decode_steps.py --step-listing 16384 2>&1 | quiet \
            | tee "$OUT/step_listing.txt" | head -30 ;;
    second-half) timeout ${KERNEL_TIMEOUT:-90} python3 scripts/gpu_mlp_residual.py 2>&1 | tee "$OUT/second_half.txt" ;;
    warmup) timeout ${WARMUP_TIMEOUT:-200} python3 scripts/gpu_warmup.py .bench_media/long_640x360_520s.mp4 \
            --max-pixels 200704 --fixed-density 0.05 --processes sample sample 2>&1 | quiet | tee "$OUT/warmup.txt" \
            | grep "^|" ;;
    bench) timeout ${E2E_TIMEOUT:-150} python3 -m videoprefill.bench prefill --video-tokens 131072 --repeats 1 \
            --fixed-density 0.05 --json "$OUT/e2e.json" 2>&1 | quiet | tee "$OUT/e2e.txt" | grep "^|" ;;
    file) timeout ${FILE_TIMEOUT:-150} python3 scripts/gpu_prefix_from_file.py .bench_media/long_640x360_520s.mp4 \
            --max-pixels 200704 --fixed-density 0.05 2>&1 | quiet | tee "$OUT/from_file.txt" | grep "^|" ;;
  esac
done
