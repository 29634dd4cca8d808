"""The per-job render plan: what every output frame shows, decided before any frame is rendered.

Every option that changes what the output shows (sync mode, segments, silence, the chosen
face) reduces to four arrays over the output frames:

    source[i]    the source frame that output frame i shows
    weight[i]    how much of the generated mouth it shows, 0..1 (0: the source frame untouched;
                 fractions are the cross-fades at the edges of silences and segments)
    audio[i]     the audio frame whose window drives the mouth (MuseTalk's frame index into the
                 Whisper steps)
    generate[i]  weight > 0 and the chosen face is present in source[i]

plus the layout of the output's sound track (`AudioPiece`s). Each option is a small pure
function below, tested on its own; the render loop (pipeline.py) executes any plan.

Lengths are in frames and exact: N = frames of the video, A = floor(audio seconds * fps)
(29.97 fps is 30000/1001, never 29 or 30). Times given in seconds (segments) map to the first
frame that starts at or after them: ceil(t * fps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from lipsync_runner.audio.soundtrack import AudioPiece
from lipsync_runner.errors import InputTooLargeError, InvalidInputError
from lipsync_runner.pipeline.framestore import pingpong_indices, store_bytes
from lipsync_runner.params import JobParams, Segment

#: Frames of cross-fade on each side of a silence or segment boundary (a service setting).
DEFAULT_FADE_FRAMES = 3
#: A segment's audio may run this many frames past the end of the audio (rounding of its times).
AUDIO_END_TOLERANCE = 1
#: A video whose constant-rate decode repeats the frames it holds more than this many times on average
#: is mostly gaps (see frames_to_decode). Constant and ordinary variable-rate video is at about 1.
GAP_REPEATS = 4


@dataclass(frozen=True)
class RenderPlan:
    source: np.ndarray  # [T] int64
    weight: np.ndarray  # [T] float32 in [0, 1]
    audio: np.ndarray  # [T] int64, >= 0
    generate: np.ndarray  # [T] bool
    fps: Fraction
    n_audio: int  # A: frames the new audio covers
    sound: tuple[AudioPiece, ...]
    face: np.ndarray  # [T] int: whose face frame i dubs (a row of build_plan's has_face: a segment's own face)

    def __len__(self) -> int:
        return len(self.source)

    @property
    def duration(self) -> Fraction:
        return len(self) / self.fps

    @property
    def sequential(self) -> bool:
        """Source frames never go back: one straight decode can feed the render."""
        return bool(np.all(np.diff(self.source) >= 0))

    @property
    def sound_is_the_audio(self) -> bool:
        """The new audio file itself is the output's sound (it lasts the output, within a frame)."""
        return len(self) == self.n_audio and self.sound == (AudioPiece(Fraction(0), Fraction(0), self.duration),)

    def audio_frames_needed(self) -> int:
        """Audio frames the generated frames read (beyond A: silence the audio is padded with)."""
        return int(self.audio[self.generate].max()) + 1 if self.generate.any() else 0


# --------------------------------------------------------------------------- sync modes


def output_length(sync_mode: str, n_video: int, n_audio: int) -> int:
    """T, the output's frame count. bounce/loop/remap: A; cut_off: min(A, N); silence: max(A, N)."""
    if n_video <= 0 or n_audio <= 0:
        raise ValueError("no frames")
    if sync_mode == "cut_off":
        return min(n_audio, n_video)
    if sync_mode == "silence":
        return max(n_audio, n_video)
    if sync_mode in ("bounce", "loop", "remap"):
        return n_audio
    raise ValueError(f"unknown sync_mode {sync_mode!r}")


def source_frames(sync_mode: str, n_out: int, n_video: int) -> np.ndarray:
    """source[i] for each output frame.

    bounce: 0..N-1, N-1..0, 0..N-1 ... (MuseTalk's i mod 2N ping-pong); loop: i mod N;
    cut_off and silence: i while the video lasts (silence bounces a video that is shorter);
    remap: frame i of T shows the source frame at the same fraction of the video,
    floor((i + 1/2) * N / T): frames repeated evenly when T > N, skipped evenly when T < N.
    """
    i = np.arange(n_out, dtype=np.int64)
    if sync_mode in ("bounce", "silence", "cut_off"):
        return pingpong_indices(i, n_video)  # = i while i < N
    if sync_mode == "loop":
        return i % n_video
    if sync_mode == "remap":
        return ((2 * i + 1) * n_video) // (2 * n_out)
    raise ValueError(f"unknown sync_mode {sync_mode!r}")


