"""Progressive output: the video being encoded, published as a growing HLS playlist of fMP4 segments.

One encode, two outputs: :class:`~lipsync_runner.media.ffmpeg.VideoWriter` hands its encoded packets
to ffmpeg's ``tee`` muxer, which writes the MP4 and, beside it, an HLS event playlist of fragmented-MP4
segments (keyframes forced every ``segment_s``, so each segment starts with one and the cuts fall on
time). The segments carry the very packets of the MP4, audio included (it is muxed in the same pass).

ffmpeg writes into a local directory: each segment under a temp name, renamed when complete, then its
own playlist rewritten (temp + rename) to list it. :class:`SegmentPublisher` watches that playlist and,
for every newly listed segment, hands the finished file to ``publish(name, path)`` (the job storage:
the local job directory, or a bucket, so any replica can serve it), then publishes *its* playlist,
which lists only what was published, so a listed segment is always complete wherever it is read.
When the encode ends, for any reason, the published playlist gets ``#EXT-X-ENDLIST``.

Stored names are flat (the job storage keeps plain names): ``live.m3u8``, ``live-init.mp4`` and
``live-seg00000.m4s``...; the published playlist refers to them as ``live/init.mp4``,
``live/seg00000.m4s`` (relative to ``.../jobs/<id>/live.m3u8``), which :func:`stored_name` maps back.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PLAYLIST_NAME = "live.m3u8"
STORED_PREFIX = "live-"  # stored name = prefix + the name the playlist uses under live/
INIT_NAME = "init.mp4"
SEGMENT_PATTERN = "seg%05d.m4s"
_SERVED_NAME = re.compile(r"init\.mp4|seg\d{5,9}\.m4s")
LOCAL_PLAYLIST = ".live-ffmpeg.m3u8"  # ffmpeg's own playlist (hidden: never served, swept as scratch)
POLL_S = 0.1  # how often the publisher looks at ffmpeg's playlist

PLAYLIST_MEDIA_TYPE = "application/vnd.apple.mpegurl"
SEGMENT_MEDIA_TYPE = "video/mp4"  # fMP4 init and media segments

Publish = Callable[[str, Path], None]
"""``publish(stored_name, local_file)``: store a finished file (atomically) where readers find it."""
Progress = Callable[[float, bool], None]
"""``progress(playable_seconds, ended)``: after each published playlist."""


def stored_name(served: str) -> str | None:
    """The stored file behind ``live/<served>`` (``live-seg00003.m4s``), or None for any other name."""
    return STORED_PREFIX + served if _SERVED_NAME.fullmatch(served) else None


@dataclass
class HlsOutput:
    """Where and how the progressive copy of an encode goes.

    ``directory``: local scratch for ffmpeg's files (the job's directory); ``segment_s``: target segment
    length (keyframes are forced at these times); ``publish`` / ``progress``: see :data:`Publish`,
    :data:`Progress`.
    """

    directory: Path
    segment_s: float = 2.0
    publish: Publish | None = None
    progress: Progress | None = None

    def local(self, served: str) -> Path:
        return self.directory / (STORED_PREFIX + served)

    def clear(self) -> None:
        """Forget ffmpeg's playlist of an earlier attempt in this directory (its segments are overwritten)."""
        (self.directory / LOCAL_PLAYLIST).unlink(missing_ok=True)

    def force_key_frames(self) -> list[str]:
        """x264/NVENC keyframes at every segment boundary (the hls muxer cuts only on keyframes)."""
        return ["-force_key_frames", f"expr:gte(t,n_forced*{self.segment_s:g})"]

    def tee_slave(self) -> str:
        """The ``tee`` muxer's HLS output: an event playlist of fMP4 segments, each written under a temp
        name and renamed when complete, the playlist replaced atomically after it."""
        options = {
            "f": "hls", "hls_time": f"{self.segment_s:g}", "hls_playlist_type": "event", "hls_list_size": "0",
            "hls_segment_type": "fmp4", "hls_flags": "independent_segments+temp_file",
            "hls_fmp4_init_filename": STORED_PREFIX + INIT_NAME,  # relative to the playlist's directory
            "hls_segment_filename": str(self.local(SEGMENT_PATTERN)),
        }
        spec = ":".join(f"{k}={tee_escape(v)}" for k, v in options.items())
        return f"[{spec}]{tee_escape(str(self.directory / LOCAL_PLAYLIST), slave=True)}"


