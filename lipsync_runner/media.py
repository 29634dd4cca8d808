"""ffmpeg-based media I/O: probing, validation, streaming decode and encode.

Everything goes through one static ffmpeg binary (the ``imageio-ffmpeg`` wheel, or
``$LIP_SYNC_FFMPEG``). There is no ffprobe in that wheel, so probing parses the
stream summary ffmpeg prints for ``-i PATH`` and complements it with two cheap
checks: decoding the first frame / a few audio samples (is the stream really
decodable?) and a demux-only packet scan (exact duration, truncation).

Frames never touch the disk: decoding streams raw RGB from ffmpeg's stdout and
encoding streams raw RGB into ffmpeg's stdin, so memory stays flat whatever the
video length. ffmpeg's stderr is drained on a thread into a bounded buffer (a
full stderr pipe would otherwise stall ffmpeg and deadlock us) and its last lines
become the message of a :class:`MediaProcessingError` when ffmpeg fails.

User-facing messages name the user's file by basename only (see ``errors.py``).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import threading
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Iterator, Sequence, Union

import numpy as np

from lipsync_runner.errors import InvalidInputError, MediaProcessingError

PathLike = Union[str, "os.PathLike[str]"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
AUDIO_EXTENSIONS = (".mp3", ".wav", ".m4a", ".aac", ".ogg")

# Probing reads the whole file once (packet scan); a minute covers multi-GB files.
PROBE_TIMEOUT_S = 60.0

# NTSC rates. ffmpeg prints rates rounded to 2 decimals ("29.97"); using that
# decimal as-is would drift by ~1 frame every 5.5 minutes against the audio.
NTSC_FRAME_RATES = tuple(Fraction(n, 1001) for n in (24000, 30000, 48000, 60000, 120000))
_NTSC_TOLERANCE = Fraction(1, 100)
_MAX_SANE_FPS = 240  # above this a "rate" is a timebase (e.g. "1k tbr" in WebM), not a frame rate

# Codecs that normally carry a single picture; as the only "frame" of an input
# they mean a still image was uploaded instead of a video.
_IMAGE_CODECS = frozenset(
    {"png", "mjpeg", "jpeg2000", "jpegls", "bmp", "webp", "tiff", "gif", "apng", "qoi", "ppm", "pgm", "pam"}
)

# Demuxer messages that mean the file stops before its index says it does.
_TRUNCATION_RE = re.compile(r"partial file|File ended prematurely|truncat", re.IGNORECASE)

_STDERR_TAIL_LINES = 6


# --------------------------------------------------------------------------- ffmpeg


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary: ``$LIP_SYNC_FFMPEG`` if set, else imageio-ffmpeg's."""
    override = os.environ.get("LIP_SYNC_FFMPEG")
    if override:
        resolved = shutil.which(override)  # accepts a path or a name on $PATH
        if resolved is None:
            raise MediaProcessingError("LIP_SYNC_FFMPEG does not name an executable ffmpeg")
        return resolved
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        raise MediaProcessingError(
            "no ffmpeg executable found (install imageio-ffmpeg or set LIP_SYNC_FFMPEG)"
        ) from None


def _name(path: PathLike) -> str:
    return os.path.basename(os.fspath(path))


def _url(path: PathLike) -> str:
    """An explicit file URL: a name like "x:y", "-x" or "a|b" must not read as a protocol or option."""
    return "file:" + os.path.abspath(os.fspath(path))


def _redact(text: str, paths: dict[str, str]) -> str:
    """Replace full paths by what the user knows them as, and drop ffmpeg's object addresses."""
    for full, shown in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(full, shown)
    return re.sub(r" @ 0x[0-9a-f]+", "", text)


def _path_aliases(path: PathLike, shown: str | None = None) -> dict[str, str]:
    p = os.fspath(path)
    shown = shown or _name(p)
    return {p: shown, os.path.abspath(p): shown, _url(p): shown}


# ffmpeg's follow-on chatter after the real error; dropped so the cause stays in the tail.
_STDERR_NOISE_RE = re.compile(
    r"Task finished with error code|Terminating thread with return code|Could not open encoder before EOF"
    r"|Nothing was written into output file|Last message repeated|Error sending frames to consumers"
    r"|Error (?:closing file|writing trailer)"
)