def frames_to_decode(sync_mode: str, *, n_video: int, n_held: int, n_audio: int, name: str = "the video") -> int:
    """How many source frames, from the first, a job decodes and tracks: N, but for a video that is
    mostly gaps.

    N is the video's duration x fps; ``n_held`` the frames the file holds (its packets; 0: unknown).
    A video whose timestamps lie far apart (two frames 590 s apart: 14,750 frames at 25 fps) holds
    far fewer than N, and the constant-rate decode fills the gaps with repeats. Its claimed duration
    does not set the work; the output does: the first A frames when the plan shows only those
    (bounce, loop, cut_off with N >= A: the plan is the same for N or A frames), all N when the output
    is about as long (silence; a video shorter than the audio), and InputTooLargeError (413) when the
    plan would spread a short output over a far longer run of repeats (remap). Every other video gets
    N: its face track stays the whole video's, as the avatar cache keeps it.
    """
    if not n_held or n_video <= GAP_REPEATS * n_held:
        return n_video
    n_out = output_length(sync_mode, n_video, n_audio)
    if sync_mode in ("bounce", "loop", "cut_off") and n_video >= n_audio:
        return n_audio
    if n_video <= GAP_REPEATS * n_out:
        return n_video
    raise InputTooLargeError(
        f"{name} holds {n_held:,} frames spread over {n_video:,} frame times (timestamps far apart): "
        f"sync_mode={sync_mode} would read all of them for {n_out:,} output frames; "
        "use a constant-frame-rate video or another sync mode")


def needs_random_access(sync_mode: str, n_video: int, n_audio: int) -> bool:
    """Whether the plan will show a frame after a later one (then the frames must be stored)."""
    return sync_mode in ("bounce", "loop", "silence") and n_audio > n_video


# --------------------------------------------------------------------------- segments


def frame_at(seconds: float | Fraction, fps: Fraction) -> int:
    """The first frame starting at or after `seconds` (frame i starts at i / fps)."""
    t = seconds if isinstance(seconds, Fraction) else Fraction(repr(float(seconds)))  # 0.04 is 1/25, exactly
    return math.ceil(t * fps)


@dataclass(frozen=True)
class SegmentFrames:
    start: int  # first output frame
    stop: int  # exclusive
    shift: int  # audio frame = output frame + shift (0: the audio on the video's timeline)


def segment_frames(segments: Sequence[Segment], fps: Fraction, n_out: int, n_audio: int) -> list[SegmentFrames]:
    """Segments as output frame ranges; InvalidInputError (400) for one that cannot be honoured.

    A segment's end past the end of the output is clipped to it; a start past it is an error,
    and so is a segment whose audio (from audio_start) runs past the end of the audio.
    """
    out: list[SegmentFrames] = []
    seconds = float(n_out / fps)
    for k, seg in enumerate(segments):
        start, stop = frame_at(seg.start, fps), min(frame_at(seg.end, fps), n_out)
        if start >= n_out:
            raise InvalidInputError(f"segments[{k}] starts at {seg.start:g} s, after the end of the output "
                                    f"({seconds:.3f} s)")
        if stop <= start:
            raise InvalidInputError(f"segments[{k}] ({seg.start:g}-{seg.end:g} s) holds no whole frame at "
                                    f"{float(fps):.3f} fps")
        shift = 0
        if seg.audio_start is not None:
            shift = frame_at(seg.audio_start, fps) - start
            if start + shift + (stop - start) > n_audio + AUDIO_END_TOLERANCE:
                raise InvalidInputError(
                    f"segments[{k}]'s audio (from {seg.audio_start:g} s, {float((stop - start) / fps):.3f} s long) "
                    f"runs past the end of the audio ({float(n_audio / fps):.3f} s)")
        out.append(SegmentFrames(start, stop, shift))
    return out


