"""A streaming muxer: raw RGB frames and 16 kHz PCM in, fragmented MP4 out, as it is encoded.

One ffmpeg reads the frames from its stdin and the PCM from a second pipe, encodes H.264
(baseline, zero latency: no B-frames, no look-ahead, so a frame leaves the encoder as soon as it
enters) and AAC, and writes fragmented MP4 (``frag_keyframe+empty_moov+default_base_moof``, a
fragment per frame's duration) to its stdout. What comes out is cut at top-level box boundaries: first the
init segment (``ftyp`` + ``moov``), then media fragments (``moof`` + ``mdat``, with any ``styp``
or ``sidx`` before them), each delivered whole to ``on_segment`` -- exactly what Media Source
Extensions' ``appendBuffer`` takes (the ``mime`` below names the codecs for ``addSourceBuffer``).

Each frame is written with its own audio (the samples of that frame's span), so the two tracks
can never drift apart: a frame not written (dropped) takes its audio with it.
"""

from __future__ import annotations

import os
import struct
import subprocess
import threading
from collections.abc import Callable
from fractions import Fraction

import numpy as np

from lipsync_runner.errors import MediaProcessingError
from lipsync_runner.media.ffmpeg import ffmpeg_exe

SAMPLE_RATE = 16_000
MIME = 'video/mp4; codecs="avc1.42E028, mp4a.40.2"'  # H.264 constrained baseline, level 4.0; AAC-LC
_READ = 64 * 1024


def even_size(width: int, height: int) -> tuple[int, int]:
    """H.264 in 4:2:0 needs even dimensions: the frame is cropped by at most one pixel each way."""
    return width - width % 2, height - height % 2


class FragmentedMp4Stream:
    """``write(frame, pcm)`` per frame; ``on_segment(kind, data)`` from a reader thread, kind "init" or
    "media"; ``close()`` flushes the encoder and waits for the last fragment."""

    def __init__(self, width: int, height: int, fps: Fraction, on_segment: Callable[[str, bytes], None], *,
                 crf: int = 23, preset: str = "veryfast") -> None:
        self.width, self.height = width, height
        self.out_width, self.out_height = even_size(width, height)
        self.fps = Fraction(fps)
        self.on_segment = on_segment
        audio_read, self._audio = os.pipe()
        gop = max(1, round(self.fps))  # a keyframe a second: a player that joins late waits at most that
        cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin",
               "-thread_queue_size", "64", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
               "-framerate", f"{self.fps.numerator}/{self.fps.denominator}", "-i", "pipe:0",
               "-thread_queue_size", "64", "-f", "s16le", "-ar", str(SAMPLE_RATE), "-ac", "1",
               "-i", f"pipe:{audio_read}",
               "-map", "0:v", "-map", "1:a",
               "-vf", f"crop={self.out_width}:{self.out_height}:0:0",
               "-c:v", "libx264", "-preset", preset, "-tune", "zerolatency", "-crf", str(crf),
               "-profile:v", "baseline", "-level:v", "4.0", "-pix_fmt", "yuv420p", "-g", str(gop),
               "-c:a", "aac", "-b:a", "64k", "-ar", "48000",
               # a fragment per frame's duration (frag_every_frame breaks the audio's timing on read-back)
               "-f", "mp4", "-frag_duration", str(round(1e6 / self.fps)),
               "-movflags", "frag_keyframe+empty_moov+default_base_moof+skip_trailer",  # no mfra index at the end
               "pipe:1"]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, pass_fds=(audio_read,))
        finally:
            os.close(audio_read)
        self._stderr = b""
        self._reader = threading.Thread(target=self._read_segments, name="fmp4-reader", daemon=True)
        self._reader.start()
        self._errors = threading.Thread(target=self._read_stderr, name="fmp4-stderr", daemon=True)
        self._errors.start()
        self.frames = 0
        self.bytes_out = 0
        self._closed = False

    def write(self, frame: np.ndarray, pcm: np.ndarray) -> None:
        """One frame ([H, W, 3] uint8 RGB) and its audio (int16 samples of the frame's span)."""
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
            if len(pcm):  # a blocking pipe: os.write takes it all (or fails)
                os.write(self._audio, np.ascontiguousarray(pcm, dtype="<i2").tobytes())
        except (BrokenPipeError, OSError) as exc:
            raise MediaProcessingError(f"the live encoder stopped: {self._error_tail() or exc}") from None
        self.frames += 1

    def close(self, timeout_s: float = 30.0) -> None:
        """End of input: the encoder flushes, the last fragments reach ``on_segment``, ffmpeg exits."""
        if self._closed:
            return
        self._closed = True
        for close in (self._proc.stdin.close, lambda: os.close(self._audio)):
            try:
                close()
            except OSError:
                pass
        try:
            code = self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            raise MediaProcessingError("the live encoder did not finish in time") from None
        self._reader.join(timeout_s)
        self._errors.join(timeout_s)
        if code != 0 and self.frames:
            raise MediaProcessingError(f"the live encoder failed: {self._error_tail()}")

    def abort(self) -> None:
        """Stop at once (the session is gone): nothing more is delivered."""
        self.on_segment = lambda kind, data: None
        self._closed = True
        if self._proc.poll() is None:
            self._proc.kill()
        for close in (self._proc.stdin.close, lambda: os.close(self._audio)):
            try:
                close()
            except OSError:
                pass
        self._proc.wait()

    def _read_segments(self) -> None:
        pending = bytearray()
        fragment = bytearray()  # boxes of the fragment being collected (styp/sidx/moof, then its mdat)
        init_sent = False
        out = self._proc.stdout
        while True:
            chunk = out.read1(_READ) if hasattr(out, "read1") else out.read(_READ)
            if not chunk:
                break
            pending += chunk
            while len(pending) >= 8:
                size, kind = struct.unpack(">I4s", pending[:8])
                if size == 1 and len(pending) >= 16:
                    size = struct.unpack(">Q", pending[8:16])[0]
                elif size < 8:  # 0 (to the end) never appears in a fragmented stream; anything else is broken
                    self._stderr += f"unexpected MP4 box size {size}".encode()
                    return
                if len(pending) < size:
                    break
                box, pending = bytes(pending[:size]), pending[size:]
                fragment += box
                if not init_sent and kind == b"moov":
                    self._deliver("init", bytes(fragment))
                    fragment.clear()
                    init_sent = True
                elif init_sent and kind == b"mdat":
                    self._deliver("media", bytes(fragment))
                    fragment.clear()
        if fragment:
            self._deliver("media", bytes(fragment))

    def _deliver(self, kind: str, data: bytes) -> None:
        self.bytes_out += len(data)
        self.on_segment(kind, data)

    def _read_stderr(self) -> None:
        self._stderr += self._proc.stderr.read()

    def _error_tail(self) -> str:
        return " ".join(self._stderr.decode(errors="replace").strip().splitlines()[-3:])
