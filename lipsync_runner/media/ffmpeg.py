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

Inputs are untrusted, so nothing a file says about itself is taken as a bound:

* Only the demuxers of the formats we accept are ever run (``-format_whitelist``, then
  ``-f <detected demuxer>`` on every later call), and only the ``file`` protocol: a text
  playlist (concat, HLS, ...) is refused whatever its name, before it opens anything.
* Probing reads ffmpeg's stderr as a stream with a byte cap (a file can make ffmpeg print
  hundreds of MB of metadata), and every probe step shares one deadline.
* Decoding counts what really comes out (audio samples, video frames) against
  :class:`MediaLimits` and stops ffmpeg with :class:`InputTooLargeError` (413) the moment
  it passes them: durations in headers and packet timestamps are the uploader's to edit.
* Frame size is bounded before any frame is decoded: every ffmpeg that opens an upload gets
  ffmpeg's own ``-max_pixels`` (a decoder refuses a larger picture when it opens, before it
  allocates one; an input read for its sound decodes no picture at all), the probe refuses a
  size over the limit from the stream's header (413), and a probe's ffmpeg runs under a
  memory rlimit. A 1.6 MB file of two 16000x16000 frames used to cost 1.5 GB per probe.
"""

from __future__ import annotations

import collections
import math
import os
import re
import resource
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Callable, Iterator, Sequence, Union

import numpy as np

from lipsync_runner.config import MediaSettings
from lipsync_runner.errors import InputTooLargeError, InvalidInputError, MediaProcessingError, ProbeTimeoutError
from lipsync_runner.media.hls import HlsOutput, SegmentPublisher, tee_escape

PathLike = Union[str, "os.PathLike[str]"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
AUDIO_EXTENSIONS = (".mp3", ".wav", ".m4a", ".aac", ".ogg")

# Probing reads the whole file once (packet scan); a minute covers multi-GB files.
PROBE_TIMEOUT_S = 60.0

# Memory a probe's ffmpeg may use (RLIMIT_DATA): this much plus PROBE_BYTES_PER_PIXEL per pixel of its
# decoders' cap (a decoder holds its reference frames, up to 16, at up to 6 bytes a pixel). A probe of an
# allowed file uses well under 200 MB; the rlimit is the last bound should a decoder ignore the cap.
PROBE_MEMORY_BYTES = 2 << 30
PROBE_BYTES_PER_PIXEL = 64
# -max_pixels for an input read only for its sound (a cover picture, a video track): no picture is decoded.
AUDIO_INPUT_MAX_PIXELS = 1

# The demuxers of the accepted formats (ffmpeg's names; "mov" also reads mp4/m4a, "matroska"
# webm). Everything else is refused by content, whatever the file is called: above all the
# text demuxers that open other files or URLs (concat, ffconcat, hls, sdp, subtitles, tty,
# image2 patterns ...).
DEMUXER_LABELS = {"mov": "MP4/MOV/M4A", "matroska": "MKV/WebM", "avi": "AVI", "mp3": "MP3", "wav": "WAV",
                  "aac": "AAC (ADTS)", "ogg": "Ogg"}
VIDEO_DEMUXERS = ("mov", "matroska", "avi")
AUDIO_DEMUXERS = ("mp3", "wav", "aac", "ogg", *VIDEO_DEMUXERS)  # or a video's sound track

# Probe output caps. A legitimate "Input #0" summary is a few KB; a file whose metadata
# makes it longer than this is refused instead of being parsed. Lines are cut at
# _MAX_LINE_BYTES so one line without a newline cannot grow without bound either.
PROBE_STDERR_CAP_BYTES = 1 << 20
PROBE_STDOUT_CAP_BYTES = 1 << 20
_MAX_LINE_BYTES = 8192

# Decoded audio may run this much past the limit: encoder priming and padding (AAC, MP3)
# add a few tens of ms to what the container declares.
AUDIO_LIMIT_SLACK_S = 0.5
# Real audio is sampled at 8-192 kHz (768 kHz at the very most). A header claiming 1 GHz makes
# the resampler to 16 kHz spin for minutes to produce nothing; 1 Hz turns seconds into days.
AUDIO_SAMPLE_RATES = range(1000, 768_001)
DEFAULT_MAX_FPS = 120

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
    override = MediaSettings().ffmpeg  # read per call: tests and tools point it elsewhere
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


def decoder_max_pixels(max_pixels: int | None) -> int | None:
    """ffmpeg's ``-max_pixels`` for a frame-size limit. Decoders check the padded picture (width
    aligned to 64, macroblock rows) and a stream may grow mid-way (VideoReader scales it to the probed
    size), so twice the limit plus 1 MP: still a small fraction of a 16000x16000 bomb."""
    return None if max_pixels is None else min(2 * max_pixels + (1 << 20), 2**31 - 1)


def _probe_memory(cap: int | None) -> int | None:
    """RLIMIT_DATA of a probe's ffmpeg whose decoders are capped at ``cap`` pixels (None: no cap, no limit)."""
    return None if cap is None else PROBE_MEMORY_BYTES + PROBE_BYTES_PER_PIXEL * cap


