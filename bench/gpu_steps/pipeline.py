"""Pipeline: a 10 s 720p 25 fps clip end to end in process, cold then warm, with the stage split.

Reuses bench/bench_cache.py: the models directory is loaded through ``MuseTalk.from_pretrained``
(fp16 + ``tune_for_gpu`` on CUDA), every batch shape is warmed up outside the timed runs, then the
job runs with a fresh avatar cache (cold: face tracking and two VAE encodes per frame) and again
through the same cache (warm). Records the wall time, frames/s, each stage's seconds and share of
the wall, the model load time and the peak GPU memory. Needs ffmpeg (decode and x264 encode).
Smoke mode: 16 frames at 320x240 with tiny models on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from bench.gpu_steps import common

# cv2: the Haar face detector and crops; pydantic/pydantic_settings: the job's settings and params;
# cachetools: the blend-mask cache; webrtcvad: speech activity; imageio_ffmpeg: the ffmpeg binary.
MODULES = common.MODULES + ("lipsync_runner", "diffusers", "transformers", "safetensors", "cv2", "skimage",
                            "scipy", "pydantic", "pydantic_settings", "cachetools", "webrtcvad", "imageio_ffmpeg")
NEEDS_FFMPEG = True
STEP = "pipeline"


def main() -> int:
    from bench.bench_cache import bench

    smoke = common.SMOKE
    args = argparse.Namespace(
        size=common.size(), models=common.models_dir(), seconds=0.64 if smoke else 10.0,
        width=320 if smoke else 1280, height=240 if smoke else 720, fps=25.0, batch_size=8 if smoke else 32,
        repeats=1, detector="auto", device="cpu" if smoke else "auto", allow_cpu_full=False)
    with tempfile.TemporaryDirectory(prefix="pipeline-", dir=common.WORK) as tmp:
        from pathlib import Path

        result = bench(args, Path(tmp))
    common.emit(STEP, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
