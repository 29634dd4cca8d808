"""A real-time session: speech streamed in, frames of a prepared avatar streamed out.

    PCM as it arrives -> per-frame audio windows (Whisper over the recent audio only) ->
    the runner's generate, a few frames at a time -> blend onto the avatar's frames (cycled
    back and forth, as bounce does) -> the streaming muxer (media/fmp4_stream.py), paced at
    the avatar's frame rate

Two timelines. The *received* one is the client's speech as sent: speech frame j covers its
samples [j/fps, (j+1)/fps), exactly as a batch job maps audio to frames. The *output* one is
what the viewer sees, one frame per 1/fps of wall time from the start: each output frame is
either the next speech frame (with its samples) or, when the speech for it has not arrived by
its deadline (the start, a pause, a slow network), an idle frame: the avatar's own frame and
mouth with silence, so the picture never freezes. Every frame is written with its own audio, so
the two tracks stay together whatever is inserted or dropped.

Back-pressure: the engine never runs more than one batch ahead of the wall clock; a frame whose
media would overfill the client's send buffer is dropped before the encoder (counted and
reported), so a client that stops reading costs a bounded amount of memory.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from lipsync_runner.audio import windows as audio_math
from lipsync_runner.audio.speech import SpeechSettings, speech_frames
from lipsync_runner.config import LiveSettings
from lipsync_runner.errors import JobCancelledError
from lipsync_runner.faces import FaceDetector, FaceTrack
from lipsync_runner.media.ffmpeg import VideoInfo
from lipsync_runner.media.fmp4_stream import MIME, FragmentedMp4Stream, even_size
from lipsync_runner.media.hwcodecs import video_codecs
from lipsync_runner.models.musetalk import LipSyncModel
from lipsync_runner.pipeline.avatar_cache import Avatar
from lipsync_runner.pipeline.framestore import FrameSource, FrameStore, pingpong_indices
from lipsync_runner.pipeline.job import JobState, PipelineOptions, StageClock, _prepared_video, _reader
from lipsync_runner.render.blend import blend_faces
from lipsync_runner.render.crops import crop_faces

log = logging.getLogger(__name__)

SAMPLE_RATE = audio_math.SAMPLE_RATE
CONTEXT_S = 1.0  # audio before a batch that Whisper sees too (its states depend on their surroundings)
VAD_CONTEXT_S = 0.5  # audio before a batch that the speech detector sees too
MAX_ENCODED_S = 28.0  # audio encoded at once at most (Whisper's piece is 30 s: one call)
STEP_SAMPLES = SAMPLE_RATE // audio_math.STEPS_PER_SECOND  # 320: one Whisper step


@dataclass
class LiveSource:
    """A prepared avatar opened for sessions: its frames, face track and latents."""

    frames: FrameSource
    track: FaceTrack
    avatar: Avatar
    fps: Fraction
    width: int
    height: int
    speech: SpeechSettings = field(default_factory=SpeechSettings)  # silent stretches keep the source mouth

    @property
    def out_size(self) -> tuple[int, int]:
        return even_size(self.width, self.height)


@contextmanager
def open_live_source(model: LipSyncModel, detector: FaceDetector, video: Path, info: VideoInfo, cache,
                     options: PipelineOptions, work_dir: Path) -> Iterator[LiveSource]:
    """The avatar's cache entry (the key its preparation used: the same options, model and detector)
    and its frames, decoded on demand into a frame store in ``work_dir`` (cycling goes back)."""
    opts = options if options.codecs is not None else replace(options, codecs=video_codecs())
    clock = StageClock()
    frames = FrameSource(lambda: _reader(video, info, opts), (info.height, info.width, 3), clock=clock,
                         name=video.name)
    frames.store = FrameStore(info.height, info.width, work_dir)
    job = JobState(model=model, detector=detector, video=video, audio=None, output=None, info=info, opts=opts,
                   clock=clock, report=lambda stage, fraction: None, should_cancel=None, work_dir=work_dir,
                   frames=frames)
    try:
        with _prepared_video(job, cache):
            yield LiveSource(frames=frames, track=job.track, avatar=job.avatar, fps=info.fps, width=info.width,
                             height=info.height, speech=opts.speech)
    finally:
        frames.close()


@dataclass
class SessionStats:
    frames: int = 0  # output frames sent to the encoder
    speech_frames: int = 0  # frames of received audio (silent_frames of them without speech)
    silent_frames: int = 0  # received audio without speech (VAD): the source mouth, as silence=keep
    idle_frames: int = 0  # no audio in time: the avatar's own frame and silence
    dropped: int = 0  # frames not encoded: the client's send buffer was full
    latencies_s: deque = None  # speech frames: the arrival of their last sample -> into the encoder

    def __post_init__(self) -> None:
        self.latencies_s = deque(maxlen=10_000)

    def latency_ms(self) -> dict[str, float] | None:
        if not self.latencies_s:
            return None
        values = np.asarray(self.latencies_s) * 1000
        return {"p50": round(float(np.percentile(values, 50)), 1), "p99": round(float(np.percentile(values, 99)), 1)}


class LiveSession:
    """One session's engine. The transport calls ``feed``/``finish``/``cancel`` from any thread and runs
    ``run()`` on a thread of its own; media comes out through ``on_segment(kind, bytes)``, events
    (``{"type": "dropped", ...}``) through ``on_event``; ``backlog()`` says how many bytes wait to be sent."""

    def __init__(self, model: LipSyncModel, source: LiveSource, settings: LiveSettings, *,
                 on_segment: Callable[[str, bytes], None], on_event: Callable[[dict], None],
                 backlog: Callable[[], int], clock: Callable[[], float] = time.monotonic) -> None:
        self.model, self.source, self.settings = model, source, settings
        self.on_segment, self.on_event, self.backlog, self.clock = on_segment, on_event, backlog, clock
        self.fps = Fraction(source.fps)
        self.stats = SessionStats()
        self._pcm = bytearray()  # received s16le samples from self._base on (older ones are trimmed)
        self._base = 0  # received sample index of self._pcm[0]
        self._received = 0  # samples received in all
        self._arrivals: deque[tuple[int, float]] = deque()  # (samples received by then, when)
        self._ended = False
        self._cancelled = False
        self._wake = threading.Condition()
        self._dropped_reported = 0
        self._last_drop_report = 0.0
        self.muxer: FragmentedMp4Stream | None = None
        self._steps: tuple[int, int, np.ndarray] | None = None  # (first step, end step, Whisper states)
        self._left_steps = _left_padding(self.fps)

    # ------------------------------------------------------------------ the transport's side

    def feed(self, data: bytes) -> None:
        """Speech: 16 kHz mono s16le, any size (an odd byte waits for its pair)."""
        with self._wake:
            self._pcm += data
            self._received = self._base + len(self._pcm) // 2
            self._arrivals.append((self._received, self.clock()))
            self._wake.notify_all()

    def finish(self) -> None:
        with self._wake:
            self._ended = True
            self._wake.notify_all()

    def cancel(self) -> None:
        with self._wake:
            self._cancelled = True
            self._wake.notify_all()

    @property
    def buffered_s(self) -> float:
        """Speech received and not yet turned into frames."""
        with self._wake:
            done = self._sample(self.stats.speech_frames)
            return max(0, self._received - done) / SAMPLE_RATE

    # ------------------------------------------------------------------ the engine

    def _sample(self, frame: int) -> int:
        """First received sample of speech frame ``frame`` (exact for any frame rate)."""
        return frame * SAMPLE_RATE * self.fps.denominator // self.fps.numerator

    def run(self) -> SessionStats:
        """Until the input ends and its last whole frame is out (or the session is cancelled)."""
        src = self.source
        self.muxer = FragmentedMp4Stream(src.width, src.height, self.fps, self.on_segment)
        try:
            self._loop()
        except BaseException:
            self.muxer.abort()
            raise
        if self._cancelled:
            self.muxer.abort()
        else:
            self.muxer.close()
        self._report_drops(force=True)
        return self.stats

    def _loop(self) -> None:
        settings, fps = self.settings, self.fps
        period = 1 / float(fps)
        batch = settings.batch_frames
        lead = batch * period  # the engine works at most one batch ahead of the wall clock
        jitter = settings.jitter_ms / 1000
        start = self.clock()
        k = 0  # output frames decided (sent or dropped)
        while True:
            with self._wake:
                if self._cancelled:
                    raise JobCancelledError("the session was closed")
                j = self.stats.speech_frames
                ready = audio_math.frame_count(self._received, fps) - j  # whole speech frames received
                ended = self._ended
                now = self.clock()
                due = start + k * period  # when output frame k is shown
                if ended and ready <= 0:
                    return
                if now < due - lead:  # ahead of the wall clock: wait (new audio cannot make it sooner)
                    self._wake.wait(due - lead - now)
                    continue
                if ready <= 0 and now < due + jitter:  # its speech may still come
                    self._wake.wait(due + jitter - now)
                    continue
            ahead = int((now + lead - start) / period) - k + 1  # frames due within the lead
            if ready > 0:  # behind the clock (a slow runner, a backlog): bigger batches, fewer calls
                n = max(1, min(ready, max(batch, min(ahead, 4 * batch))))
                self._speech(k, j, n)
            else:  # no speech in time for the frames whose deadline has passed: idle frames
                late = int((now - jitter - start) / period) - k + 1
                n = max(1, min(batch, late))
                self._idle(k, n)
            k += n
            self._report_drops()

    def _speech(self, k: int, j: int, n: int) -> None:
        src, model = self.source, self.model
        out_idx = np.arange(k, k + n)
        rows = pingpong_indices(out_idx, len(src.track))
        frames = src.frames.take(rows)
        first, last = self._sample(j), self._sample(j + n)
        with self._wake:
            sound = np.frombuffer(bytes(self._pcm[2 * (first - self._base): 2 * (last - self._base)]), dtype="<i2")
            arrived = self._arrival_of(last)
            j0 = max(0, j - math.ceil(VAD_CONTEXT_S * self.fps))  # the detector's smoothing needs what came before
            while self._sample(j0) < self._base:
                j0 += 1
            context = np.frombuffer(bytes(self._pcm[2 * (self._sample(j0) - self._base): 2 * (first - self._base)]),
                                    dtype="<i2")
        heard = np.concatenate([context, sound]).astype(np.float32) / 32768.0
        speaking = speech_frames(heard, self.fps, src.speech)[j - j0:]
        self.stats.silent_frames += int(n - speaking.sum())
        sel = np.flatnonzero(src.track.has_face[rows] & speaking)
        if len(sel):
            steps, first_step = self._features(j, n)
            windows = audio_math.frame_windows(steps, np.arange(j, j + n)[sel], self.fps, first_step=first_step)
            boxes = src.track.boxes[rows[sel]]
            latents = src.avatar.latents_for(rows[sel], lambda todo: model.prepare(
                crop_faces([frames[i] for i in sel[todo]], boxes[todo])))
            faces = model.generate(latents, windows)
            landmarks = src.track.landmarks[rows[sel]] if src.track.landmarks is not None else None
            blend_faces([frames[i] for i in sel], faces, boxes, landmarks, inplace=True)
        now = self.clock()
        for i in range(n):
            a, b = self._sample(j + i) - first, self._sample(j + i + 1) - first
            self._emit(frames[i], sound[a:b])
        self.stats.speech_frames += n
        self.stats.latencies_s.append(now - arrived)
        self._trim()

    def _features(self, j: int, n: int) -> tuple[np.ndarray, int]:
        """Whisper states covering the windows of speech frames j..j+n-1, and the step the first one is.

        Whisper encodes 30 s at a time whatever it is given, so one call serves as many batches as the
        audio received allows: states are encoded again only when a window reaches past them and more
        audio has arrived since (a client sending in real time: about once a batch)."""
        starts = audio_math.window_starts(np.array([j, j + n - 1]), self.fps)
        left = starts[0] - self._left_steps
        right = starts[1] - self._left_steps + audio_math.WINDOW_STEPS  # steps read: [left, right)
        with self._wake:
            received = self._received
            cached = self._steps
            if cached is not None:
                c_first, c_end, c_steps = cached
                if c_first <= max(0, left) and c_end * STEP_SAMPLES >= min(received, right * STEP_SAMPLES):
                    return c_steps, c_first
            lo = max(self._base, self._sample(j) - int(CONTEXT_S * SAMPLE_RATE))
            lo = -(-lo // STEP_SAMPLES) * STEP_SAMPLES  # the first whole step at or after it
            hi = min(received, lo + int(MAX_ENCODED_S * SAMPLE_RATE))
            pcm16 = np.frombuffer(bytes(self._pcm[2 * (lo - self._base): 2 * (hi - self._base)]), dtype="<i2")
        steps = self.model.audio_features(pcm16.astype(np.float32) / 32768.0)
        self._steps = (lo // STEP_SAMPLES, lo // STEP_SAMPLES + len(steps), steps)
        return steps, lo // STEP_SAMPLES

    def _idle(self, k: int, n: int) -> None:
        rows = pingpong_indices(np.arange(k, k + n), len(self.source.track))
        frames = self.source.frames.take(rows)
        for i in range(n):  # the output's own sample boundaries: idle frames fill whole frame spans
            span = self._sample(k + i + 1) - self._sample(k + i)
            self._emit(frames[i], np.zeros(span, np.int16))
        self.stats.idle_frames += n

    def _emit(self, frame: np.ndarray, pcm: np.ndarray) -> None:
        if self.backlog() > self.settings.send_buffer_bytes:
            self.stats.dropped += 1  # before the encoder: the stream stays decodable, A/V stay together
            return
        self.muxer.write(frame, pcm)
        self.stats.frames += 1

    def _arrival_of(self, sample: int) -> float:
        """When the audio up to ``sample`` had arrived (the latency clock of a speech frame)."""
        for received, when in self._arrivals:
            if received >= sample:
                return when
        return self.clock()

    def _trim(self) -> None:
        """Forget audio older than the next batch's context."""
        with self._wake:
            keep_from = self._sample(self.stats.speech_frames) - int(CONTEXT_S * SAMPLE_RATE) - STEP_SAMPLES
            drop = max(0, keep_from - self._base)
            if drop:
                del self._pcm[: 2 * drop]
                self._base += drop
            while len(self._arrivals) > 1 and self._arrivals[1][0] <= self._sample(self.stats.speech_frames):
                self._arrivals.popleft()

    def _report_drops(self, force: bool = False) -> None:
        new = self.stats.dropped - self._dropped_reported
        now = self.clock()
        if new and (force or now - self._last_drop_report >= 1.0):
            self._dropped_reported = self.stats.dropped
            self._last_drop_report = now
            self.on_event({"type": "dropped", "frames": new, "total": self.stats.dropped})


def _left_padding(fps: Fraction) -> int:
    """Steps a frame's window reaches back before its own start (MuseTalk's left padding)."""
    return math.ceil(Fraction(audio_math.STEPS_PER_SECOND) / fps) * audio_math.PADDING_LEFT


def ready_message(source: LiveSource) -> dict:
    width, height = source.out_size
    fps = source.fps
    return {"type": "ready", "fps": float(fps), "fps_fraction": f"{fps.numerator}/{fps.denominator}",
            "width": width, "height": height, "mime": MIME, "sample_rate": SAMPLE_RATE}