def _stderr_tail(lines: Sequence[str], paths: dict[str, str]) -> str:
    lines = [ln.strip() for ln in lines if ln.strip()]
    kept = [ln for ln in lines if not _STDERR_NOISE_RE.search(ln)] or lines
    kept = kept[-_STDERR_TAIL_LINES:]
    return _redact(" | ".join(kept), paths) or "no error output"


class _FfmpegProcess:
    """A running ffmpeg with a stderr drain thread and an optional wall-clock watchdog.

    stderr is read line by line with every line cut at _MAX_LINE_BYTES and only the last
    lines kept, so its memory is bounded whatever ffmpeg prints. ``head_cap`` > 0 also keeps
    the first lines, up to that many bytes, until a line matches ``head_end``; if the cap is
    reached first, ffmpeg is killed (``head_overflow``): the caller cannot use a head it
    cannot read whole, and ffmpeg printing more of it only costs time.

    ``memory``: RLIMIT_DATA for ffmpeg, in bytes (what it may write, unlike RLIMIT_AS, which also
    counts the address space that thread stacks and malloc arenas reserve and grows with the cores).
    ``timeout_error``: the error a timeout raises (default: MediaProcessingError, 500).
    """

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
        head_cap: int = 0,
        head_end: re.Pattern[str] | None = None,
        memory: int | None = None,
        timeout_error: Callable[[], MediaProcessingError] | None = None,
    ) -> None:
        self.what = what  # e.g. "decoding input.mp4", used in error messages
        self.paths = paths
        self.timeout_s = timeout_s
        self.timed_out = False
        self._timeout_error = timeout_error
        self.watch_hits: list[str] = []
        self._watch = watch
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self.head: list[str] = []
        self.head_overflow = False
        self._head_cap = head_cap
        self._head_end = head_end
        self._head_open = head_cap > 0
        self._head_bytes = 0
        try:
            self.proc = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
        except OSError as exc:
            raise MediaProcessingError(f"could not start ffmpeg ({exc.strerror})") from None
        if memory is not None:
            # Set on the child right after it starts (prlimit), not in a preexec_fn: that would make
            # Popen fork the whole multi-threaded API process instead of spawning. ffmpeg allocates its
            # frames only once it has read the input's headers, well after this.
            try:
                resource.prlimit(self.proc.pid, resource.RLIMIT_DATA, (memory, memory))
            except (ProcessLookupError, PermissionError, OSError):
                pass  # it has exited already (its exit status says why), or no limits here
        self._drain = threading.Thread(target=self._drain_stderr, name="ffmpeg-stderr", daemon=True)
        self._drain.start()
        self._timer: threading.Timer | None = None
        if timeout_s is not None:
            self._timer = threading.Timer(timeout_s, self._on_timeout)
            self._timer.daemon = True
            self._timer.start()

    def _drain_stderr(self) -> None:
        stream = self.proc.stderr
        assert stream is not None
        while raw := stream.readline(_MAX_LINE_BYTES):
            size, rest = len(raw), raw
            while not rest.endswith(b"\n") and len(rest) == _MAX_LINE_BYTES:  # drop the rest of a long line
                self._count_head(size)
                rest = stream.readline(_MAX_LINE_BYTES)
                size += len(rest)
            line = raw.decode("utf-8", "replace").rstrip()
            self._tail.append(line)
            if self._count_head(size):
                self._head_bytes += size
                self.head.append(line)
                if self._head_end is not None and self._head_end.search(line):
                    self._head_open = False
            if self._watch is not None and self._watch.search(line) and len(self.watch_hits) < 10:
                self.watch_hits.append(line)

    def _count_head(self, size: int) -> bool:
        """Whether a line of ``size`` bytes still belongs to the head; past the cap, stop ffmpeg."""
        if not self._head_open:
            return False
        if self._head_bytes + size > self._head_cap:
            self._head_open = False
            self.head_overflow = True
            self.kill()
            return False
        return True

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
            if self._timeout_error is not None:
                return self._timeout_error()
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
    oversize: tuple[int, int] | None = None  # a picture size a decoder refused (-max_pixels) while opening

    def first(self, kind: str) -> _Stream | None:
        for s in self.streams:
            if s.kind == kind and not (kind == "Video" and s.attached_pic):
                return s
        return None


