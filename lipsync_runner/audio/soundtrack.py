"""The output's sound track, laid out by the plan: trimmed, padded with silence, or pieced together.

Most jobs mux the new audio file as it is. Where the plan says otherwise (cut_off drops the
audio past the video, silence pads a short audio to the video's length, a segment with its
own audio_start plays the audio from there), one ffmpeg pass writes the sound track as 16-bit
PCM WAV at the audio's own rate and channels into the job's scratch space; the encoder then
muxes that file. Times come from the plan as exact fractions and are cut at sample precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from lipsync_runner.errors import MediaProcessingError
from lipsync_runner.media.ffmpeg import AUDIO_DEMUXERS, ffmpeg_exe, input_args


def _seconds(value: Fraction) -> str:
    return f"{float(value):.6f}"


@dataclass(frozen=True)
class AudioPiece:
    """A stretch of the output's sound track: `duration` seconds of the new audio from `src_start`,
    played at `out_start` of the output. Audio past the end of the new audio is silence."""

    out_start: Fraction
    src_start: Fraction
    duration: Fraction


def filter_graph(pieces: Sequence[AudioPiece]) -> str:
    """An ffmpeg filter graph from input 0's audio to [out]: each piece cut from the audio padded
    with endless silence (so a piece past its end is silence), then the pieces in order."""
    if not pieces:
        raise ValueError("no sound pieces")
    end = max(p.src_start + p.duration for p in pieces)
    n = len(pieces)
    graph = [f"[0:a:0]apad=whole_dur={_seconds(end)}" + (f",asplit={n}" + "".join(f"[s{k}]" for k in range(n))
                                                          if n > 1 else "[s0]")]
    for k, p in enumerate(pieces):
        graph.append(f"[s{k}]atrim=start={_seconds(p.src_start)}:duration={_seconds(p.duration)},"
                     f"asetpts=PTS-STARTPTS[p{k}]")
    if n > 1:
        graph.append("".join(f"[p{k}]" for k in range(n)) + f"concat=n={n}:v=0:a=1[out]")
    else:
        graph[-1] = graph[-1].replace("[p0]", "[out]")
    return ";".join(graph)


def write_soundtrack(audio: Path, pieces: Sequence[AudioPiece], path: Path, *,
                     timeout_s: float | None = None) -> Path:
    """Write the sound track the pieces describe to `path` (WAV); MediaProcessingError if ffmpeg fails."""
    source = f"file:{os.path.abspath(audio)}"  # the URL input_args names it by (to take it out of messages)
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", *input_args(audio, "", AUDIO_DEMUXERS),
           "-filter_complex", filter_graph(pieces), "-map", "[out]", "-c:a", "pcm_s16le", "-f", "wav",
           f"file:{path.resolve()}"]
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        path.unlink(missing_ok=True)
        raise MediaProcessingError(f"laying out the sound track of {audio.name} timed out") from None
    if res.returncode != 0:
        path.unlink(missing_ok=True)
        tail = res.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
        raise MediaProcessingError(f"laying out the sound track of {audio.name} failed: "
                                   f"{tail[0].replace(source, audio.name).replace(str(audio), audio.name)}")
    return path