def audio_frames(n_out: int, segments: Sequence[SegmentFrames]) -> np.ndarray:
    """audio[i]: i on the video's timeline, shifted inside segments that start their audio elsewhere."""
    audio = np.arange(n_out, dtype=np.int64)
    for seg in segments:
        audio[seg.start : seg.stop] += seg.shift
    return audio


def inside_segments(n_out: int, segments: Sequence[SegmentFrames] | None) -> np.ndarray:
    if segments is None:
        return np.ones(n_out, dtype=bool)
    inside = np.zeros(n_out, dtype=bool)
    for seg in segments:
        inside[seg.start : seg.stop] = True
    return inside


# --------------------------------------------------------------------------- weights (cross-fades)


def _distance_to(mask: np.ndarray) -> np.ndarray:
    """Distance (in frames) from each frame to the nearest True frame; a large number if none."""
    n = len(mask)
    far = np.int64(2**40)
    where = np.flatnonzero(mask)
    if len(where) == 0:
        return np.full(n, far, dtype=np.int64)
    i = np.arange(n)
    right = np.searchsorted(where, i)  # index of the first True at or after i
    after = np.where(right < len(where), where[np.minimum(right, len(where) - 1)] - i, far)
    before = np.where(right > 0, i - where[np.maximum(right - 1, 0)], far)
    return np.minimum(after, before)


def fade_out_of(active: np.ndarray, fade: int) -> np.ndarray:
    """1 on active frames, ramping to 0 over `fade` frames outside them: 1 - d / (fade + 1).

    Used for speech: the mouth eases into and out of each silence, and every speech frame is
    fully generated. Frames further than `fade` from any active frame are exactly 0.
    """
    d = _distance_to(np.asarray(active, bool))
    return np.clip(1.0 - d / (fade + 1), 0.0, 1.0).astype(np.float32)


