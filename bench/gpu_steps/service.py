"""Service: upload to download through the real server (``bentoml serve service:LipSync``).

Runs bench/bench_service.py against the check's random-weight models directory on the GPU: one
uncounted warm-up job, then rounds of 1 and 4 concurrent jobs (2 s 320x240 clips), each job
uploaded, waited for and its result downloaded. Records frames/s summed, job times and the
runner's batch sizes. Skipped, with the reason, when the kit holds no bentoml (the preflight
decides). Smoke mode: one round of one job with tiny models on the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from bench.gpu_steps import common

# What `import service` and `bentoml serve` load beyond the pipeline's modules: BentoML and the
# ASGI stack it serves the REST API with, multipart uploads, the client side of the benchmark.
MODULES = common.MODULES + ("lipsync_runner", "diffusers", "transformers", "safetensors", "cv2", "skimage",
                            "scipy", "pydantic", "pydantic_settings", "cachetools", "webrtcvad", "imageio_ffmpeg",
                            "bentoml", "fastapi", "starlette", "uvicorn", "multipart", "httpx", "psutil",
                            "prometheus_client", "pythonjsonlogger", "service")
NEEDS_FFMPEG = True
STEP = "service"


def main() -> int:
    smoke = common.SMOKE
    result_file = common.WORK / "service.json"
    cmd = [sys.executable, str(common.ROOT / "bench" / "bench_service.py"), "--models", str(common.models_dir()),
           "--device", "cpu" if smoke else "cuda", "--concurrency", *(["1"] if smoke else ["1", "4"]),
           "--video-seconds", "1" if smoke else "2", "--json", str(result_file), "--work", str(common.WORK)]
    if smoke:
        cmd += ["--no-warmup"]
    else:
        cmd += ["--start-timeout", str(max(30, int(common.left_s() * 0.6))), "--round-timeout", "90"]
    proc = subprocess.Popen(cmd, cwd=common.ROOT, env=os.environ.copy())
    try:
        rc = proc.wait(timeout=max(10.0, common.left_s() - 15))
    except subprocess.TimeoutExpired:
        # The server's processes run in their own session: the shell's kill of this step would
        # leave them holding the GPU. SIGINT lets bench_service stop the server; whatever is
        # still alive after that is killed.
        import psutil

        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        common.emit(STEP, {"error": "out of the step's time: bench_service.py and its server stopped"})
    if result_file.exists():
        common.emit(STEP, json.loads(result_file.read_text()))
    else:
        common.emit(STEP, {"error": f"bench_service.py exited {rc} without a result"})
    return rc


if __name__ == "__main__":
    sys.exit(main())