_STREAM_RE = re.compile(r"^\s*Stream #0:\d+[^:]*: (Video|Audio|Subtitle|Data|Attachment): ?(.*)$")
_INPUT_RE = re.compile(r"^Input #0, (.+?), from '")
_DURATION_RE = re.compile(r"Duration: (?:(\d+):(\d+):(\d+(?:\.\d+)?)|N/A)")
_HEADER_END_RE = re.compile(r"Stream mapping:|Output #|Press \[q\]")  # what follows describes outputs
# A decoder refusing a picture over -max_pixels when it opens. The stream's line then has no size.
_OVERSIZE_RE = re.compile(r"Picture size (\d+)x(\d+) exceeds specified max pixel count")


def _parse_header(lines: Sequence[str]) -> _Header:
    """Parse the "Input #0" summary that ``ffmpeg -i`` prints at info level (its stderr lines)."""
    fmt, duration = "", None
    streams: list[_Stream] = []
    cur: tuple[str, str, list[str]] | None = None
    opened = False
    oversize: tuple[int, int] | None = None
    for line in lines:
        if _HEADER_END_RE.match(line):
            break  # what follows describes outputs, not the input
        if oversize is None and (m := _OVERSIZE_RE.search(line)):
            oversize = (int(m.group(1)), int(m.group(2)))
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
        last = [ln for ln in lines if ln.strip() and "output file" not in ln]
        reason = last[-1].rsplit(": ", 1)[-1].strip() if last else ""
    return _Header(opened, fmt, duration, tuple(streams), reason, oversize)


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


class _Deadline:
    """One time budget shared by the steps of a probe (each ffmpeg gets what is left)."""

    def __init__(self, timeout_s: float | None, what: str) -> None:
        self.timeout_s = timeout_s
        self.what = what
        self._end = None if timeout_s is None else time.monotonic() + timeout_s

    def left(self) -> float | None:
        if self._end is None:
            return None
        left = self._end - time.monotonic()
        if left <= 0:
            raise self.expired()
        return left

    def expired(self) -> ProbeTimeoutError:
        """The error of a step that ran out of the probe's time (it names the whole budget)."""
        return ProbeTimeoutError(f"ffmpeg timed out after {self.timeout_s:g} s while {self.what}")


def input_args(path: PathLike, demuxer: str, allowed: Sequence[str] = VIDEO_DEMUXERS, *,
               max_pixels: int | None = None) -> list[str]:
    """``-i`` for an untrusted file: the file protocol only, whitelisted demuxers, and ``-f`` with
    the probed demuxer (VideoInfo.demuxer / AudioInfo.demuxer). Every ffmpeg call on an upload
    takes its input through this.

    ``max_pixels``: ffmpeg's ``-max_pixels`` for every decoder of the input, the ones ffmpeg opens
    to probe the streams included (``decoder_max_pixels`` of a frame limit). An input read for its
    sound (``allowed`` = AUDIO_DEMUXERS) gets AUDIO_INPUT_MAX_PIXELS unless told otherwise: its
    pictures, if any, are never needed, and each would be decoded at full size while ffmpeg probes."""
    if max_pixels is None and tuple(allowed) == AUDIO_DEMUXERS:
        max_pixels = AUDIO_INPUT_MAX_PIXELS
    forced = ["-f", demuxer] if demuxer else []
    cap = ["-max_pixels", str(max_pixels)] if max_pixels is not None else []
    return ["-protocol_whitelist", "file", "-format_whitelist", ",".join(allowed), *forced, *cap, "-i", _url(path)]


@dataclass(frozen=True)
class _PacketScan:
    count: int
    duration: float | None  # span of the packets' presentation times
    truncated: bool


def _scan_packets(path: PathLike, stream_spec: str, demuxer: str, allowed: Sequence[str], deadline: _Deadline,
                  max_pixels: int | None) -> _PacketScan:
    """Demux (no decode) one stream: exact packet count and duration, truncation check.

    Headers lie: WebM from browsers has no duration, raw AAC estimates it from the
    bitrate, and a truncated MP4 with its index up front still claims full length.
    (Packet timestamps can lie too; decoding counts real samples, see decode_audio.)
    """
    proc = _FfmpegProcess(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error",
         *input_args(path, demuxer, allowed, max_pixels=max_pixels),
         "-map", stream_spec, "-c", "copy", "-f", "framecrc", "-"],
        what=deadline.what, paths=_path_aliases(path), timeout_s=deadline.left(),
        stdout=subprocess.PIPE, watch=_TRUNCATION_RE, memory=_probe_memory(max_pixels),
        timeout_error=deadline.expired,
    )  # fmt: skip
    count = 0
    tb = Fraction(0)
    start: int | None = None
    end: int | None = None
    try:
        assert proc.proc.stdout is not None
        # One line per packet: stream, dts, pts, duration, size, crc. The watchdog bounds this
        # loop too: killing ffmpeg ends the stream.
        while raw := proc.proc.stdout.readline(_MAX_LINE_BYTES):
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


