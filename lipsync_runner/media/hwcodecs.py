"""NVDEC / NVENC through ffmpeg: detected once per process, used only when they really work.

A listed codec proves little: the static ffmpeg we ship lists ``h264_nvenc`` and ``h264_cuvid``
on every machine, GPU or not. So detection runs, once per ffmpeg binary:

1. ``ffmpeg -hide_banner -encoders`` / ``-decoders``: is ``h264_nvenc`` / ``h264_cuvid`` built in?
2. a 1-frame trial encode with ``h264_nvenc``: is there a GPU, a driver and a free NVENC session?
3. a 1-frame trial decode of an H.264 frame with ``h264_cuvid``: the same for NVDEC.

What passes is used (see :func:`video_codecs`); anything else, and ``LIP_SYNC_HW_CODECS=off``,
means the software path (libx264, ffmpeg's own decoders), which is also what every CPU-only
machine gets. Decoding on the GPU uses ``-hwaccel cuda`` on ffmpeg's own decoder rather than
forcing ``h264_cuvid``: frames come back to system memory for our raw RGB pipe, and a stream the
GPU cannot decode (a 4:4:4 H.264, an unsupported codec) falls back to software instead of failing
the job.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
from dataclasses import dataclass, replace

log = logging.getLogger(__name__)

NVENC = "h264_nvenc"
CUVID = "h264_cuvid"
TRIAL_TIMEOUT_S = 20.0
_TRIAL_W, _TRIAL_H = 256, 256  # above NVENC's minimum frame size


@dataclass(frozen=True)
class VideoCodecs:
    """How to decode and encode video on this machine.

    ``encoder``: the ffmpeg video encoder (``libx264`` or ``h264_nvenc``); ``hwaccel``: the
    ``-hwaccel`` method for decoding (``cuda``) or None for software; ``reason``: why the
    hardware path is or is not in use (for logs and health); ``threads``: x264's thread count.
    """

    encoder: str = "libx264"
    hwaccel: str | None = None
    reason: str = "software codecs"
    threads: int | None = None  # x264 threads per encode (None: x264's choice); NVENC ignores it

    @property
    def uses_gpu(self) -> bool:
        return self.encoder == NVENC or self.hwaccel is not None


SOFTWARE = VideoCodecs()


def _codec_names(ffmpeg: str, kind: str) -> set[str]:
    """Names in ``ffmpeg -encoders`` / ``-decoders`` (rows like `` V....D h264_nvenc  NVIDIA ...``)."""
    res = subprocess.run([ffmpeg, "-hide_banner", f"-{kind}"], stdin=subprocess.DEVNULL, capture_output=True,
                         timeout=TRIAL_TIMEOUT_S)
    names = set()
    for line in res.stdout.decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and len(parts[0]) == 6 and parts[0][0] in "VAS":
            names.add(parts[1])
    return names


def _trial_encode(ffmpeg: str, encoder: str) -> tuple[bytes | None, str]:
    """One black frame through ``encoder`` to a raw H.264 stream; (bitstream or None, error)."""
    frame = bytes(_TRIAL_W * _TRIAL_H * 3 // 2)  # yuv420p
    args = [ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-f", "rawvideo", "-pix_fmt", "yuv420p",
            "-s", f"{_TRIAL_W}x{_TRIAL_H}", "-r", "25", "-i", "pipe:0", "-frames:v", "1", "-c:v", encoder,
            "-f", "h264", "pipe:1"]
    try:
        res = subprocess.run(args, input=frame, capture_output=True, timeout=TRIAL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"trial {encoder} encode did not finish ({exc.__class__.__name__})"
    if res.returncode != 0 or not res.stdout:
        return None, _first_error(res.stderr) or f"trial {encoder} encode failed (exit code {res.returncode})"
    return res.stdout, ""


def _trial_decode(ffmpeg: str, bitstream: bytes) -> str:
    """Decode one H.264 frame with h264_cuvid; '' when it worked, else the error."""
    args = [ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-c:v", CUVID, "-f", "h264", "-i", "pipe:0",
            "-f", "null", "-"]
    try:
        res = subprocess.run(args, input=bitstream, capture_output=True, timeout=TRIAL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"trial {CUVID} decode did not finish ({exc.__class__.__name__})"
    if res.returncode != 0:
        return _first_error(res.stderr) or f"trial {CUVID} decode failed (exit code {res.returncode})"
    return ""


def _first_error(stderr: bytes) -> str:
    """ffmpeg's first error line (the cause; what follows is fallout), without object addresses."""
    for line in stderr.decode("utf-8", "replace").splitlines():
        if line.strip():
            return re.sub(r" @ 0x[0-9a-f]+", "", line.strip())
    return ""