def tee_escape(value: str, slave: bool = False) -> str:
    """Escape a value for the tee muxer's spec (``[k=v:k=v]name|...``): its separators are special."""
    specials = "\\|[]" if slave else "\\:|[]='"
    return "".join("\\" + c if c in specials else c for c in value)


@dataclass
class Segment:
    name: str  # as ffmpeg's playlist lists it: the stored name (live-seg00000.m4s)
    duration: float


@dataclass
class Playlist:
    """What ffmpeg's playlist says (only the lines we rely on)."""

    init: str | None = None
    segments: list[Segment] = field(default_factory=list)
    ended: bool = False

    @classmethod
    def parse(cls, text: str) -> Playlist:
        out = cls()
        duration: float | None = None
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith("#EXT-X-MAP:"):
                found = re.search(r'URI="([^"]+)"', line)
                out.init = found.group(1) if found else None
            elif line.startswith("#EXTINF:"):
                duration = float(line[len("#EXTINF:"):].split(",", 1)[0])
            elif line == "#EXT-X-ENDLIST":
                out.ended = True
            elif line and not line.startswith("#") and duration is not None:
                out.segments.append(Segment(os.path.basename(line), duration))
                duration = None
        return out


def render_playlist(segments: list[Segment], target_s: float, ended: bool) -> str:
    """The published playlist: an EVENT playlist (segments only ever appended) of what is stored."""
    target = max([1, *(int(s.duration + 0.999) for s in segments)])  # TARGETDURATION: no segment longer
    lines = ["#EXTM3U", "#EXT-X-VERSION:7", f"#EXT-X-TARGETDURATION:{max(target, int(target_s + 0.999))}",
             "#EXT-X-MEDIA-SEQUENCE:0", "#EXT-X-PLAYLIST-TYPE:EVENT", "#EXT-X-INDEPENDENT-SEGMENTS",
             f'#EXT-X-MAP:URI="live/{INIT_NAME}"']
    for s in segments:
        lines += [f"#EXTINF:{s.duration:.6f},", "live/" + s.name[len(STORED_PREFIX):]]
    if ended:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


class SegmentPublisher:
    """Publishes what ffmpeg lists, as it lists it, on a thread of its own (see the module's doc).

    :meth:`finish` publishes the rest and ends the list; call it once ffmpeg has exited (whether it
    succeeded or not). A failed publish (a bucket down) is logged and retried at the next look: the
    progressive copy is a convenience, never a reason to fail the job.
    """

    def __init__(self, out: HlsOutput) -> None:
        self.out = out
        self.published: list[Segment] = []
        self._init_done = False
        self._lock = threading.Lock()  # one publish pass at a time (the thread's, or finish's)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hls-publisher", daemon=True)
        self._thread.start()

    @property
    def playable_s(self) -> float:
        return sum(s.duration for s in self.published)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._pass(ended=False)
            except Exception:
                log.warning("publishing the progressive output failed (retried)", exc_info=True)

    def _pass(self, ended: bool) -> None:
        with self._lock:
            try:
                listed = Playlist.parse((self.out.directory / LOCAL_PLAYLIST).read_text())
            except FileNotFoundError:
                listed = Playlist()
            new = listed.segments[len(self.published):]
            if not new and not ended:
                return
            if not self.published and not new:  # nothing was ever playable: no playlist at all
                return
            publish = self.out.publish
            if not self._init_done:
                if publish is not None:
                    publish(STORED_PREFIX + INIT_NAME, self.out.local(INIT_NAME))
                self._init_done = True
            for segment in new:
                if publish is not None:
                    publish(segment.name, self.out.directory / segment.name)
                self.published.append(segment)
            text = render_playlist(self.published, self.out.segment_s, ended)
            tmp = self.out.directory / f".live-playlist.{secrets.token_hex(4)}.tmp"
            try:
                tmp.write_text(text)
                final = self.out.directory / PLAYLIST_NAME
                if publish is not None:
                    publish(PLAYLIST_NAME, tmp)
                else:
                    os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            if self.out.progress is not None:
                self.out.progress(self.playable_s, ended)

    def finish(self) -> None:
        """Stop watching, publish what ffmpeg listed last and end the list; never raises. ffmpeg's own
        files that are not published (its playlist, a segment cut short) go."""
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            self._pass(ended=True)
        except Exception:
            log.warning("ending the progressive output's playlist failed", exc_info=True)
        for left in [self.out.directory / LOCAL_PLAYLIST, *self.out.directory.glob(f"{STORED_PREFIX}*.tmp")]:
            left.unlink(missing_ok=True)
