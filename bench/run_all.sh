#!/usr/bin/env bash
# Every benchmark, one command:  bench/run_all.sh [--quick]
#
#   1. bench_core.py    tiny models: 10 s and 60 s 720p clips end to end (stage ms/frame, peak memory),
#                       full-size MuseTalk model frames/s by batch size (1 2 4 on a CPU)
#   2. bench_cache.py   10 s 720p clip, cold and with a warm avatar cache (tiny models)
#   3. bench_service.py the real server, 1, 4 and 16 concurrent jobs (tiny models)
#   3b. bench_pipeline_cpu.py  the pipeline with a null model vs a bare transcode, 720p and 1080p;
#       bench_ops.py (crop filters, blend) and bench_x264.py (presets, threads)
#   3c. bench_scale.py  PostgreSQL claim latency; jobs/min and status p50/p99 with 1 and 2 API
#       replicas on one runner (PostgreSQL + moto S3 on the loopback, tiny models)
#   3d. bench_jitter.py face-box jitter and lag, raw / moving average / One-Euro (Haar, real face)
# With CUDA present, also:
#   4. bench_core.py model --size full at batch sizes 1 8 16 32 64
#   5. bench_cache.py --size full: 10 s 720p cold and warm, batch 32 (random full-size weights,
#      ~3.5 GB, written once to a temporary dir)
#   6. bench_service.py with those full-size weights on the GPU, 1, 4 and 16 concurrent jobs
# (bench/gpu_check.sh is the GPU check for a lent machine, under a time limit: see its header.)
#
# --quick: bench_core on the 10 s clip only, full-size CPU rates at batch size 1 only.
# Environment: PYTHON (default .venv/bin/python, else python3), RESULTS (a directory: each step's
# output is also written there as <step>.txt).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
RESULTS=${RESULTS:-}
[[ -n "$RESULTS" ]] && mkdir -p "$RESULTS"
FAILED=()

step() {  # step NAME COMMAND...
    local name=$1; shift
    echo
    echo "=================== $name: $* ($(date -u +%H:%M:%S) UTC, load: $(cut -d' ' -f1-3 /proc/loadavg))"
    local t0=$SECONDS rc
    if [[ -n "$RESULTS" ]]; then
        "$@" 2>&1 | grep --line-buffered -v -E 'Writing model shards|Loading weights' | tee "$RESULTS/$name.txt"
        rc=${PIPESTATUS[0]}
    else
        "$@" 2>&1 | grep --line-buffered -v -E 'Writing model shards|Loading weights'
        rc=${PIPESTATUS[0]}
    fi
    echo "=================== $name: exit $rc after $((SECONDS - t0)) s"
    [[ $rc -eq 0 ]] || FAILED+=("$name")
}

echo "# machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/2^20}' /proc/meminfo), $(uname -m); uptime:$(uptime)"
CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [[ "$CUDA" == 1 ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi

if [[ $QUICK == 1 ]]; then
    step core "$PY" bench/bench_core.py --clips 10 --full-batch-sizes 1
else
    step core "$PY" bench/bench_core.py
fi
step cache "$PY" bench/bench_cache.py --size tiny --device cpu --repeats 2
step service "$PY" bench/bench_service.py --size tiny --device cpu --concurrency 1 4 16
step jitter "$PY" bench/bench_jitter.py
if [[ $QUICK == 1 ]]; then
    step pipeline_cpu "$PY" bench/bench_pipeline_cpu.py --sizes 720p
else
    step pipeline_cpu "$PY" bench/bench_pipeline_cpu.py --sizes 720p 1080p --repeats 2
    step ops "$PY" bench/bench_ops.py
    step x264 "$PY" bench/bench_x264.py
fi
step scale "$PY" bench/bench_scale.py
if [[ "$CUDA" == 1 ]]; then
    step core_full_gpu "$PY" bench/bench_core.py model --size full --batch-sizes 1 8 16 32 64 --repeats 3
    FULL=$(mktemp -d "${TMPDIR:-/tmp}/bench-full-models-XXXXXX")
    trap 'rm -rf "$FULL"' EXIT
    step write_full_models "$PY" -c "from lipsync_runner.models.tiny import write_models_dir; write_models_dir('$FULL', size='full')"
    step cache_full_gpu "$PY" bench/bench_cache.py --size full --models "$FULL" --batch-size 32 --repeats 2
    step service_full_gpu "$PY" bench/bench_service.py --models "$FULL" --device cuda --concurrency 1 4 16
fi

echo
echo "# uptime after:$(uptime)"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "# FAILED: ${FAILED[*]}"
    exit 1
fi
echo "# all steps passed"
