#!/usr/bin/env bash
# The prepared GPU benchmark: the whole full-size set in under 8 minutes on an H100.
#
#   bash bench/gpu_check.sh                 # on a GPU machine; results also go to $OUT (if set)
#   SMOKE=1 bash bench/gpu_check.sh         # the same steps with tiny sizes on the CPU (a dry run)
#
# Steps (each under its own time cap, all under BUDGET_S seconds, default 450):
#   0. header: nvidia-smi, torch/CUDA versions, CPUs
#   1. core_full:  full-size MuseTalk (random weights, fp16) generate/prepare frames/s at batch sizes
#                  1 8 16 32 64                                     (bench/bench_core.py model)
#   2. models:     write the full-size random-weight models dir once (~3.5 GB, MuseTalk's layout)
#   3. cache_full: 10 s 720p 25 fps clip, cold and with a warm avatar cache, batch 32, stage shares,
#                  peak GPU memory                                   (bench/bench_cache.py)
#   4. service_full: the real server on the GPU with those weights, 1, 4 and 16 concurrent jobs:
#                  frames/s summed, mean runner batch size, peak GPU memory (bench/bench_service.py)
#   5. nvidia-smi again
# A step that runs out of time or fails is reported and the next one still runs; the exit status is
# the number of failed steps. Every step's output is also written to $OUT/<step>.txt, and all the
# JSON result lines to $OUT/results.jsonl.
#
# The device machines' image has torch, transformers, opencv, scikit-image, httpx and psutil, but
# not diffusers, imageio-ffmpeg, pydantic-settings or bentoml (and some of bentoml's own needs).
# Carry them as wheels (see the device README): put them in .whl/ (or WHEELS=dir) and they are
# installed into /tmp/site first. LIP_SYNC_FFMPEG may name a system ffmpeg instead of imageio-ffmpeg.
# Steps whose imports are missing are skipped with the reason.
#
# Environment: PYTHON (default: .venv/bin/python if it runs, else python3), BUDGET_S, OUT, WHEELS,
# SMOKE=1, KEEP_MODELS=dir (reuse or keep the full-size models dir there).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET_S=${BUDGET_S:-450}
SMOKE=${SMOKE:-0}
OUT=${OUT:-}
[[ -n "$OUT" ]] && mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 BENTOML_DO_NOT_TRACK=true TOKENIZERS_PARALLELISM=false

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch' 2>/dev/null; then PY=.venv/bin/python
    else PY=python3; fi
fi
WHEELS=${WHEELS:-.whl}
if [[ -d "$WHEELS" ]] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "# installing carried wheels from $WHEELS into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

FAILED=0
log() { echo "$*"; [[ -n "$OUT" ]] && echo "$*" >>"$OUT/summary.txt"; return 0; }
left() { echo $((BUDGET_S - (SECONDS - START))); }

step() {  # step NAME CAP_S MODULES COMMAND...   (MODULES: comma-separated imports the step needs)
    local name=$1 cap=$2 mods=$3; shift 3
    local remaining; remaining=$(left)
    local limit=$((cap < remaining - 5 ? cap : remaining - 5))
    echo
    log "=================== $name (cap ${limit} s, $(left) s of the budget left): $*"
    if ((limit < 20)); then log "=================== $name: SKIPPED, out of time"; FAILED=$((FAILED + 1)); return; fi
    local missing
    missing=$("$PY" - "$mods" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1].split(",") if m and importlib.util.find_spec(m) is None))
EOF
)
    if [[ -n "$missing" ]]; then
        log "=================== $name: SKIPPED, missing Python modules: $missing"; FAILED=$((FAILED + 1)); return
    fi
    local t0=$SECONDS rc file=/dev/null
    [[ -n "$OUT" ]] && file="$OUT/$name.txt"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | grep --line-buffered -v -E 'Writing model shards|Loading weights' \
        | tee "$file"
    rc=${PIPESTATUS[0]}
    [[ -n "$OUT" ]] && grep -E '^\{' "$file" | sed "s/^/{\"step\": \"$name\", \"line\": /; s/\$/}/" >>"$OUT/results.jsonl"
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then log "=================== $name: TIMED OUT after $((SECONDS - t0)) s"
    else log "=================== $name: exit $rc after $((SECONDS - t0)) s"; fi
    [[ $rc -eq 0 ]] || FAILED=$((FAILED + 1))
}

# ------------------------------------------------------------------ 0. header
{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) SMOKE=$SMOKE budget ${BUDGET_S} s; $(nproc) CPUs; $(uname -r)"
    echo "# uptime:$(uptime)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv
        nvidia-smi | head -15
    else
        echo "# no nvidia-smi"
    fi
    "$PY" -c 'import sys, torch; print(f"# python {sys.version.split()[0]} torch {torch.__version__} cuda {torch.version.cuda} available {torch.cuda.is_available()}" + (f" device {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))'
} 2>&1 | tee ${OUT:+"$OUT/header.txt"}

CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [[ "$SMOKE" != 1 && "$CUDA" != 1 ]]; then
    log "# no CUDA device: this is the GPU script (SMOKE=1 runs its steps with tiny sizes on the CPU)"
    exit 2
fi

if [[ "$SMOKE" == 1 ]]; then
    SIZE=tiny; DEVICE=cpu; BS="1 2"; REPEATS=1
    CACHE_ARGS=(--seconds 2 --width 320 --height 240 --batch-size 8 --repeats 1 --device cpu)
    SERVICE_ARGS=(--device cpu --concurrency 1 2 --video-seconds 1)
else
    SIZE=full; DEVICE=cuda; BS="1 8 16 32 64"; REPEATS=3
    CACHE_ARGS=(--batch-size 32 --repeats 2)
    SERVICE_ARGS=(--device cuda --concurrency 1 4 16 --start-timeout 150 --round-timeout 120)
fi

MODELS=${KEEP_MODELS:-}
if [[ -z "$MODELS" ]]; then
    MODELS=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-models-XXXXXX")
    trap 'rm -rf "$MODELS"' EXIT
fi

# ------------------------------------------------------------------ 1-4
# shellcheck disable=SC2086
step core_full 110 torch,diffusers "$PY" bench/bench_core.py model --size $SIZE --batch-sizes $BS --repeats $REPEATS
if [[ -f "$MODELS/sd-vae/config.json" ]]; then
    log "# reusing the models dir $MODELS"
else
    step models 90 torch,diffusers,transformers "$PY" -c \
        "import sys; from lipsync_runner.models.tiny import write_models_dir; write_models_dir(sys.argv[1], size=sys.argv[2]); print('wrote', sys.argv[1])" \
        "$MODELS" "$SIZE"
fi
FFMPEG_MOD=imageio_ffmpeg
[[ -n "${LIP_SYNC_FFMPEG:-}" ]] && FFMPEG_MOD=""
step cache_full 130 torch,diffusers,transformers,pydantic_settings,cv2,$FFMPEG_MOD \
    "$PY" bench/bench_cache.py --size $SIZE --models "$MODELS" "${CACHE_ARGS[@]}"
step service_full 190 torch,diffusers,transformers,cv2,$FFMPEG_MOD,bentoml,pydantic_settings,fastapi,multipart,httpx,psutil \
    "$PY" bench/bench_service.py --models "$MODELS" "${SERVICE_ARGS[@]}"

# ------------------------------------------------------------------ 5.
echo
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,temperature.gpu --format=csv
log "# gpu_check done in $((SECONDS - START)) s; $FAILED step(s) failed or skipped; uptime:$(uptime)"
exit $FAILED
