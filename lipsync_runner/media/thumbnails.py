"""A small JPEG of a job's video (its first frame), for job lists."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from lipsync_runner.media.ffmpeg import decoder_max_pixels, ffmpeg_exe, input_args

log = logging.getLogger(__name__)

THUMBNAIL_NAME = "thumbnail.jpg"
THUMBNAIL_WIDTH = 160
TIMEOUT_S = 20.0


def write_thumbnail(video: Path, dest: Path, width: int = THUMBNAIL_WIDTH, demuxer: str = "", *,
                    max_pixels: int | None = None) -> bool:
    """Write the first frame, `width` pixels wide, to `dest`; False (and no file) if that fails.

    A thumbnail is a convenience: a video that passed validation but cannot give one
    still makes a job. ``max_pixels``: the deployment's frame-size limit (ffmpeg's own cap from it).
    """
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        result = subprocess.run(
            [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", *input_args(video, demuxer, max_pixels=decoder_max_pixels(max_pixels)),
             "-map", "0:V:0", "-frames:v", "1", "-vf", f"scale={width}:-2", "-q:v", "4", "-f", "image2",
             "-c:v", "mjpeg", "-y", "file:" + str(tmp.resolve())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=TIMEOUT_S)
        if result.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            log.warning("no thumbnail for %s: %s", video.name, result.stderr[-300:].decode("utf-8", "replace"))
            tmp.unlink(missing_ok=True)
            return False
        tmp.replace(dest)
        return True
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("no thumbnail for %s: %s", video.name, type(exc).__name__)
        tmp.unlink(missing_ok=True)
        return False