def _stderr_tail(lines: Sequence[str], paths: dict[str, str]) -> str:
    lines = [ln.strip() for ln in lines if ln.strip()]
    kept = [ln for ln in lines if not _STDERR_NOISE_RE.search(ln)] or lines
    kept = kept[-_STDERR_TAIL_LINES:]
    return _redact(" | ".join(kept), paths) or "no error output"


class _FfmpegProcess:
    """A running ffmpeg with a stderr drain thread and an optional wall-clock watchdog."""

    def __init__(
        self,
        args: list[str],
        *,
        what: str,
        paths: dict[str, str],
        timeout_s: float | None,
        stdin: int | IO[bytes] | None = subprocess.DEVNULL,
        stdout: int | IO[bytes] | None = subprocess.DEVNULL,
        watch: re.Pattern[str] | None = None,
    ) -> None:
        self.what = what  # e.g. "decoding input.mp4", used in error messages
        self.paths = paths
        self.timeout_s = timeout_s
        self.timed_out = False
        self.watch_hits: list[str] = []
        self._watch = watch
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        try:
            self.proc = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
        except OSError as exc:
            raise MediaProcessingError(f"could not start ffmpeg ({exc.strerror})") from None
        self._drain = threading.Thread(target=self._drain_stderr, name="ffmpeg-stderr", daemon=True)
        self._drain.start()
        self._timer: threading.Timer | None = None
        if timeout_s is not None:
            self._timer = threading.Timer(timeout_s, self._on_timeout)
            self._timer.daemon = True
            self._timer.start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self._tail.append(line)
            if self._watch is not None and self._watch.search(line) and len(self.watch_hits) < 10:
                self.watch_hits.append(line)

    def _on_timeout(self) -> None:
        self.timed_out = True
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def _reap(self) -> int:
        rc = self.proc.wait()
        self._drain.join(timeout=5)
        if self._timer is not None:
            self._timer.cancel()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:  # stdin flush into a dead ffmpeg
                    pass
        return rc

    def error(self, rc: int | None = None) -> MediaProcessingError:
        if self.timed_out:
            return MediaProcessingError(f"ffmpeg timed out after {self.timeout_s:g} s while {self.what}")
        code = f" (exit code {rc})" if rc is not None else ""
        return MediaProcessingError(
            f"ffmpeg failed while {self.what}{code}: {_stderr_tail(list(self._tail), self.paths)}"
        )

    def finish(self) -> None:
        """Wait for a normal exit; raise MediaProcessingError on failure or timeout."""
        rc = self._reap()
        if rc != 0 or self.timed_out:
            raise self.error(rc)

    def abort(self) -> None:
        """Kill and reap; never raises."""
        self.kill()
        self._reap()


def _run_capture(
    args: list[str], *, what: str, paths: dict[str, str], timeout_s: float | None
) -> subprocess.CompletedProcess[bytes]:
    """Run a short ffmpeg command whose outputs are small; both pipes are read concurrently."""
    try:
        return subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise MediaProcessingError(f"ffmpeg timed out after {timeout_s:g} s while {what}") from None
    except OSError as exc:
        raise MediaProcessingError(f"could not start ffmpeg ({exc.strerror})") from None


def _read_exact(stream: IO[bytes], view: memoryview) -> int:
    """Fill ``view`` from ``stream``; fewer bytes only at EOF (pipes return short reads)."""
    got = 0
    total = len(view)
    while got < total:
        n = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


# --------------------------------------------------------------------------- parsing


def exact_frame_rate(value: str | float | Fraction) -> Fraction:
    """Turn a printed/approximate rate into the exact rational the stream uses.

    Within 0.01 of an NTSC rate -> that rate (``"29.97"`` -> ``30000/1001``); otherwise
    the closest fraction with denominator <= 1001 (``"12.5"`` -> ``25/2``).
    """
    if isinstance(value, str):
        v = value.strip()
        f = Fraction(v[:-1]) * 1000 if v.endswith("k") else Fraction(v)
    else:
        f = Fraction(value)
    for ntsc in NTSC_FRAME_RATES:
        if abs(f - ntsc) <= _NTSC_TOLERANCE:
            return ntsc
    return f.limit_denominator(1001)