def fade_within(active: np.ndarray, fade: int) -> np.ndarray:
    """0 outside the active frames, ramping up to 1 over `fade` frames inside them: d / (fade + 1).

    Used for segments: the ramp lies inside the segment, so every frame outside is untouched.
    The output's own start and end are not edges (a segment from frame 0 is 1 at frame 0).
    """
    d = _distance_to(~np.asarray(active, bool))
    return np.clip(d / (fade + 1), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- the sound track


def sound_pieces(n_out: int, fps: Fraction, segments: Sequence[SegmentFrames] | None) -> tuple[AudioPiece, ...]:
    """The output's sound: the new audio on the output's timeline, except inside segments with their
    own audio start, which play the audio that drives their mouths. Covers [0, T / fps) exactly."""
    pieces: list[AudioPiece] = []

    def add(start: int, stop: int, shift: int) -> None:
        if stop <= start:
            return
        if pieces and pieces[-1].src_start - pieces[-1].out_start == Fraction(shift) / fps \
                and pieces[-1].out_start + pieces[-1].duration == start / fps:
            last = pieces.pop()  # same shift and adjacent: one piece
            pieces.append(AudioPiece(last.out_start, last.src_start, last.duration + (stop - start) / fps))
            return
        pieces.append(AudioPiece(Fraction(start) / fps, Fraction(start + shift) / fps, Fraction(stop - start) / fps))

    pos = 0
    for seg in segments or ():
        add(pos, seg.start, 0)
        add(seg.start, seg.stop, seg.shift)
        pos = seg.stop
    add(pos, n_out, 0)
    return tuple(pieces)


# --------------------------------------------------------------------------- the plan


def build_plan(params: JobParams, *, n_video: int, n_audio: int, fps: Fraction, has_face: np.ndarray,
               speech: np.ndarray | None = None, fade: int = DEFAULT_FADE_FRAMES,
               segment_face: Sequence[int | None] | None = None) -> RenderPlan:
    """The plan for one job.

    n_video: N, frames of the video (the face track's length); n_audio: A; has_face: [N] bool of the
    chosen face track, or [K, N]: one row per face the job dubs (segments with their own face);
    segment_face[k]: the row segment k dubs (None or absent: row 0, the job's face); speech: [A] bool
    per audio frame (speech.speech_frames), needed for silence=keep. Frames whose audio lies past the
    end of the new audio (sync_mode=silence's padded tail) are silence in both silence modes: there
    is no speech to drive them.
    """
    fps = Fraction(fps)
    has_face = np.atleast_2d(np.asarray(has_face, bool))
    if has_face.shape[1] != n_video:
        raise ValueError(f"face track of {has_face.shape[1]} frames for a video of {n_video}")
    n_out = output_length(params.sync_mode, n_video, n_audio)
    source = source_frames(params.sync_mode, n_out, n_video)
    segs = segment_frames(params.segments, fps, n_out, n_audio) if params.segments else None
    audio = audio_frames(n_out, segs or ())

    has_audio = audio < n_audio
    if params.silence == "keep":
        if speech is None:
            raise ValueError("silence=keep needs the speech activity of the audio")
        if len(speech) != n_audio:
            raise ValueError(f"speech flags for {len(speech)} audio frames, the audio has {n_audio}")
        talking = has_audio & np.asarray(speech, bool)[np.minimum(audio, n_audio - 1)]
    else:
        talking = has_audio
    weight = fade_out_of(talking, fade)
    if segs is not None:
        weight *= fade_within(inside_segments(n_out, segs), fade)
    face = np.zeros(n_out, np.int64)
    for seg, row in zip(segs or (), segment_face or ()):
        if row is not None:
            face[seg.start : seg.stop] = row
    generate = (weight > 0) & has_face[face, source]
    return RenderPlan(source=source, weight=weight, audio=audio, generate=generate, fps=fps, n_audio=n_audio,
                      sound=sound_pieces(n_out, fps, segs), face=face)


def check_segments(params: JobParams, *, n_video_estimate: int, n_audio: int, fps: Fraction) -> None:
    """Refuse (400) segments that cannot fit before any frame is decoded; the plan checks them exactly.

    The video's frame count is the probe's estimate here, so one frame of slack is allowed.
    """
    if params.segments:
        n_out = output_length(params.sync_mode, n_video_estimate + 1, n_audio)
        segment_frames(params.segments, Fraction(fps), n_out, n_audio)


# --------------------------------------------------------------------------- scratch space


def spools_frames(params: JobParams, *, n_video: int, n_audio: int, width: int, height: int,
                  max_spool_bytes: int, cold: bool = True) -> bool:
    """Whether the job keeps decoded frames in a frame store (scratch disk, frames x W x H x 3 bytes).

    Always when the plan goes back in the video (bounce, loop, silence with a longer audio). On a
    cold job (no cached face track) also when the store fits `max_spool_bytes`: the frames decoded
    to track faces are kept for the render instead of decoding the video a second time.
    """
    if needs_random_access(params.sync_mode, n_video, n_audio):
        return True
    return cold and store_bytes(n_video, width, height) <= max_spool_bytes


def scratch_bytes(params: JobParams, *, n_video: int, width: int, height: int, fps: Fraction, audio_seconds: float,
                  audio_rate: int, audio_channels: int, max_spool_bytes: int, cold: bool = True) -> int:
    """Scratch disk a job uses at most, for the disk reservation at admission: the frame store when
    it is used (frames x width x height x 3), plus the output's sound track when the plan lays it out
    anew (16-bit PCM at the audio's own rate and channels for the output's duration)."""
    fps = Fraction(fps)
    n_audio = math.floor(Fraction(repr(float(audio_seconds))) * fps)
    total = 0
    if spools_frames(params, n_video=n_video, n_audio=max(1, n_audio), width=width, height=height,
                     max_spool_bytes=max_spool_bytes, cold=cold):
        total += store_bytes(n_video, width, height)
    n_out = output_length(params.sync_mode, max(1, n_video), max(1, n_audio))
    shifted = any(s.audio_start is not None for s in params.segments or ())
    if n_out != n_audio or shifted:
        total += math.ceil(n_out / fps * audio_rate) * max(1, audio_channels) * 2 + 4096
    return total