def detect(ffmpeg: str) -> VideoCodecs:
    """Probe ``ffmpeg`` for working NVENC and NVDEC (uncached: see :func:`video_codecs`)."""
    try:
        encoders, decoders = _codec_names(ffmpeg, "encoders"), _codec_names(ffmpeg, "decoders")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return VideoCodecs(reason=f"ffmpeg could not list its codecs ({exc.__class__.__name__})")
    notes = []
    encoder, sample = "libx264", None
    if NVENC in encoders:
        sample, err = _trial_encode(ffmpeg, NVENC)
        if sample is not None:
            encoder = NVENC
        else:
            notes.append(f"{NVENC} unusable: {err}")
    else:
        notes.append(f"ffmpeg has no {NVENC}")
    hwaccel = None
    if CUVID in decoders:
        if sample is None:  # something for NVDEC to decode
            sample, err = _trial_encode(ffmpeg, "libx264")
        err = _trial_decode(ffmpeg, sample) if sample is not None else f"no H.264 sample to decode ({err})"
        if not err:
            hwaccel = "cuda"
        else:
            notes.append(f"{CUVID} unusable: {err}")
    else:
        notes.append(f"ffmpeg has no {CUVID}")
    used = [name for name, on in ((NVENC, encoder == NVENC), (f"NVDEC ({CUVID})", hwaccel)) if on]
    reason = ("using " + " and ".join(used)) if used else "software codecs"
    if notes:
        reason += "; " + "; ".join(notes)
    return VideoCodecs(encoder=encoder, hwaccel=hwaccel, reason=reason)


_cache: dict[str, VideoCodecs] = {}
_lock = threading.Lock()


def video_codecs(mode: str | None = None, ffmpeg: str | None = None, *, x264_threads: int | None = None) -> VideoCodecs:
    """The codecs jobs use: hardware where it works (``mode`` ``auto``), software with ``off``.

    ``mode`` and ``x264_threads`` default to the ``LIP_SYNC_HW_CODECS`` and ``LIP_SYNC_X264_THREADS``
    settings, ``ffmpeg`` to the one media.py uses. Detection runs once per ffmpeg binary and
    process (five short ffmpeg runs, at the first job).
    """
    if mode is None or x264_threads is None:
        from lipsync_runner.config import RunnerSettings

        settings = RunnerSettings()
        mode = settings.hw_codecs if mode is None else mode
        x264_threads = settings.x264_threads if x264_threads is None else x264_threads
    threads = x264_threads or None
    if mode == "off":
        return VideoCodecs(reason="hardware codecs off (LIP_SYNC_HW_CODECS=off)", threads=threads)
    if mode != "auto":
        raise ValueError(f"unknown hardware codec mode {mode!r} (auto, off)")
    if ffmpeg is None:
        from lipsync_runner.media.ffmpeg import ffmpeg_exe

        ffmpeg = ffmpeg_exe()
    with _lock:
        if ffmpeg not in _cache:
            _cache[ffmpeg] = detect(ffmpeg)
            log.info("video codecs: %s", _cache[ffmpeg].reason)
        if _cache[ffmpeg].threads != threads:  # kept with the threads asked: one object per setting
            _cache[ffmpeg] = replace(_cache[ffmpeg], threads=threads)
        return _cache[ffmpeg]


def clear_cache() -> None:
    with _lock:
        _cache.clear()