def _is_standard_rate(f: Fraction) -> bool:
    return f in NTSC_FRAME_RATES or f.denominator == 1


@dataclass(frozen=True)
class _Stream:
    kind: str  # "Video", "Audio", "Subtitle", "Data", "Attachment"
    desc: str  # the text after "Video: "
    extra: tuple[str, ...]  # indented Metadata / Side data lines that follow

    @property
    def codec(self) -> str:
        return self.desc.split()[0].rstrip(",") if self.desc.strip() else "unknown"

    @property
    def attached_pic(self) -> bool:  # cover art in mp3/m4a: a video stream that is not a video
        return "(attached pic)" in self.desc


@dataclass(frozen=True)
class _Header:
    opened: bool
    fmt: str
    duration: float | None
    streams: tuple[_Stream, ...]
    reason: str  # ffmpeg's last words when it could not open the file

    def first(self, kind: str) -> _Stream | None:
        for s in self.streams:
            if s.kind == kind and not (kind == "Video" and s.attached_pic):
                return s
        return None


_STREAM_RE = re.compile(r"^\s*Stream #0:\d+[^:]*: (Video|Audio|Subtitle|Data|Attachment): ?(.*)$")
_INPUT_RE = re.compile(r"^Input #0, (.+?), from '")
_DURATION_RE = re.compile(r"Duration: (?:(\d+):(\d+):(\d+(?:\.\d+)?)|N/A)")


def _parse_header(stderr: str) -> _Header:
    """Parse the "Input #0" summary that ``ffmpeg -i`` prints at info level."""
    fmt, duration = "", None
    streams: list[_Stream] = []
    cur: tuple[str, str, list[str]] | None = None
    opened = False
    for line in stderr.splitlines():
        if line.startswith(("Stream mapping:", "Output #", "Press [q]")):
            break  # what follows describes outputs, not the input
        if m := _INPUT_RE.match(line):
            opened, fmt = True, m.group(1)
            continue
        if not opened:
            continue
        if m := _STREAM_RE.match(line):
            if cur:
                streams.append(_Stream(cur[0], cur[1], tuple(cur[2])))
            cur = (m.group(1), m.group(2), [])
        elif cur and line.startswith("    "):
            cur[2].append(line.strip())
        elif (m := _DURATION_RE.search(line)) and m.group(1) is not None:
            h, mi, s = m.groups()
            duration = int(h) * 3600 + int(mi) * 60 + float(s)
    if cur:
        streams.append(_Stream(cur[0], cur[1], tuple(cur[2])))
    reason = ""
    if not opened:
        last = [ln for ln in stderr.splitlines() if ln.strip() and "output file" not in ln]
        reason = last[-1].rsplit(": ", 1)[-1].strip() if last else ""
    return _Header(opened, fmt, duration, tuple(streams), reason)


_SIZE_RE = re.compile(r"(?<![\w/])([1-9]\d*)x([1-9]\d*)(?=[\s,\[]|$)")
_RATE_RE = r"(\d+(?:\.\d+)?k?) "
_FPS_RE = re.compile(_RATE_RE + "fps")
_TBR_RE = re.compile(_RATE_RE + "tbr")
_DISPLAYMATRIX_RE = re.compile(r"display\s*matrix:\s*rotation of (-?\d+(?:\.\d+)?) degrees", re.IGNORECASE)
_ROTATE_TAG_RE = re.compile(r"^rotate\s*:\s*(-?\d+)")


def _rotation_cw(stream: _Stream) -> int:
    """Clockwise display rotation in degrees (0/90/180/270), like the legacy ``rotate`` tag.

    ffmpeg prints the display matrix angle counter-clockwise: a phone portrait video
    shows "rotation of -90.00 degrees" and needs a 90 degree clockwise turn.
    """
    for line in stream.extra:
        if m := _DISPLAYMATRIX_RE.search(line):
            return int(round(-float(m.group(1)) / 90.0)) * 90 % 360
        if m := _ROTATE_TAG_RE.match(line):
            return int(round(int(m.group(1)) / 90.0)) * 90 % 360
    return 0