_NOT_WHITELISTED_RE = re.compile(r"Format not on whitelist")
_PROBED_RE = re.compile(r"Format (\S+) (?:probed with size=|detected only with low score)")


def _detected_demuxer(path: PathLike, allowed: Sequence[str], deadline: _Deadline, max_pixels: int | None) -> str:
    """The demuxer ffmpeg picks for a file it refused as not whitelisted (a debug-level rerun
    that stops right after the format probe)."""
    proc = _FfmpegProcess(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "debug", *input_args(path, "", allowed, max_pixels=max_pixels)],
        what=deadline.what, paths=_path_aliases(path), timeout_s=deadline.left(),
        head_cap=64 * 1024, head_end=_NOT_WHITELISTED_RE, memory=_probe_memory(max_pixels),
    )  # fmt: skip
    try:
        proc._reap()  # it stops right after the probe; the watchdog bounds it anyway
    finally:
        proc.abort()
    found = [m.group(1) for ln in proc.head if (m := _PROBED_RE.search(ln))]
    return found[-1] if found else "unknown"


def _refuse_demuxer(name: str, kind: str, demuxer: str, allowed: Sequence[str]) -> InvalidInputError:
    if demuxer == "image2" or demuxer.endswith("_pipe"):  # png/jpeg/... renamed to .mp4
        codec = demuxer.removesuffix("_pipe") if demuxer != "image2" else "image"
        if kind == "video":
            return InvalidInputError(f"{name} is not a video file: it is a still image ({codec})")
        return InvalidInputError(f"{name} is not an audio file: it is a still image ({codec})")
    if kind == "video" and demuxer in AUDIO_DEMUXERS:  # an mp3/wav/... given as the video
        label = DEMUXER_LABELS[demuxer]
        return InvalidInputError(f"{name} is not a video file: it has no video stream ({label} audio)")
    accepted = ", ".join(DEMUXER_LABELS[d] for d in allowed)
    return InvalidInputError(
        f"{name} is not a supported {kind} file: its content is in the '{demuxer}' format (accepted: {accepted})")


def _open_and_decode(
    path: PathLike, kind: str, allowed: Sequence[str], output_args: list[str], deadline: _Deadline,
    max_pixels: int | None,
) -> tuple[_Header, bytes, str]:
    """``ffmpeg -i PATH <output_args> pipe:1`` at info level: the input summary, a little decoded
    data and the demuxer to name on later calls. Refuses (400) a demuxer off the whitelist,
    and a summary longer than PROBE_STDERR_CAP_BYTES (it is not parsed, and ffmpeg is stopped).
    ``max_pixels``: the decoders' cap (input_args); one decoder thread, so the memory a probe
    needs does not grow with the cores (its rlimit does not either)."""
    name = _name(path)
    proc = _FfmpegProcess(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-threads", "1",
         *input_args(path, "", allowed, max_pixels=max_pixels), *output_args, "pipe:1"],
        what=deadline.what, paths=_path_aliases(path), timeout_s=deadline.left(), stdout=subprocess.PIPE,
        head_cap=PROBE_STDERR_CAP_BYTES, head_end=_HEADER_END_RE, memory=_probe_memory(max_pixels),
        timeout_error=deadline.expired,
    )  # fmt: skip
    try:
        assert proc.proc.stdout is not None
        data = proc.proc.stdout.read(PROBE_STDOUT_CAP_BYTES)  # the output args keep it small; never trust that
    finally:
        proc.abort()  # done reading: whatever ffmpeg still does is not needed
    if proc.timed_out:
        raise proc.error()
    if proc.head_overflow:
        raise InvalidInputError(
            f"{name} is not a readable {kind} file: its header is too large (over "
            f"{PROBE_STDERR_CAP_BYTES // 1024} KB of metadata, chapters or streams)")
    if any(_NOT_WHITELISTED_RE.search(ln) for ln in proc.head):
        raise _refuse_demuxer(name, kind, _detected_demuxer(path, allowed, deadline, max_pixels), allowed)
    header = _parse_header(proc.head)
    demuxer = header.fmt.split(",")[0] if header.opened else ""
    if header.opened and demuxer not in allowed:  # the whitelist matched another name of a demuxer
        raise _refuse_demuxer(name, kind, demuxer, allowed)
    return header, data, demuxer


# --------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class VideoInfo:
    """A video stream as the decoder will deliver it.

    ``width``/``height`` are after autorotation (ffmpeg applies the display matrix
    when decoding), ``rotation`` is the clockwise turn that was applied.
    ``fps`` is exact (NTSC rates as n/1001) and is the constant rate VideoReader emits.
    ``demuxer`` is the (whitelisted) ffmpeg demuxer every later call names with ``-f``;
    ``packet_count`` the frames the file really holds (its stream's packets, counted).
    """

    width: int
    height: int
    fps: Fraction
    duration: float
    frame_count_estimate: int
    codec: str
    has_audio: bool
    rotation: int
    demuxer: str = ""
    packet_count: int = 0


