"""What every GPU-check step shares: smoke or full sizes, the models directory, timing, results.

Settings come from the environment that bench/gpu_check.sh sets:
- ``GPU_CHECK_SMOKE=1``: tiny random-weight models on the CPU, tiny sizes (the test suite's run);
- ``GPU_CHECK_WORK``: scratch folder (the models directory is written there once, then reused);
- ``GPU_CHECK_RESULTS``: the JSON-lines file every step appends its records to;
- ``GPU_CHECK_DEADLINE``: epoch seconds by which the step must be done (it stops starting new
  measurements a little before; the shell's ``timeout`` is the hard stop).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

SMOKE = os.environ.get("GPU_CHECK_SMOKE", "0") == "1"
WORK = Path(os.environ.get("GPU_CHECK_WORK") or "/tmp/gpu-check")
RESULTS = Path(os.environ["GPU_CHECK_RESULTS"]) if os.environ.get("GPU_CHECK_RESULTS") else None
DEADLINE = float(os.environ.get("GPU_CHECK_DEADLINE") or time.time() + 3600)

# TFLOP per generated frame of the full-size networks (MuseTalk UNet at 32x32 latents, sd-vae-ft-mse
# at 256x256): the UNet, the VAE decode, and prepare's two VAE encodes (masked and reference crop).
TFLOP_PER_FRAME = {"unet": 0.178, "vae_decode": 0.622, "vae_encode_x2": 0.545}

# Modules common.py itself imports (every step imports common).
MODULES = ("numpy", "torch")


def _record_imports() -> None:
    """GPU_CHECK_TRACE_IMPORTS=1: at exit, list the top-level modules this step loaded (tests compare
    them with the step's MODULES)."""
    import __main__

    step = (getattr(__main__, "__spec__", None) and __main__.__spec__.name or "main").rsplit(".", 1)[-1]
    names = sorted({m.split(".", 1)[0] for m in list(sys.modules) if not m.startswith("_")})
    (WORK / f"imports-{step}.txt").write_text("\n".join(names) + "\n")


if os.environ.get("GPU_CHECK_TRACE_IMPORTS") == "1":
    import atexit

    atexit.register(_record_imports)


def left_s() -> float:
    return DEADLINE - time.time()


def emit(step: str, record: dict[str, Any]) -> None:
    """Print one result as a JSON line and append it to the results file at once (a later kill
    loses only the measurement in progress)."""
    line = json.dumps({"step": step, **record}, default=str)
    print(line, flush=True)
    if RESULTS is not None:
        with RESULTS.open("a") as f:
            f.write(line + "\n")


def device() -> str:
    import torch

    return "cpu" if SMOKE or not torch.cuda.is_available() else "cuda"


def size() -> str:
    return "tiny" if SMOKE else "full"


def models_dir() -> Path:
    """The random-weight MuseTalk models directory in the real layout (the real configs at full
    size), written once per check and shared by the steps: they load it the way the service does."""
    from lipsync_runner.models.tiny import write_models_dir

    root = WORK / f"models-{size()}"
    done = root / ".written"
    if not done.exists():
        t0 = time.perf_counter()
        write_models_dir(root, size=size(), seed=0)
        done.write_text(f"{time.perf_counter() - t0:.1f}\n")
        print(f"# wrote the {size()} random-weight models to {root} in {done.read_text().strip()} s", flush=True)
    return root


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], *, repeats: int, on_cuda: bool) -> list[float]:
    """Milliseconds of each of `repeats` calls: CUDA events around each call on a GPU (the work is
    asynchronous), the wall clock on a CPU. The caller has warmed up (cuDNN autotuning, lazy init)."""
    import torch

    times = []
    for _ in range(repeats):
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return times


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
