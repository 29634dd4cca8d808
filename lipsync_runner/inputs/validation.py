"""Content checks of an upload, before a job is queued: real media, within the limits."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

from lipsync_runner.media.ffmpeg import PROBE_TIMEOUT_S, AudioInfo, MediaLimits, VideoInfo, probe_audio, probe_video
from lipsync_runner.params import JobParams
from lipsync_runner.pipeline.plan import frames_to_decode
from lipsync_runner.pipeline.scratch_disk import ScratchLedger, check_admissible
from lipsync_runner.config import ApiLimits


def media_limits(limits: ApiLimits) -> MediaLimits:
    """The decode-time limits of a job (PipelineOptions.limits) from the API's settings."""
    return MediaLimits(max_video_seconds=limits.max_video_seconds, max_audio_seconds=limits.max_audio_seconds,
                       max_video_pixels=limits.max_video_pixels, max_fps=limits.max_fps)


def validate_video(video: Path, limits: ApiLimits, *, timeout_s: float = PROBE_TIMEOUT_S) -> VideoInfo:
    """Probe the video by content (InvalidInputError, 400) and check it against the limits (413).

    For a job whose other input is a URL: the pair (and the scratch estimate) is checked by the
    worker once the URL is fetched (``validate_media``)."""
    video_info = probe_video(video, timeout_s=timeout_s, max_pixels=limits.max_video_pixels)
    media_limits(limits).check_video(video_info, video.name)
    return video_info


def validate_audio(audio: Path, limits: ApiLimits, *, timeout_s: float = PROBE_TIMEOUT_S) -> AudioInfo:
    """Probe the audio by content (400) and check it against the limits (413)."""
    audio_info = probe_audio(audio, timeout_s=timeout_s)
    media_limits(limits).check_audio(audio_info, audio.name)
    return audio_info


def validate_media(video: Path, audio: Path, limits: ApiLimits, scratch: ScratchLedger | None = None, *,
                   params: JobParams | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[VideoInfo, AudioInfo]:
    """Probe both files by content (InvalidInputError, 400) and check them against the limits.

    413 for size, duration, frame rate, frame count, a video of timestamps far apart that the job's
    sync mode would read whole for a far shorter output (plan.frames_to_decode), or a scratch need over
    the per-job cap; 507 when ``scratch`` (the data directory's ledger) cannot hold the job's scratch now.
    ``params``: the job's (the scratch need depends on the sync mode). ``timeout_s`` bounds each probe.
    """
    video_info = probe_video(video, timeout_s=timeout_s, max_pixels=limits.max_video_pixels)
    audio_info = probe_audio(audio, timeout_s=timeout_s)
    checks = media_limits(limits)
    checks.check_video(video_info, video.name)
    checks.check_audio(audio_info, audio.name)
    n_audio = math.floor(Fraction(repr(audio_info.duration)) * video_info.fps)  # the job refuses it too, exactly
    frames_to_decode((params or JobParams()).sync_mode, n_video=video_info.frame_count_estimate,
                     n_held=video_info.packet_count, n_audio=max(1, n_audio), name=video.name)
    check_admissible(video_info, audio_info, limits, scratch, params=params)
    return video_info, audio_info


def media_summary(video: VideoInfo | None, audio: AudioInfo | None) -> dict[str, Any]:
    """What the job list shows of its inputs, and what the job need not probe again (what is known)."""
    summary: dict[str, Any] = {}
    if video is not None:
        summary["video"] = {"duration_s": round(video.duration, 3),
                            "fps": f"{video.fps.numerator}/{video.fps.denominator}", "width": video.width,
                            "height": video.height, "frames": video.frame_count_estimate,
                            "demuxer": video.demuxer}  # what it is: the media type it is served as
    if audio is not None:
        summary["audio"] = {"duration_s": round(audio.duration, 3), "demuxer": audio.demuxer}
    return summary