@dataclass(frozen=True)
class AudioInfo:
    duration: float
    sample_rate: int
    channels: int
    codec: str
    demuxer: str = ""


@dataclass(frozen=True)
class MediaLimits:
    """What a job may decode. ``None``: no limit (the command line on the user's own files).

    Checked twice: against the probe before any work (``check_video`` / ``check_audio``),
    and while decoding against what really comes out (``decode_audio(max_seconds=)``,
    ``VideoReader(max_frames=)``), because both durations and frame rates are the file's claims.
    """

    max_video_seconds: float | None = None
    max_audio_seconds: float | None = None
    max_video_pixels: int | None = None
    max_fps: float = DEFAULT_MAX_FPS

    def max_frames(self, fps: Fraction) -> int | None:
        """Most frames a video at ``fps`` may decode to (one frame of slack for rounding)."""
        if self.max_video_seconds is None:
            return None
        return math.ceil(self.max_video_seconds * fps) + 1

    def check_video(self, info: VideoInfo, name: str) -> None:
        """InputTooLargeError (413) for a probed video over a limit."""
        _check_pixels(name, info.width, info.height, self.max_video_pixels)
        if info.fps > self.max_fps:
            raise InputTooLargeError(
                f"{name}: its frame rate of {float(info.fps):g} fps is above the limit of {self.max_fps:g} fps")
        if self.max_video_seconds is None:
            return
        if info.duration > self.max_video_seconds:
            raise InputTooLargeError(
                f"{name}: {info.duration:.1f} s of video is over the limit of {self.max_video_seconds:g} s")
        # The real frame count, not duration x fps: a file can pack many frames into a short span.
        most = math.ceil(self.max_video_seconds * self.max_fps)
        if info.packet_count > most:
            raise InputTooLargeError(
                f"{name}: it holds {info.packet_count:,} frames, over the limit of {most:,} "
                f"({self.max_video_seconds:g} s at {self.max_fps:g} fps)")

    def check_audio(self, info: AudioInfo, name: str) -> None:
        if self.max_audio_seconds is not None and info.duration > self.max_audio_seconds:
            raise InputTooLargeError(
                f"{name}: {info.duration:.1f} s of audio is over the limit of {self.max_audio_seconds:g} s")


def _check_pixels(name: str, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise InputTooLargeError(
            f"{name}: resolution {width}x{height} is above the limit of {max_pixels:,} pixels per frame")


def probe_video(path: PathLike, *, timeout_s: float | None = PROBE_TIMEOUT_S,
                max_pixels: int | None = None) -> VideoInfo:
    """Describe the first video stream; InvalidInputError if the file is not a usable video.

    ``max_pixels`` (MediaLimits.max_video_pixels): a larger frame size in the stream's header is
    refused (InputTooLargeError, 413) before a frame of it is decoded; ffmpeg's decoders are capped
    (decoder_max_pixels) and its memory bounded (PROBE_MEMORY_BYTES) while probing.
    """
    name = _check_file(path, "video")
    not_readable = f"{name} is not a readable video file"
    deadline = _Deadline(timeout_s, f"probing {name}")
    cap = decoder_max_pixels(max_pixels)
    # Decoding one tiny grey frame proves the codec is supported and the data decodes.
    header, first_frame, demuxer = _open_and_decode(
        path, "video", VIDEO_DEMUXERS,
        ["-map", "0:V:0", "-frames:v", "1", "-vf", "scale=8:8", "-f", "rawvideo", "-pix_fmt", "gray"],
        deadline, cap,
    )
    if not header.opened:
        raise InvalidInputError(f"{not_readable} ({header.reason})" if header.reason else not_readable)
    stream = header.first("Video")
    if stream is None:
        raise InvalidInputError(f"{name} is not a video file: it has no video stream")
    rotation = _rotation_cw(stream)
    size = _SIZE_RE.search(stream.desc)
    # The size from the header (or the one a capped decoder refused: the stream's line has none then)
    # is checked before the decode's result: a frame over the cap never decoded, so it reads as broken.
    coded = (int(size.group(1)), int(size.group(2))) if size else header.oversize
    if coded is not None:
        _check_pixels(name, *(coded[::-1] if rotation in (90, 270) else coded), max_pixels)
    if size is None:
        raise InvalidInputError(f"{not_readable}: its video stream has no frame size")
    if len(first_frame) != 64:
        raise InvalidInputError(f"{not_readable}: its {stream.codec} video stream could not be decoded")

    scan = _scan_packets(path, "0:V:0", demuxer, VIDEO_DEMUXERS, deadline, cap)
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
    # measured packet rate, which MediaLimits.max_fps caps like any other.
    candidates = [r for r in (_parse_rate(_FPS_RE, stream.desc), _parse_rate(_TBR_RE, stream.desc)) if r]
    fps = next((r for r in candidates if _is_standard_rate(r)), candidates[0] if candidates else None)
    if fps is None and scan.count > 1:
        fps = exact_frame_rate(scan.count / duration)
    if fps is None or fps <= 0:
        raise InvalidInputError(f"{not_readable}: its frame rate is unknown")

    width, height = int(size.group(1)), int(size.group(2))
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
        demuxer=demuxer,
        packet_count=scan.count,
    )


