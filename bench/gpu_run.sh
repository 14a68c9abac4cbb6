#!/usr/bin/env bash
# Run GPU benches in one go on a CUDA machine: bash bench/gpu_run.sh STAGE [STAGE ...]
# Stages: env install tests gpu_tests decode expression expression_bf16 dit_step dit_step_full alpa realtime stream
# stream_long stream_aiortc_client stream_aiortc_both stream_baseline parallel load_memory
# tests14 dit14 stream14 stream14_24g stream14_baseline (issue 14: the published 14B model live on one GPU).
# Wheels in .whl0/ and .whl/ (aiortc, av, mediapipe, numpy<2, ...: more than one call's 64 MiB, so they may come in
# two calls to the same warm machine) are installed into /tmp/site.whl0 and /tmp/site.whl; the driving video
# is read from $FLASHLIVE_VIDEO (default .devdata/lp_d3.mp4 or ../shared/data/driving/lp_d3.mp4).
# Stage `install` only installs the wheels. `stream_baseline` runs today's stream bench against an older checkout
# exported to .baseline/ (git archive), with aiortc's stock client jitter buffer as that checkout's bench had, on the
# same machine: a before/after measured in one run; `stream_aiortc_client` runs today's server with that client,
# `stream_aiortc_both` also with aiortc's stock buffer on the server side (an A/B of streaming/jitter.py).
# Issue 14 stages (one H200; random weights, 512x512, lp_d3 at 25 fps, guidance at its default 4):
#   tests14             the issue's CPU tests plus their CUDA cases (one graph pool for the pair and single steps)
#   dit14               bench/dit_step.py --live14: bf16 pair, FP8 pair, FP8 expression branch alone, the guidance
#                       economy (cost and error): dit_step_14b_live_<gpu>.json. ~4-5 min: three 14b engines' worth of
#                       compiles (bf16 pair; FP8 pair + FP8 single), each ~60-90 s cold.
#   stream14            the live 14b stream (FP8 auto-on, guidance economy auto refresh 4): stream_latency_fp_14b_<gpu>
#   stream14_24g        the same with --low-vram (the 24 GB mode): ..._14b_<gpu>_24g.json, peak_gpu_gib <= 24
#   stream14_baseline   the same bench against the checkout exported to .baseline/ (git archive of main before issue
#                       14; it has no --fp8 / --low-vram / --emo-refresh): ..._14b_<gpu>_baseline.json. Set
#                       FLASHLIVE_BASELINE_COMMIT to its commit (the result's env.git_commit).
#                       BASELINE_TAG is appended to its name (..._baseline<TAG>.json).
#   A 14b server's warm-up: random init of the 14B DiT on the GPU (~5-10 s) + CLIP / VAE / encoders (~5 s) + one
#   compiled block per step shape (FP8 pair and FP8 single: ~60-90 s each cold, a few seconds from this machine's
#   Inductor cache once an earlier stage compiled the same graph) + CUDA graph capture (~5 s) + the warm start's
#   rehearsal of a few live windows (~1 s): ~2.5-3.5 min cold, ~1 min warm; then 23 s of stream and ~10 s to close.
#   The stage prints the measured warm-up ("warm after").
# Results go to bench/results/ and, where $OUT is set, a tarball of them to $OUT.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
SITES=""
for dir in .whl0 .whl; do
  site=/tmp/site$dir  # outside the repo copy: kept while the machine stays warm
  if ls $dir/*.whl >/dev/null 2>&1 && [ ! -f $site/.done ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $site $dir/*.whl \
      && touch $site/.done || echo "wheel install from $dir failed"
  fi
  [ -f $site/.done ] && SITES="$SITES$site:"
done
export PYTHONPATH=$SITES$PWD
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o 'H[0-9]*' | tr A-Z a-z)
GPU=${GPU:-gpu}  # result names say which card: h100, h200
echo "PYTHONPATH=$PYTHONPATH"
# the tests read ../shared/data; only the driving videos travel (in .devdata)
if [ ! -d ../shared/data ] && ls .devdata/*.mp4 >/dev/null 2>&1; then
  mkdir -p ../shared/data/driving && cp .devdata/*.mp4 ../shared/data/driving/
fi
VIDEO=${FLASHLIVE_VIDEO:-.devdata/lp_d3.mp4}
[ -f "$VIDEO" ] || VIDEO=../shared/data/driving/lp_d3.mp4
LOG=${OUT:-/tmp}/gpu_run.log

stage() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T), limit ${secs}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$secs" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
  tail -n 25 "$LOG" | grep -vE '^\s*$' | tail -n 12
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/results.tgz" bench/results; fi
}

today_bench_into_baseline() {  # today's metrics against the old server: the bench and its frame stamps
  mkdir -p .baseline/bench .baseline/tests
  cp bench/stream_latency.py bench/common.py .baseline/bench/ && cp tests/avatar_probe.py .baseline/tests/
}

for s in "$@"; do
  case $s in
    env) stage env 120 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "
import torch, triton, numpy; print(torch.__version__, triton.__version__, numpy.__version__, torch.cuda.get_device_name())
for m in (\"aiortc\", \"av\", \"mediapipe\", \"cv2\", \"pynvml\", \"onnxruntime\"):
    try: __import__(m); print(m, \"ok\")
    except Exception as e: print(m, \"MISSING\", type(e).__name__, e)
"' ;;
    tests) stage tests 420 python3 -m pytest -q -x tests/test_graphs.py tests/test_kernels.py tests/test_dit.py tests/test_nfeb.py ;;
    decode) stage decode 300 python3 bench/decode.py ;;
    expression) stage expression 240 python3 bench/expression.py --device cuda --video "$VIDEO" ;;
    dit_step) stage dit_step 560 python3 bench/dit_step.py --quick ;;
    dit_step_full) stage dit_step_full 580 python3 bench/dit_step.py --presets 1.3b,14b --frames 3,6,21 --no-profile ;;
    alpa) stage alpa 500 python3 bench/alpa_quality.py ;;
    realtime) stage realtime 500 python3 bench/realtime.py --video "$VIDEO" ;;
    install) echo "wheel sites: $SITES" ;;
    stream) stage stream 300 python3 bench/stream_latency.py --renderer flashportrait --driving "$VIDEO" \
        --server-args "--preset 1.3b --random-weights" --seconds 20 --name stream_latency_fp_1.3b_$GPU ;;
    stream_long) stage stream_long 300 python3 bench/stream_latency.py --renderer flashportrait --driving "$VIDEO" \
        --server-args "--preset 1.3b --random-weights" --seconds 90 --name stream_latency_fp_1.3b_${GPU}_90s ;;
    stream_aiortc_client) stage stream_aiortc_client 300 python3 bench/stream_latency.py --renderer flashportrait \
        --driving "$VIDEO" --server-args "--preset 1.3b --random-weights" --seconds 20 --client-jitter-buffer aiortc \
        --name stream_latency_fp_1.3b_${GPU}_aiortc_client ;;
    stream_aiortc_both) stage stream_aiortc_both 300 python3 bench/stream_latency.py --renderer flashportrait \
        --driving "$VIDEO" --server-args "--preset 1.3b --random-weights" --seconds 20 --client-jitter-buffer aiortc \
        --server-jitter-buffer aiortc --name stream_latency_fp_1.3b_${GPU}_aiortc_both ;;
    stream_baseline) today_bench_into_baseline
      stage stream_baseline 300 bash -c "cd .baseline && PYTHONPATH=$SITES$PWD/.baseline \
        python3 bench/stream_latency.py --renderer flashportrait --driving ../$VIDEO --client-jitter-buffer aiortc \
        --server-args '--preset 1.3b --random-weights' --seconds 20 --name stream_latency_fp_1.3b_${GPU}_baseline \
        && cp bench/results/stream_latency_fp_1.3b_${GPU}_baseline.* ../bench/results/" ;;
    gpu_tests) stage gpu_tests 300 python3 -m pytest -q -rs tests/test_pdfgc_extractor.py tests/test_graphs.py -k cuda ;;
    expression_bf16) stage expression_bf16 240 python3 bench/expression.py --device cuda --dtype bf16 --video "$VIDEO" \
        --name expression_cuda_bf16_$GPU ;;
    tests14) stage tests14 300 python3 -m pytest -q -rs tests/test_guidance_economy.py tests/test_fp8_live.py \
        tests/test_low_vram.py tests/test_graphs.py ;;
    dit14) echo "dit14: expect ~4-5 min (3 cold 14b compiles)"
      stage dit14 540 python3 bench/dit_step.py --live14 ;;
    stream14) echo "stream14: expect warm-up ~2.5-3.5 min cold (~1 min with a warm Inductor cache) + 23 s stream"
      stage stream14 400 python3 bench/stream_latency.py --renderer flashportrait --driving "$VIDEO" \
        --server-args "--preset 14b --random-weights" --seconds 23 --name stream_latency_fp_14b_$GPU ;;
    stream14_24g) echo "stream14_24g: expect warm-up ~1 min after stream14 (same graphs, cached), ~3 min cold"
      stage stream14_24g 400 python3 bench/stream_latency.py --renderer flashportrait --driving "$VIDEO" \
        --server-args "--preset 14b --random-weights --low-vram" --seconds 23 --name stream_latency_fp_14b_${GPU}_24g ;;
    stream14_baseline) echo "stream14_baseline: the old server (bf16 pair, fp32 init of 14B): expect ~2-3 min warm-up"
      today_bench_into_baseline
      stage stream14_baseline 400 bash -c "cd .baseline && PYTHONPATH=$SITES$PWD/.baseline \
        FLASHLIVE_COMMIT=${FLASHLIVE_BASELINE_COMMIT:-baseline} python3 bench/stream_latency.py \
        --renderer flashportrait --driving $(realpath "$VIDEO") --server-args '--preset 14b --random-weights' --seconds 23 \
        --name stream_latency_fp_14b_${GPU}_baseline${BASELINE_TAG:-} && cp bench/results/stream_latency_fp_14b_${GPU}_baseline${BASELINE_TAG:-}.* \
        ../bench/results/" ;;
    parallel) stage parallel 400 torchrun --standalone --nproc_per_node "$(nvidia-smi -L | wc -l)" bench/dit_parallel.py --preset 14b ;;
    load_memory) stage load_memory 400 python3 bench/load_memory.py --preset 1.3b --device cuda ;;
    *) echo "unknown stage $s" ;;
  esac
done
