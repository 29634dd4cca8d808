"""Content checks of an upload, before a job is queued: real media, within the limits."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputTooLargeError
from ..media import AudioInfo, VideoInfo, probe_audio, probe_video
from .limits import ApiLimits


def validate_video(video: Path, limits: ApiLimits) -> VideoInfo:
    """Probe the video by content (InvalidInputError, 400) and check its resolution and duration (413)."""
    video_info = probe_video(video)
    pixels = video_info.width * video_info.height
    if pixels > limits.max_video_pixels:
        raise InputTooLargeError(
            f"{video.name}: resolution {video_info.width}x{video_info.height} is above the limit of "
            f"{limits.max_video_pixels:,} pixels per frame")
    if video_info.duration > limits.max_video_seconds:
        raise InputTooLargeError(
            f"{video.name}: {video_info.duration:.1f} s of video is over the limit of {limits.max_video_seconds:g} s")
    return video_info


def validate_audio(audio: Path, limits: ApiLimits) -> AudioInfo:
    """Probe the audio by content (400) and check its duration (413)."""
    audio_info = probe_audio(audio)
    if audio_info.duration > limits.max_audio_seconds:
        raise InputTooLargeError(
            f"{audio.name}: {audio_info.duration:.1f} s of audio is over the limit of {limits.max_audio_seconds:g} s")
    return audio_info


def validate_media(video: Path, audio: Path, limits: ApiLimits) -> tuple[VideoInfo, AudioInfo]:
    """Both inputs, the video first (the order of the messages users already know)."""
    video_info = validate_video(video, limits)
    return video_info, validate_audio(audio, limits)