def probe_audio(path: PathLike, *, timeout_s: float | None = PROBE_TIMEOUT_S) -> AudioInfo:
    """Describe the first audio stream (of an audio or a video file); InvalidInputError if unusable.

    ``duration`` is what the packets declare; decode_audio(max_seconds=) holds the real length.
    """
    name = _check_file(path, "audio")
    deadline = _Deadline(timeout_s, f"probing {name}")
    header, samples, demuxer = _open_and_decode(
        path, "audio", AUDIO_DEMUXERS, ["-map", "0:a:0", "-t", "0.1", "-ac", "1", "-f", "s16le"], deadline,
        AUDIO_INPUT_MAX_PIXELS)
    if not header.opened:
        msg = f"{name} is not a readable audio file"
        raise InvalidInputError(f"{msg} ({header.reason})" if header.reason else msg)
    stream = header.first("Audio")
    if stream is None:
        raise InvalidInputError(f"{name} has no audio stream")
    rate = re.search(r"(\d+) Hz", stream.desc)
    if rate is None or not samples:
        raise InvalidInputError(f"{name} is not a readable audio file: its {stream.codec} audio could not be decoded")
    if int(rate.group(1)) not in AUDIO_SAMPLE_RATES:
        raise InvalidInputError(
            f"{name} is not a readable audio file: its sample rate of {int(rate.group(1)):,} Hz is not an audio rate")
    scan = _scan_packets(path, "0:a:0", demuxer, AUDIO_DEMUXERS, deadline, AUDIO_INPUT_MAX_PIXELS)
    if scan.truncated:
        raise InvalidInputError(f"{name} is not a readable audio file: it is truncated or corrupt")
    duration = scan.duration if scan.duration else header.duration
    if not duration or duration <= 0:
        raise InvalidInputError(f"{name} is not a readable audio file: its duration is unknown")
    return AudioInfo(duration=duration, sample_rate=int(rate.group(1)), channels=_channel_count(stream.desc),
                     codec=stream.codec, demuxer=demuxer)