_LAYOUT_CHANNELS = {
    "mono": 1, "stereo": 2, "downmix": 2, "quad": 4, "hexagonal": 6, "octagonal": 8,
    "hexadecagonal": 16, "cube": 8,
}  # fmt: skip


def _channel_count(desc: str) -> int:
    m = re.search(r"\d+ Hz, ([^,]+)", desc)
    if not m:
        return 0
    layout = m.group(1).strip()
    if n := re.match(r"(\d+) channels", layout):
        return int(n.group(1))
    base = layout.split("(")[0]
    if base in _LAYOUT_CHANNELS:
        return _LAYOUT_CHANNELS[base]
    if n := re.fullmatch(r"(\d+)\.(\d+)", base):  # "5.1" -> 6, "7.1" -> 8, "22.2" -> 24
        return int(n.group(1)) + int(n.group(2))
    return 0


def _parse_rate(regex: re.Pattern[str], desc: str) -> Fraction | None:
    m = regex.search(desc)
    if not m:
        return None
    f = exact_frame_rate(m.group(1))
    return f if 0 < f <= _MAX_SANE_FPS else None


@dataclass(frozen=True)
class _PacketScan:
    count: int
    duration: float | None  # span of the packets' presentation times
    truncated: bool


def _scan_packets(path: PathLike, stream_spec: str, *, what: str, timeout_s: float | None) -> _PacketScan:
    """Demux (no decode) one stream: exact packet count and duration, truncation check.

    Headers lie: WebM from browsers has no duration, raw AAC estimates it from the
    bitrate, and a truncated MP4 with its index up front still claims full length.
    """
    proc = _FfmpegProcess(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-i", _url(path),
         "-map", stream_spec, "-c", "copy", "-f", "framecrc", "-"],
        what=what, paths=_path_aliases(path), timeout_s=timeout_s,
        stdout=subprocess.PIPE, watch=_TRUNCATION_RE,
    )  # fmt: skip
    count = 0
    tb = Fraction(0)
    start: int | None = None
    end: int | None = None
    try:
        assert proc.proc.stdout is not None
        for raw in proc.proc.stdout:  # one line per packet: stream, dts, pts, duration, size, crc
            if raw.startswith(b"#"):
                if raw.startswith(b"#tb 0:"):
                    tb = Fraction(raw.split(b":", 1)[1].strip().decode())
                continue
            fields = raw.split(b",")
            if len(fields) < 5:
                continue
            count += 1
            dts, pts, dur = int(fields[1]), int(fields[2]), int(fields[3])
            t = pts if pts > -(2**62) else dts  # AV_NOPTS_VALUE prints as INT64_MIN
            start = t if start is None else min(start, t)
            end = t + dur if end is None else max(end, t + dur)
    except BaseException:
        proc.abort()
        raise
    proc.finish()
    duration = None
    if count and tb and start is not None and end is not None:
        # Packets before 0 are encoder priming (AAC) or reordering that decoding discards.
        duration = float((end - max(start, 0)) * tb)
    return _PacketScan(count, duration, bool(proc.watch_hits))


def _check_file(path: PathLike, kind: str) -> str:
    name = _name(path)
    p = os.fspath(path)
    if not os.path.exists(p):
        raise InvalidInputError(f"{name} does not exist")
    if not os.path.isfile(p):
        raise InvalidInputError(f"{name} is not a {kind} file: it is not a regular file")
    if os.path.getsize(p) == 0:
        raise InvalidInputError(f"{name} is not a {kind} file: it is empty")
    return name


def _open_and_decode(
    path: PathLike, output_args: list[str], *, what: str, timeout_s: float | None
) -> tuple[_Header, bytes]:
    """``ffmpeg -i PATH <output_args> pipe:1`` at info level: the input summary + a little decoded data."""
    res = _run_capture(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-i", _url(path), *output_args, "pipe:1"],
        what=what, paths=_path_aliases(path), timeout_s=timeout_s,
    )  # fmt: skip
    return _parse_header(res.stderr.decode("utf-8", "replace")), res.stdout


