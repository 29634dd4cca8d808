#!/usr/bin/env bash
# The GPU check for a lent device machine, as it is: no registry is reachable there, so it installs
# only from the device kit (bench/device_kit.sh builds it here and prints the one `run` command).
#
#   bash bench/gpu_check.sh                    # there: kit install, preflight, the four steps
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh  # here: the same steps, tiny models on the CPU
#   bash bench/gpu_check.sh --smoke            # the same
#
# 0. install bench/kit/*.whl with pip --no-index --no-deps --target (nothing else is fetched);
# 1. preflight  (bench/gpu_steps/preflight.py): imports exactly what each step imports, torch /
#    CUDA / cuDNN / driver versions, ffmpeg and libx264, NVENC/NVDEC with the reason; decides
#    which steps run and why the others are skipped;
# 2. numerics   GPU fp16 channels-last vs GPU fp32 vs CPU fp32 (full-size random weights);
# 3. core       UNet, VAE decode, VAE encodes apart; batch 1-128; NCHW vs channels-last; CUDA graphs;
# 4. pipeline   a 10 s 720p clip in process, cold then warm, stage split;
# 5. service    upload to download through `bentoml serve`, 1 and 4 concurrent jobs.
# One budget (BUDGET_S, default 420 s) for all of it; each step has a cap inside what is left.
# A step that fails, times out or is skipped is reported and the next one still runs.
# Results: at most 6 files under $OUT (default bench/out/gpu_check): log.txt (everything printed),
# results.jsonl (one JSON record per measurement), summary.txt (step verdicts and times).
#
# Environment: PYTHON (default python3), BUDGET_S, OUT, GPU_KIT (default bench/kit),
# GPU_CHECK_WORK (scratch; default a fresh temporary folder, removed at the end),
# GPU_CHECK_STEPS (default all: "preflight numerics core pipeline service"; the preflight always runs).
set -uo pipefail
cd "$(dirname "$0")/.."
[[ "${1:-}" == "--smoke" ]] && export GPU_CHECK_SMOKE=1
export GPU_CHECK_SMOKE=${GPU_CHECK_SMOKE:-0}
SMOKE=$GPU_CHECK_SMOKE
START=$SECONDS
if [[ "$SMOKE" == 1 ]]; then
    BUDGET_S=${BUDGET_S:-600}
    # Tiny models on a shared CPU: one intra-op thread each. Two threads that spin-wait for each
    # other on busy cores made the tiny UNet 10x slower (2.4 s against 0.25 s per call, load 15).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    BUDGET_S=${BUDGET_S:-420}
fi
OUT=${OUT:-bench/out/gpu_check}
mkdir -p "$OUT"
: >"$OUT/log.txt"; : >"$OUT/results.jsonl"; : >"$OUT/summary.txt"
exec > >(tee -a "$OUT/log.txt") 2>&1
PY=${PYTHON:-python3}
KIT=${GPU_KIT:-bench/kit}
if [[ -z "${GPU_CHECK_WORK:-}" ]]; then
    GPU_CHECK_WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")
    trap 'rm -rf "$GPU_CHECK_WORK"' EXIT
fi
mkdir -p "$GPU_CHECK_WORK"
export GPU_CHECK_WORK GPU_CHECK_RESULTS="$PWD/$OUT/results.jsonl"
[[ "$OUT" = /* ]] && GPU_CHECK_RESULTS="$OUT/results.jsonl"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 BENTOML_DO_NOT_TRACK=true TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

left() { echo $((BUDGET_S - (SECONDS - START))); }
say() { echo "$*"; echo "$*" >>"$OUT/summary.txt"; }
say "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) smoke=$SMOKE budget ${BUDGET_S} s; $(nproc) CPUs; $(uname -r)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

# ------------------------------------------------------------------ 0. the kit, and nothing else
if [[ "$SMOKE" == 1 ]]; then
    # The kit is CPython 3.12 wheels for the lent machine; a smoke run uses this Python's packages
    # (tests/test_device_kit.py runs it in a venv of the lent image's packages plus the kit's).
    say "# kit: not installed in smoke mode (this Python's own packages are used)"
elif ls "$KIT"/*.whl >/dev/null 2>&1; then
    SITE="$GPU_CHECK_WORK/site"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$KIT"/*.whl; then
        export PYTHONPATH="$PYTHONPATH:$SITE"
        # pip keeps the wheel's mode bits, but a binary that lost its x bit fails late: set it now.
        find "$SITE" -path '*/imageio_ffmpeg/binaries/ffmpeg-*' -exec chmod +x {} + 2>/dev/null
        say "# kit: $(ls "$KIT"/*.whl | wc -l) wheels from $KIT installed into $SITE"
    else
        say "# kit: pip could not install $KIT/*.whl; the preflight will name what is missing"
    fi
else
    say "# kit: none at $KIT: run 'bash bench/device_kit.sh' where pip works and carry $KIT"
fi

FAILED=0
step() {  # step NAME CAP_S
    local name=$1 cap=$2 remaining limit t0 rc verdict
    remaining=$(left)
    limit=$((cap < remaining - 5 ? cap : remaining - 5))
    if [[ "$name" != preflight ]]; then
        if [[ " ${GPU_CHECK_STEPS:-$name} " != *" $name "* ]]; then say "== $name: not selected (GPU_CHECK_STEPS)"; return; fi
        verdict=$(grep "^$name " "$GPU_CHECK_WORK/steps.txt" 2>/dev/null | cut -d' ' -f2-)
        if [[ -z "$verdict" ]]; then
            say "# $name: no preflight verdict (the preflight failed): running it anyway"
        elif [[ "$verdict" != run ]]; then
            say "== $name: SKIPPED: ${verdict#skip }"; FAILED=$((FAILED + 1)); return
        fi
    fi
    if ((limit < 15)); then say "== $name: SKIPPED: out of the budget ($remaining s left)"; FAILED=$((FAILED + 1)); return; fi
    echo; echo "== $name (cap ${limit} s; $remaining s of the budget left)"
    t0=$SECONDS
    GPU_CHECK_DEADLINE=$(($(date +%s) + limit - 5)) timeout --kill-after=10 "$limit" "$PY" -m "bench.gpu_steps.$name"
    rc=$?
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then say "== $name: TIMED OUT after $((SECONDS - t0)) s"
    else say "== $name: exit $rc after $((SECONDS - t0)) s"; fi
    [[ $rc -eq 0 ]] || FAILED=$((FAILED + 1))
}

if [[ "$SMOKE" == 1 ]]; then
    step preflight 120; step numerics 150; step core 120; step pipeline 150; step service 200
else
    # Caps sum past the budget on purpose: a step that ends early leaves its time to the next ones.
    step preflight 60; step numerics 110; step core 130; step pipeline 100; step service 130
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,temperature.gpu --format=csv
say "# gpu_check done in $((SECONDS - START)) s; $FAILED step(s) failed or skipped"
exit $FAILED