def decode_audio(path: PathLike, sample_rate: int = 16000, *, timeout_s: float | None = None,
                 max_seconds: float | None = None, info: AudioInfo | None = None) -> np.ndarray:
    """The first audio stream as float32 mono samples in [-1, 1] at ``sample_rate`` Hz.

    ``max_seconds``: samples are counted as they arrive, and once they pass the limit (plus
    AUDIO_LIMIT_SLACK_S) ffmpeg is killed and InputTooLargeError (413) raised, whatever the
    file declared; memory stays within the limit's worth of samples. ``info``: the file's
    probe, if the caller has it (otherwise it is probed here).
    """
    name = _name(path)
    # A bad upload is the user's error (400), not a processing failure (500); the probe also
    # names the demuxer to use.
    info = info or probe_audio(path)
    limit_bytes = None if max_seconds is None else int((max_seconds + AUDIO_LIMIT_SLACK_S) * sample_rate) * 4
    proc = _FfmpegProcess(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", *input_args(path, info.demuxer, AUDIO_DEMUXERS),
         "-map", "0:a:0", "-vn", "-sn", "-dn", "-ac", "1", "-ar", str(int(sample_rate)),
         "-c:a", "pcm_f32le", "-f", "f32le", "pipe:1"],
        what=f"decoding the audio of {name}", paths=_path_aliases(path), timeout_s=timeout_s,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    data = bytearray()
    try:
        assert proc.proc.stdout is not None
        while chunk := proc.proc.stdout.read(1 << 20):
            if limit_bytes is not None and len(data) + len(chunk) > limit_bytes:
                raise InputTooLargeError(
                    f"{name}: its audio decodes to more than the limit of {max_seconds:g} s "
                    f"(the file declares {info.duration:.1f} s)")
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

    ``max_frames``: the read that would take the count past it kills ffmpeg and raises
    InputTooLargeError (413), whatever the probe said (timestamps that lie make ffmpeg's
    constant-rate output duplicate frames without end).

    ``stop_after``: the video ends, for the reader, after that many frames (ffmpeg is stopped
    there): a job reads only what its output shows (plan.frames_to_decode).

    ``max_pixels``: the frame-size limit (MediaLimits.max_video_pixels); ffmpeg's decoder refuses
    a picture over decoder_max_pixels of it, a size change mid-stream included.
    """

    def __init__(self, path: PathLike, info: VideoInfo | None = None, *, timeout_s: float | None = None,
                 max_frames: int | None = None, hwaccel: str | None = None, stop_after: int | None = None,
                 max_pixels: int | None = None) -> None:
        self.path = os.fspath(path)
        self.info = info if info is not None else probe_video(path, max_pixels=max_pixels)
        self.width, self.height = self.info.width, self.info.height
        self._frame_bytes = self.width * self.height * 3
        fps = self.info.fps
        self.max_frames = max_frames
        self.stop_after = stop_after
        self.frames_read = 0
        self._eof = False
        self._closed = False
        # hwaccel (e.g. "cuda": NVDEC, see hwcodecs.py) decodes on the GPU where it can; the frames
        # come back to system memory, and a stream the GPU cannot decode falls back to software.
        hw = ["-hwaccel", hwaccel] if hwaccel else []
        self._ff = _FfmpegProcess(
            [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", *hw,
             *input_args(self.path, self.info.demuxer, VIDEO_DEMUXERS, max_pixels=decoder_max_pixels(max_pixels)),
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
        if self.stop_after is not None:
            view = view[: (self.stop_after - self.frames_read) * self._frame_bytes]
        assert self._ff.proc.stdout is not None
        got = _read_exact(self._ff.proc.stdout, view)
        if got < len(view):  # EOF: a trailing partial frame is dropped
            self._eof = True
            self._ff.finish()  # raises if ffmpeg failed or timed out
        frames = got // self._frame_bytes
        self.frames_read += frames
        if not self._eof and self.frames_read == self.stop_after:  # the end the caller set: stop ffmpeg now
            self._eof = True
            self._ff.abort()
        if self.max_frames is not None and self.frames_read > self.max_frames:
            self.close()
            raise InputTooLargeError(
                f"{_name(self.path)}: it decodes to more than {self.max_frames:,} frames, over the limit "
                f"(the file declares {self.info.frame_count_estimate:,})")
        return frames

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

_MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm"}


@dataclass(frozen=True)
class EncodeQuality:
    """One named output quality (JobParams.quality) as each encoder's rate control."""

    crf_step: int  # added to the writer's x264/NVENC CRF (the operator's LIP_SYNC_CRF): standard is that CRF
    vp9_crf: int  # libvpx-vp9's constant quality (0-63; with -b:v 0 the bitrate is unbounded)
    aac_kbps: int
    opus_kbps: int


ENCODE_QUALITIES = {"draft": EncodeQuality(10, 44, 96, 48), "standard": EncodeQuality(0, 32, 128, 96),
                    "high": EncodeQuality(-4, 24, 192, 128)}
# VP9 in software. On a 720p clip at CRF 32 (docs/benchmarks.md): "good" (cpu-used 5, its fastest)
# took 24 s for 45.8 dB PSNR; "realtime" with cpu-used 6 took 1.2 s for 45.1 dB and an 18 % larger
# file: about x264 veryfast's time. Row threading uses every core.
_VP9_SPEED = ["-deadline", "realtime", "-cpu-used", "6", "-row-mt", "1"]


def scaled_size(width: int, height: int, output_height: int | None) -> tuple[int, int]:
    """The encoded frame size: ``output_height`` (even) when it is smaller than the video, the width
    following the aspect ratio rounded to even; otherwise the video's size padded to even."""
    even_w, even_h = width + width % 2, height + height % 2
    if output_height is None or output_height >= even_h:
        return even_w, even_h
    out_h = max(2, output_height - output_height % 2)
    return max(2, round(width * out_h / height / 2) * 2), out_h

# x264 preset -> NVENC preset (p1 fastest .. p7 best) of about the same place on the speed scale.
_NVENC_PRESETS = {"ultrafast": "p1", "superfast": "p1", "veryfast": "p2", "faster": "p3", "fast": "p4",
                  "medium": "p5", "slow": "p6", "slower": "p7", "veryslow": "p7", "placebo": "p7"}


def _video_codec_args(codec: str, preset: str, crf: int, threads: int | None = None) -> list[str]:
    """Encoder options: x264 preset + CRF (+ its threads: LIP_SYNC_X264_THREADS, by default derived from
    the replica's cores, not x264's 1.5 per core of the node), or NVENC's constant-quality mode at the
    same number."""
    if codec == "libx264":
        return ["-c:v", "libx264", "-preset", preset, "-crf", str(int(crf)),
                *(["-threads", str(int(threads))] if threads else [])]
    if codec == "h264_nvenc":
        return ["-c:v", "h264_nvenc", "-preset", _NVENC_PRESETS.get(preset, "p4"), "-tune", "hq",
                "-rc", "vbr", "-cq", str(int(crf)), "-b:v", "0"]
    raise ValueError(f"unsupported video encoder {codec!r} (libx264, h264_nvenc)")