# --------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class VideoInfo:
    """A video stream as the decoder will deliver it.

    ``width``/``height`` are after autorotation (ffmpeg applies the display matrix
    when decoding), ``rotation`` is the clockwise turn that was applied.
    ``fps`` is exact (NTSC rates as n/1001) and is the constant rate VideoReader emits.
    """

    width: int
    height: int
    fps: Fraction
    duration: float
    frame_count_estimate: int
    codec: str
    has_audio: bool
    rotation: int


@dataclass(frozen=True)
class AudioInfo:
    duration: float
    sample_rate: int
    channels: int
    codec: str


def probe_video(path: PathLike, *, timeout_s: float | None = PROBE_TIMEOUT_S) -> VideoInfo:
    """Describe the first video stream; InvalidInputError if the file is not a usable video."""
    name = _check_file(path, "video")
    not_readable = f"{name} is not a readable video file"
    # Decoding one tiny grey frame proves the codec is supported and the data decodes.
    header, first_frame = _open_and_decode(
        path,
        ["-map", "0:V:0", "-frames:v", "1", "-vf", "scale=8:8", "-f", "rawvideo", "-pix_fmt", "gray"],
        what=f"probing {name}",
        timeout_s=timeout_s,
    )
    if not header.opened:
        raise InvalidInputError(f"{not_readable} ({header.reason})" if header.reason else not_readable)
    stream = header.first("Video")
    if stream is None:
        raise InvalidInputError(f"{name} is not a video file: it has no video stream")
    is_image_demuxer = header.fmt == "image2" or header.fmt.endswith("_pipe")
    if is_image_demuxer:  # png/jpeg/... renamed to .mp4: ffmpeg detects the content, not the name
        raise InvalidInputError(f"{name} is not a video file: it is a still image ({stream.codec})")
    size = _SIZE_RE.search(stream.desc)
    if size is None:
        raise InvalidInputError(f"{not_readable}: its video stream has no frame size")
    if len(first_frame) != 64:
        raise InvalidInputError(f"{not_readable}: its {stream.codec} video stream could not be decoded")

    scan = _scan_packets(path, "0:V:0", what=f"probing {name}", timeout_s=timeout_s)
    if scan.truncated:
        raise InvalidInputError(f"{not_readable}: it is truncated or corrupt")
    if scan.count <= 1 and stream.codec in _IMAGE_CODECS:
        raise InvalidInputError(f"{name} is not a video file: it is a still image ({stream.codec})")

    duration = scan.duration if scan.duration else header.duration
    if not duration or duration <= 0:
        raise InvalidInputError(f"{not_readable}: its duration is unknown")

    # Prefer whichever of the average rate ("fps") and the base rate ("tbr") is a
    # standard rate: for phone VFR clips "fps" is an odd average (29.83) while "tbr"
    # is the nominal 30. Missing/absurd values (WebM's "1k tbr") fall back to the
    # measured packet rate.
    candidates = [r for r in (_parse_rate(_FPS_RE, stream.desc), _parse_rate(_TBR_RE, stream.desc)) if r]
    fps = next((r for r in candidates if _is_standard_rate(r)), candidates[0] if candidates else None)
    if fps is None and scan.count > 1:
        fps = exact_frame_rate(scan.count / duration)
    if fps is None or fps <= 0:
        raise InvalidInputError(f"{not_readable}: its frame rate is unknown")

    width, height = int(size.group(1)), int(size.group(2))
    rotation = _rotation_cw(stream)
    if rotation in (90, 270):
        width, height = height, width
    return VideoInfo(
        width=width,
        height=height,
        fps=fps,
        duration=duration,
        frame_count_estimate=max(1, round(duration * fps)),
        codec=stream.codec,
        has_audio=header.first("Audio") is not None,
        rotation=rotation,
    )


