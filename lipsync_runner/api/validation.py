"""Content checks of an upload, before a job is queued: real media, within the limits."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputTooLargeError
from ..media import AudioInfo, VideoInfo, probe_audio, probe_video
from .limits import ApiLimits


def validate_media(video: Path, audio: Path, limits: ApiLimits) -> tuple[VideoInfo, AudioInfo]:
    """Probe both files by content (InvalidInputError, 400) and check duration and size limits (413)."""
    video_info = probe_video(video)
    audio_info = probe_audio(audio)
    pixels = video_info.width * video_info.height
    if pixels > limits.max_video_pixels:
        raise InputTooLargeError(
            f"{video.name}: resolution {video_info.width}x{video_info.height} is above the limit of "
            f"{limits.max_video_pixels:,} pixels per frame")
    if video_info.duration > limits.max_video_seconds:
        raise InputTooLargeError(
            f"{video.name}: {video_info.duration:.1f} s of video is over the limit of {limits.max_video_seconds:g} s")
    if audio_info.duration > limits.max_audio_seconds:
        raise InputTooLargeError(
            f"{audio.name}: {audio_info.duration:.1f} s of audio is over the limit of {limits.max_audio_seconds:g} s")
    return video_info, audio_info
