"""Preflight: what this machine is, and which steps can run on it.

- imports exactly the modules each step declares (``MODULES``), each in turn, and records the
  first failure per step: a missing module or a version clash shows here, not halfway through;
- Python, torch, CUDA, cuDNN and driver versions, the GPU's name, memory and multiprocessors;
- ffmpeg: which binary the product would use, its version, whether it has libx264;
- NVENC and NVDEC through that ffmpeg (lipsync_runner.media.hwcodecs.detect: a 1-frame trial
  encode and decode), with the reason when they are not used; whether the container was given
  the driver's video capability (``NVIDIA_DRIVER_CAPABILITIES``).

Writes ``<work>/steps.txt``: one line per step, ``<step> run`` or ``<step> skip <reason>``.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys

from bench.gpu_steps import common

STEPS = ("numerics", "core", "pipeline", "service")
MODULES = common.MODULES
STEP = "preflight"


def _import_all(modules: tuple[str, ...]) -> str | None:
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # ImportError, or a package that breaks while importing
            return f"import {name} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return None


def _ffmpeg() -> tuple[dict, str | None]:
    """The product's ffmpeg (LIP_SYNC_FFMPEG or imageio-ffmpeg's binary), or why there is none."""
    try:
        from lipsync_runner.media.ffmpeg import ffmpeg_exe

        exe = ffmpeg_exe()
    except Exception as exc:
        return {"ffmpeg": None}, f"no ffmpeg: {exc}"
    info: dict = {"ffmpeg": exe}
    try:
        version = subprocess.run([exe, "-hide_banner", "-version"], capture_output=True, text=True, timeout=20)
        encoders = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return info, f"ffmpeg {exe} does not run: {exc}"
    info["ffmpeg_version"] = (version.stdout.splitlines() or ["?"])[0]
    info["libx264"] = " libx264 " in encoders.stdout
    if not info["libx264"]:
        return info, f"ffmpeg {exe} has no libx264 encoder"
    from lipsync_runner.media.hwcodecs import detect

    codecs = detect(exe)
    info.update({"nvenc": codecs.encoder == "h264_nvenc", "nvdec": codecs.hwaccel is not None,
                 "hw_codecs_reason": codecs.reason,
                 "NVIDIA_DRIVER_CAPABILITIES": os.environ.get("NVIDIA_DRIVER_CAPABILITIES")})
    return info, None


def _torch_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(), "smoke": common.SMOKE}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update({"gpu": p.name, "gpu_mem_gib": round(p.total_memory / 2**30, 1),
                     "multiprocessors": p.multi_processor_count, "capability": f"{p.major}.{p.minor}"})
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = smi.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    return info


def main() -> int:
    verdicts: dict[str, str] = {}
    for step in STEPS:
        mod = importlib.import_module(f"bench.gpu_steps.{step}")
        failure = _import_all(mod.MODULES)
        verdicts[step] = f"skip {failure}" if failure else "run"
    info = _torch_info()
    if not common.SMOKE and not info["cuda_available"]:
        for step in STEPS:
            verdicts[step] = "skip no CUDA device (GPU_CHECK_SMOKE=1 runs the steps on the CPU)"
    ffmpeg, no_ffmpeg = _ffmpeg()
    info.update(ffmpeg)
    for step in STEPS:
        if no_ffmpeg and verdicts[step] == "run" and getattr(importlib.import_module(f"bench.gpu_steps.{step}"),
                                                             "NEEDS_FFMPEG", False):
            verdicts[step] = f"skip {no_ffmpeg}"
    common.emit(STEP, {**info, "steps": verdicts})
    (common.WORK / "steps.txt").write_text("".join(f"{s} {v}\n" for s, v in verdicts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