def probe_audio(path: PathLike, *, timeout_s: float | None = PROBE_TIMEOUT_S) -> AudioInfo:
    """Describe the first audio stream (of an audio or a video file); InvalidInputError if unusable."""
    name = _check_file(path, "audio")
    header, samples = _open_and_decode(
        path,
        ["-map", "0:a:0", "-t", "0.1", "-ac", "1", "-f", "s16le"],
        what=f"probing {name}",
        timeout_s=timeout_s,
    )
    if not header.opened:
        msg = f"{name} is not a readable audio file"
        raise InvalidInputError(f"{msg} ({header.reason})" if header.reason else msg)
    stream = header.first("Audio")
    if stream is None:
        raise InvalidInputError(f"{name} has no audio stream")
    rate = re.search(r"(\d+) Hz", stream.desc)
    if rate is None or not samples:
        raise InvalidInputError(f"{name} is not a readable audio file: its {stream.codec} audio could not be decoded")
    scan = _scan_packets(path, "0:a:0", what=f"probing {name}", timeout_s=timeout_s)
    if scan.truncated:
        raise InvalidInputError(f"{name} is not a readable audio file: it is truncated or corrupt")
    duration = scan.duration if scan.duration else header.duration
    if not duration or duration <= 0:
        raise InvalidInputError(f"{name} is not a readable audio file: its duration is unknown")
    return AudioInfo(
        duration=duration, sample_rate=int(rate.group(1)), channels=_channel_count(stream.desc), codec=stream.codec
    )


def decode_audio(path: PathLike, sample_rate: int = 16000, *, timeout_s: float | None = None) -> np.ndarray:
    """The first audio stream as float32 mono samples in [-1, 1] at ``sample_rate`` Hz."""
    name = _name(path)
    probe_audio(path)  # a bad upload is the user's error (400), not a processing failure (500)
    proc = _FfmpegProcess(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-i", _url(path),
         "-map", "0:a:0", "-vn", "-sn", "-dn", "-ac", "1", "-ar", str(int(sample_rate)),
         "-c:a", "pcm_f32le", "-f", "f32le", "pipe:1"],
        what=f"decoding the audio of {name}", paths=_path_aliases(path), timeout_s=timeout_s,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    data = bytearray()
    try:
        assert proc.proc.stdout is not None
        while chunk := proc.proc.stdout.read(1 << 20):
            data += chunk
    except BaseException:
        proc.abort()
        raise
    proc.finish()
    usable = len(data) - len(data) % 4
    if usable == 0:
        raise InvalidInputError(f"{name} contains no audio samples")
    audio = np.frombuffer(data, dtype="<f4", count=usable // 4).astype(np.float32, copy=False)
    # Decoders (mp3, aac) can overshoot full scale slightly; callers expect [-1, 1].
    return np.clip(audio, -1.0, 1.0, out=audio)


# --------------------------------------------------------------------------- reading


class VideoReader:
    """Stream RGB frames ([H, W, 3] uint8) of a video at its probed constant frame rate.

    ffmpeg resamples to CFR (duplicating/dropping frames of VFR input) so frame ``i``
    is at ``i / fps`` seconds, in step with the audio. Frames are read straight from
    ffmpeg's stdout into numpy buffers; nothing is retained between reads.

    ``timeout_s`` bounds the wall-clock life of the decode, including the time the
    caller spends between reads; on expiry ffmpeg is killed and the next read raises
    MediaProcessingError.
    """

    def __init__(self, path: PathLike, info: VideoInfo | None = None, *, timeout_s: float | None = None,
                 hwaccel: str | None = None) -> None:
        self.path = os.fspath(path)
        self.info = info if info is not None else probe_video(path)
        self.width, self.height = self.info.width, self.info.height
        self._frame_bytes = self.width * self.height * 3
        fps = self.info.fps
        self._eof = False
        self._closed = False
        # hwaccel (e.g. "cuda": NVDEC, see hwcodecs.py) decodes on the GPU where it can; the frames
        # come back to system memory, and a stream the GPU cannot decode falls back to software.
        hw = ["-hwaccel", hwaccel] if hwaccel else []
        self._ff = _FfmpegProcess(
            [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", *hw, "-i", _url(self.path),
             "-map", "0:V:0", "-an", "-sn", "-dn",
             # Pin the size to the probe: a mid-stream resolution change must not shear frames.
             "-vf", f"scale={self.width}:{self.height}",
             "-fps_mode", "cfr", "-r", f"{fps.numerator}/{fps.denominator}",
             "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"],
            what=f"decoding {_name(path)}", paths=_path_aliases(path), timeout_s=timeout_s,
            stdout=subprocess.PIPE,
        )  # fmt: skip

    def _fill(self, view: memoryview) -> int:
        """Read whole frames into ``view``; returns the number of frames read."""
        if self._eof or self._closed:
            return 0
        assert self._ff.proc.stdout is not None
        got = _read_exact(self._ff.proc.stdout, view)
        if got < len(view):  # EOF: a trailing partial frame is dropped
            self._eof = True
            self._ff.finish()  # raises if ffmpeg failed or timed out
        return got // self._frame_bytes

    def read_chunk(self, n: int) -> np.ndarray:
        """Up to ``n`` next frames as [k, H, W, 3]; k == 0 once the video is exhausted."""
        if n <= 0:
            raise ValueError("n must be positive")
        buf = np.empty((n, self.height, self.width, 3), dtype=np.uint8)
        k = self._fill(memoryview(buf).cast("B"))
        return buf[:k]

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            frame = np.empty((self.height, self.width, 3), dtype=np.uint8)
            if self._fill(memoryview(frame).cast("B")) == 0:
                return
            yield frame

    def close(self) -> None:
        """Stop decoding; kills ffmpeg if the video was not read to the end."""
        if self._closed:
            return
        self._closed = True
        self._ff.abort()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # last resort against orphaned ffmpeg processes
        try:
            if not self._closed:
                self._ff.kill()
        except Exception:
            pass


# --------------------------------------------------------------------------- writing

_MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}