def _hls_tee_args(hls: HlsOutput, muxer: str, tmp: Path, *, audio: bool) -> list[str]:
    """The encoded streams to both the file and the HLS playlist (media/hls.py): ffmpeg's ``tee`` muxer.
    Its outputs get the codecs' headers out of band (global_header), as an MP4 of its own would."""
    flags = ["-flags:v", "+global_header"] + (["-flags:a", "+global_header"] if audio else [])
    main = f"[f={muxer}:movflags=+faststart]{tee_escape(_url(tmp), slave=True)}"
    return [*hls.force_key_frames(), *flags, "-f", "tee", f"{main}|{hls.tee_slave()}"]


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
    * The container follows ``path``'s suffix: ``.webm`` is VP9 + Opus (libvpx-vp9, libopus), the
      others H.264 + AAC. ``quality``: a name of :data:`ENCODE_QUALITIES` (``crf`` is standard's
      x264/NVENC CRF). ``output_height``: frames are scaled down to it at encode time
      (:func:`scaled_size`; never up); :attr:`output_size` is the encoded size.
    * ``hls``: also write the same encoded stream as a growing HLS playlist of fMP4 segments
      (media/hls.py: one encode, ffmpeg's ``tee`` muxer), published as it goes and ended on close or abort.
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
        quality: str = "standard",
        output_height: int | None = None,
        hls: HlsOutput | None = None,
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
        audio_info = probe_audio(audio_path) if audio_path is not None else None  # refuse a bad file up front
        self.path = out
        self.width, self.height, self.fps = int(width), int(height), fps
        self.frames_written = 0
        self._closed = False
        self._tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.part")

        args = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y",
                "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}",
                "-r", f"{fps.numerator}/{fps.denominator}", "-i", "pipe:0"]  # fmt: skip
        if audio_path is not None and audio_info is not None:
            args += input_args(audio_path, audio_info.demuxer, AUDIO_DEMUXERS)
        args += ["-map", "0:v:0"]
        if audio_path is not None:
            args += ["-map", "1:a:0"]
        rate = ENCODE_QUALITIES[quality]
        self.output_size = scaled_size(self.width, self.height, output_height)
        if self.output_size[1] < self.height - self.height % 2:  # area averaging: no aliasing when shrinking
            args += ["-vf", "scale={}:{}:flags=area".format(*self.output_size)]
        else:
            args += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]
        if muxer == "webm":
            args += ["-c:v", "libvpx-vp9", "-crf", str(rate.vp9_crf), "-b:v", "0", *_VP9_SPEED, "-pix_fmt", "yuv420p"]
        else:
            args += [*_video_codec_args(codec, preset, min(51, max(0, crf + rate.crf_step)), threads),
                     "-pix_fmt", "yuv420p"]
        if audio_path is not None:
            args += (["-c:a", "libopus", "-b:a", f"{rate.opus_kbps}k"] if muxer == "webm"
                     else ["-c:a", "aac", "-b:a", f"{rate.aac_kbps}k"])
        hls = hls if muxer in ("mp4", "mov") else None  # HLS carries fMP4 (H.264): not beside another container
        if hls is not None:
            args += _hls_tee_args(hls, muxer, self._tmp, audio=audio_path is not None)
        else:
            if muxer in ("mp4", "mov"):
                args += ["-movflags", "+faststart"]  # index up front: playback starts before download ends
            args += ["-f", muxer, _url(self._tmp)]

        paths = _path_aliases(self._tmp, out.name) | _path_aliases(out)
        if audio_path is not None:
            paths |= _path_aliases(audio_path)
        if hls is not None:
            hls.clear()
            paths[os.path.abspath(hls.directory) + os.sep] = ""  # its segments by their own names in errors
        self._ff = _FfmpegProcess(
            args, what=f"encoding {out.name}", paths=paths, timeout_s=timeout_s, stdin=subprocess.PIPE
        )
        self._hls = SegmentPublisher(hls) if hls is not None else None

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
        self._end_hls()
        raise self._ff.error(self._ff.proc.returncode) from None

    def _remove_tmp(self) -> None:
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass

    def _end_hls(self) -> None:
        """ffmpeg has exited: publish its last segments and end the playlist (whatever the outcome)."""
        publisher, self._hls = self._hls, None
        if publisher is not None:
            publisher.finish()

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
        finally:
            self._end_hls()

    def abort(self) -> None:
        """Kill ffmpeg and discard the partial output; never raises."""
        self._closed = True
        self._ff.abort()
        self._remove_tmp()
        self._end_hls()

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