# x264 preset -> NVENC preset (p1 fastest .. p7 best) of about the same place on the speed scale.
_NVENC_PRESETS = {"ultrafast": "p1", "superfast": "p1", "veryfast": "p2", "faster": "p3", "fast": "p4",
                  "medium": "p5", "slow": "p6", "slower": "p7", "veryslow": "p7", "placebo": "p7"}


def _video_codec_args(codec: str, preset: str, crf: int) -> list[str]:
    """Encoder options: x264 preset + CRF, or NVENC's constant-quality mode at the same number."""
    if codec == "libx264":
        return ["-c:v", "libx264", "-preset", preset, "-crf", str(int(crf))]
    if codec == "h264_nvenc":
        return ["-c:v", "h264_nvenc", "-preset", _NVENC_PRESETS.get(preset, "p4"), "-tune", "hq",
                "-rc", "vbr", "-cq", str(int(crf)), "-b:v", "0"]
    raise ValueError(f"unsupported video encoder {codec!r} (libx264, h264_nvenc)")


class VideoWriter:
    """Encode RGB frames to H.264 (yuv420p) with an optional AAC audio track.

    * ``fps`` is passed to ffmpeg as an exact rational, so 30000/1001 stays 29.97
      for the whole file instead of drifting against the audio.
    * yuv420p needs even dimensions: an odd width/height is padded by one black
      pixel on the right/bottom (161x121 in -> 162x122 out).
    * ``audio_path``: its first audio stream is muxed (re-encoded to AAC) untrimmed;
      the output lasts as long as the longer of video and audio (no ``-shortest``:
      cutting the audio to the video would hide a frame-count bug as lost speech).
    * Output goes to a hidden temporary file next to ``path`` and is renamed into
      place only by a successful :meth:`close`; an exception inside the ``with``
      block (or a failed ffmpeg) kills ffmpeg and leaves no file behind.
    * ``timeout_s`` bounds the writer's wall-clock life, caller time included.
    * ``codec``: ``libx264`` (``preset``, ``crf``) or ``h264_nvenc`` (the preset mapped to NVENC's
      p1..p7, ``crf`` as its constant-quality level; see hwcodecs.py); ``threads``: encoder
      threads (None: ffmpeg's choice).
    """

    def __init__(
        self,
        path: PathLike,
        width: int,
        height: int,
        fps: Fraction,
        *,
        audio_path: PathLike | None = None,
        crf: int = 18,
        preset: str = "veryfast",
        timeout_s: float | None = None,
        codec: str = "libx264",
        threads: int | None = None,
    ) -> None:
        if int(width) <= 0 or int(height) <= 0:
            raise ValueError(f"invalid frame size {width}x{height}")
        fps = Fraction(fps)
        if fps <= 0:
            raise ValueError(f"invalid frame rate {fps}")
        out = Path(path)
        muxer = _MUXERS.get(out.suffix.lower())
        if muxer is None:
            raise ValueError(f"unsupported output container {out.suffix!r}; use one of {sorted(_MUXERS)}")
        if audio_path is not None:
            probe_audio(audio_path)  # reject a bad audio file before any encoding work
        self.path = out
        self.width, self.height, self.fps = int(width), int(height), fps
        self.frames_written = 0
        self._closed = False
        self._tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.part")

        args = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y",
                "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}",
                "-r", f"{fps.numerator}/{fps.denominator}", "-i", "pipe:0"]  # fmt: skip
        if audio_path is not None:
            args += ["-i", _url(audio_path)]
        args += ["-map", "0:v:0"]
        if audio_path is not None:
            args += ["-map", "1:a:0"]
        args += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", *_video_codec_args(codec, preset, crf), "-pix_fmt", "yuv420p"]
        if threads and codec == "libx264":
            args += ["-threads", str(int(threads))]
        if audio_path is not None:
            args += ["-c:a", "aac", "-b:a", "128k"]
        if muxer in ("mp4", "mov"):
            args += ["-movflags", "+faststart"]  # index up front: playback starts before download ends
        args += ["-f", muxer, _url(self._tmp)]

        paths = _path_aliases(self._tmp, out.name) | _path_aliases(out)
        if audio_path is not None:
            paths |= _path_aliases(audio_path)
        self._ff = _FfmpegProcess(
            args, what=f"encoding {out.name}", paths=paths, timeout_s=timeout_s, stdin=subprocess.PIPE
        )

    def write(self, frames: np.ndarray) -> None:
        """Append one frame [H, W, 3] or a batch [B, H, W, 3] of uint8 RGB."""
        if self._closed:
            raise ValueError("write() on a closed VideoWriter")
        arr = np.asarray(frames)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"expected frames of shape [H, W, 3] = [{self.height}, {self.width}, 3], got {arr.shape}")
        if arr.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames, got {arr.dtype}")
        if arr.shape[0] == 0:
            return
        arr = np.ascontiguousarray(arr)
        assert self._ff.proc.stdin is not None
        try:
            self._ff.proc.stdin.write(memoryview(arr).cast("B"))
        except (BrokenPipeError, OSError):  # ffmpeg died (bad option, disk full, timeout)
            self._fail()
        self.frames_written += arr.shape[0]

    def _fail(self) -> None:
        self._closed = True
        self._ff.abort()
        self._remove_tmp()
        raise self._ff.error(self._ff.proc.returncode) from None

    def _remove_tmp(self) -> None:
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Finish encoding and move the file into place; raises MediaProcessingError on failure."""
        if self._closed:
            return
        if self.frames_written == 0:
            self.abort()
            raise MediaProcessingError(f"no frames were written to {self.path.name}")
        self._closed = True
        try:
            assert self._ff.proc.stdin is not None
            try:
                self._ff.proc.stdin.close()  # EOF tells ffmpeg to flush and write the trailer
            except (BrokenPipeError, OSError):
                pass  # finish() reports why ffmpeg went away
            self._ff.finish()
            os.replace(self._tmp, self.path)
        except BaseException:
            self._ff.abort()
            self._remove_tmp()
            raise

    def abort(self) -> None:
        """Kill ffmpeg and discard the partial output; never raises."""
        self._closed = True
        self._ff.abort()
        self._remove_tmp()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __del__(self) -> None:  # an unclosed writer is an abandoned one
        try:
            if not self._closed:
                self.abort()
        except Exception:
            pass
