"""One lip-sync job end to end: plan, then execute.

    validate -> audio: PCM, speech activity -> one decode: track faces, keep the frames ->
    plan (plan.py) -> audio features -> render: crop -> prepare (VAE encode) ->
    generate (UNet + VAE decode) -> blend -> encode + mux

The plan decides, before any frame is rendered, what every output frame shows (which source
frame, generated or passed through and how much, which audio window); one render loop
executes any plan. The video is decoded once: the frames decoded to track faces are kept in
a scratch frame store and read back by the render (framestore.py explains the choice), and
with a cached face track a forward plan renders from one straight decode.

Frames flow through in chunks and are never all held in memory; only per-frame boxes (a few
hundred bytes each), the plan (a few bytes per frame) and the audio features (384 KB per second
of audio) are kept for the whole job. The model is anything with `audio_features`, `prepare`
and `generate` (the local MuseTalk component, or the GPU service's client).
"""

from __future__ import annotations

import logging
import tempfile
import time
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from lipsync_runner.audio import windows as audio_math
from lipsync_runner.pipeline.avatar_cache import Avatar, AvatarCache, AvatarParams
from lipsync_runner.render.blend import blend_faces
from lipsync_runner.render.crops import CROP_SIZE, crop_faces
from lipsync_runner.render.sharpen import restore_detail
from lipsync_runner.errors import InvalidInputError, JobCancelledError
from lipsync_runner.faces import (FaceChoice, FaceDetector, FaceTrack, FaceTracks, audio_envelope, choose_track,
                                  find_tracks, segment_envelope)
from lipsync_runner.pipeline.framestore import FrameSource, FrameStore
from lipsync_runner.media.hls import HlsOutput
from lipsync_runner.media.hwcodecs import VideoCodecs, video_codecs
from lipsync_runner.render.masks import MaskProvider, masks_for
from lipsync_runner.media.ffmpeg import (
    PROBE_TIMEOUT_S,
    AudioInfo,
    MediaLimits,
    VideoInfo,
    VideoReader,
    VideoWriter,
    decode_audio,
    probe_audio,
    probe_video,
)
from lipsync_runner.models.musetalk import LipSyncModel
from lipsync_runner.params import JobParams
from lipsync_runner.pipeline.plan import (DEFAULT_FADE_FRAMES, RenderPlan, build_plan, check_segments, frame_at,
                                          frames_to_decode, spools_frames)
from lipsync_runner.config import RunnerSettings
from lipsync_runner.audio.soundtrack import AudioPiece, write_soundtrack
from lipsync_runner.audio.speech import SpeechSettings, speech_frames

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, float], None]
"""Called with (stage, overall fraction done in 0..1)."""

STAGES = ("audio", "speech", "decode", "spool", "store", "faces", "prepare", "generate", "blend", "encode")
DETECT_CHUNK = 32  # frames per face-detection call
FACES_SHARE = 0.2  # share of the progress bar given to decoding and face tracking
DEFAULT_MAX_SPOOL_BYTES = 20 * 2**30



def configure_opencv(settings: RunnerSettings) -> None:
    """Apply `opencv_threads` (process-wide, so once where a process that runs the pipeline starts)."""
    import cv2

    if settings.opencv_threads > 0:
        cv2.setNumThreads(settings.opencv_threads)


@dataclass
class PipelineOptions:
    params: JobParams = field(default_factory=JobParams)  # what the user asked for
    batch_size: int = 8
    version: str = "v15"
    extra_margin: int = 10
    detect_every: int = 2  # face detection on every 2nd frame, interpolated between (then smoothed)
    crf: int = 18
    preset: str = "veryfast"
    ffmpeg_timeout_s: float | None = None
    speech: SpeechSettings = field(default_factory=SpeechSettings)
    fade_frames: int = DEFAULT_FADE_FRAMES
    max_spool_bytes: int = DEFAULT_MAX_SPOOL_BYTES
    limits: MediaLimits = field(default_factory=MediaLimits)  # decoding stops (413) past these
    chunks_in_flight: int = 1  # chunks at the model at once (the service: LIP_SYNC_CHUNKS_IN_FLIGHT)
    codecs: VideoCodecs | None = None  # NVDEC/NVENC or software; None: hwcodecs.video_codecs() (detected once)
    hls: HlsOutput | None = None  # progressive output: the encode also published as HLS (media/hls.py)

    @classmethod
    def from_settings(cls, settings: RunnerSettings, params: JobParams | None = None, **overrides) -> "PipelineOptions":
        """Options from RunnerSettings (the deployment) and the job's parameters."""
        values = dict(
            params=params or JobParams(), batch_size=settings.batch_size, extra_margin=settings.extra_margin,
            detect_every=settings.detect_every,
            crf=settings.crf, preset=settings.preset, ffmpeg_timeout_s=settings.ffmpeg_timeout_s,
            speech=SpeechSettings(aggressiveness=settings.vad_aggressiveness, floor_db=settings.silence_floor_db,
                                  min_silence_ms=settings.min_silence_ms, min_speech_ms=settings.min_speech_ms,
                                  pad_ms=settings.speech_pad_ms),
            fade_frames=settings.fade_frames, max_spool_bytes=int(settings.max_spool_gb * 2**30))
        values.update(overrides)
        return cls(**values)


@dataclass
class JobResult:
    output: Path
    frames: int  # frames written
    source_frames: int  # frames in the input video
    face_frames: int  # input frames with a face
    fps: Fraction
    width: int
    height: int
    generated: int = 0  # output frames with a generated mouth (fully or cross-faded)
    seconds: dict[str, float] = field(default_factory=dict)
    cache_hit: bool | None = None  # None: no avatar cache in use
    faces: dict | None = None  # FaceTrack.summary: the people found and who was dubbed (the job status)


class StageClock:
    """Wall time per stage; nested stages are not double counted by construction of the call sites.
    With chunks in flight, "generate" sums the model calls that overlapped (it may exceed the wall time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()  # chunks in flight time their model calls from several threads

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds


def validate_inputs(video: Path, audio: Path, timeout_s: float | None = None,
                    max_pixels: int | None = None) -> tuple[VideoInfo, AudioInfo]:
    """Check both files by content (not extension) before any work starts; ``max_pixels``: the frame-size limit."""
    bound = min(PROBE_TIMEOUT_S, timeout_s or PROBE_TIMEOUT_S)
    return probe_video(video, timeout_s=bound, max_pixels=max_pixels), probe_audio(audio, timeout_s=bound)


@dataclass
class JobState:
    """One job while it runs: its inputs and options, and what each step has found so far."""

    model: LipSyncModel
    detector: FaceDetector
    video: Path
    audio: Path | None  # None: preparing an avatar (prepare_avatar)
    output: Path | None
    info: VideoInfo
    opts: PipelineOptions
    clock: StageClock
    report: ProgressCallback
    should_cancel: Callable[[], bool] | None
    work_dir: Path | None
    frames: FrameSource
    masks: MaskProvider | None = None  # blend masks (face parsing); None: blend.py's own mask
    pcm: np.ndarray | None = None  # the new audio, 16 kHz mono
    n_audio: int = 0  # A: output frames the audio covers
    n_decode: int | None = None  # source frames read, from the first (plan.frames_to_decode); None: all
    speech: np.ndarray | None = None  # [A] bool (silence=keep)
    # The faces the job dubs: the job's choice (when some output frame uses it) and each segment's own,
    # each distinct one once; with face=speaker, the audio envelope it judges (per source frame).
    choices: list[FaceChoice] = field(default_factory=list)
    envelopes: list[np.ndarray | None] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # the parameter each choice comes from, for errors
    segment_face: list[int | None] | None = None  # per segment: its index in `choices` (None: no segments)
    found: FaceTracks | None = None  # everyone in the video (one detection pass, whatever the choices)
    tracks: list[FaceTrack] = field(default_factory=list)  # per choice
    avatars: list[Avatar | None] = field(default_factory=list)  # per choice, with the avatar cache
    plan: RenderPlan | None = None
    steps: np.ndarray | None = None  # Whisper encoder states of the audio
    sound: Path | None = None  # what the encoder muxes

    @property
    def params(self) -> JobParams:
        return self.opts.params

    @property
    def face(self) -> FaceChoice:
        """Whose face is dubbed (the job's face, face_point, face_boxes)."""
        return FaceChoice.from_params(self.params)

    @property
    def track(self) -> FaceTrack:
        """The first face's track (the only one unless segments name their own)."""
        return self.tracks[0]

    @property
    def avatar(self) -> Avatar | None:
        return self.avatars[0] if self.avatars else None

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise JobCancelledError("the job was cancelled")

    def new_store(self) -> FrameStore:
        return FrameStore(self.info.height, self.info.width, self.work_dir)


def run(
    model: LipSyncModel,
    detector: FaceDetector,
    video: Path | str,
    audio: Path | str,
    output: Path | str,
    options: PipelineOptions | None = None,
    *,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    work_dir: Path | str | None = None,
    cache: AvatarCache | None = None,
    video_info: VideoInfo | None = None,
    masks: MaskProvider | None = None,
) -> JobResult:
    """Lip-sync `video` to `audio` and write an MP4 to `output` (atomically: all or nothing).

    With an avatar cache, the face track and the face latents of a video seen before are reused.
    `video_info`: the inputs were already checked with validate_inputs (do not probe them again).
    `masks`: where the blend masks come from (masks.py: MuseTalk's face parsing, or the contour).
    """
    opts = options or PipelineOptions()
    opts = opts if opts.codecs is not None else replace(opts, codecs=video_codecs())
    video, audio, output = Path(video), Path(audio), Path(output)
    info = video_info or validate_inputs(video, audio, opts.ffmpeg_timeout_s, opts.limits.max_video_pixels)[0]
    clock = StageClock()
    frames = FrameSource(lambda: _reader(video, info, opts, job.n_decode), (info.height, info.width, 3), clock=clock,
                         name=video.name)
    job = JobState(model=model, detector=detector, video=video, audio=audio, output=output, info=info, opts=opts,
                   clock=clock, report=progress or (lambda stage, fraction: None), should_cancel=should_cancel,
                   work_dir=Path(work_dir) if work_dir is not None else None, frames=frames, masks=masks)
    try:
        _read_audio(job)
        if job.n_decode is not None:  # a track of the first frames only is not the video's: not for the cache
            cache = None
        job.report("faces", 0.0)
        with _prepared_video(job, cache) as hit:
            job.plan = build_plan(job.params, n_video=len(job.track), n_audio=job.n_audio, fps=info.fps,
                                  has_face=np.stack([t.has_face for t in job.tracks]), speech=job.speech,
                                  fade=opts.fade_frames, segment_face=job.segment_face)
            _arrange_frames(job)
            _audio_features(job)
            result = _render(job)
        result.cache_hit = hit if cache is not None else None
    finally:
        frames.close()
        if job.sound is not None and job.sound != audio:
            job.sound.unlink(missing_ok=True)
    job.report("done", 1.0)
    result.seconds = dict(clock.seconds)
    return result


def _reader(video: Path, info: VideoInfo, opts: PipelineOptions, stop_after: int | None = None) -> VideoReader:
    return VideoReader(video, info, timeout_s=opts.ffmpeg_timeout_s, max_frames=opts.limits.max_frames(info.fps),
                       hwaccel=opts.codecs.hwaccel, stop_after=stop_after, max_pixels=opts.limits.max_video_pixels)


def _read_audio(job: JobState) -> None:
    """The new audio as PCM, its length in frames, and (silence=keep) where it is speech."""
    job.report("audio", 0.0)
    fps = job.info.fps
    with job.clock("audio"):
        job.pcm = decode_audio(job.audio, audio_math.SAMPLE_RATE, timeout_s=job.opts.ffmpeg_timeout_s,
                               max_seconds=job.opts.limits.max_audio_seconds)
        job.n_audio = audio_math.frame_count(len(job.pcm), fps)
        if job.n_audio == 0:
            raise InvalidInputError(f"{job.audio.name} is shorter than one video frame")
    check_segments(job.params, n_video_estimate=job.info.frame_count_estimate, n_audio=job.n_audio, fps=fps)
    info = job.info
    n_decode = frames_to_decode(job.params.sync_mode, n_video=info.frame_count_estimate, n_held=info.packet_count,
                                n_audio=job.n_audio, name=job.video.name)
    job.n_decode = n_decode if n_decode < info.frame_count_estimate else None
    if job.params.silence == "keep":
        with job.clock("speech"):
            job.speech = speech_frames(job.pcm, fps, job.opts.speech)
    _choose_faces(job)
    job.check_cancel()


def _choose_faces(job: JobState) -> None:
    """The faces the job dubs (JobState.choices): the job's, unless every segment names its own, and
    each segment's own; equal choices once (one track, one cache entry)."""
    params, fps = job.params, job.info.fps
    segments = params.segments or []
    keys: dict[str, int] = {}
    full: np.ndarray | None = None

    def add(choice: FaceChoice, label: str, start: int = 0, stop: int | None = None, shift: int = 0) -> int:
        nonlocal full
        envelope = None
        if choice.needs_audio:
            if full is None:  # on the video's timeline: source frame i against audio frame i
                full = audio_envelope(job.pcm, fps, job.n_audio, audio_math.SAMPLE_RATE)
            envelope = full if stop is None else segment_envelope(full, start, stop, shift)
        key = choice.key(envelope)
        if key not in keys:
            keys[key] = len(job.choices)
            job.choices.append(choice)
            job.envelopes.append(envelope)
            job.labels.append(label)
        return keys[key]

    job_face = None
    if not segments or not all(seg.chooses_face for seg in segments):
        job_face = add(job.face, "")
    if not segments:
        return
    job.segment_face = []
    for k, seg in enumerate(segments):
        if not seg.chooses_face:
            job.segment_face.append(job_face)
            continue
        start, stop = frame_at(seg.start, fps), frame_at(seg.end, fps)
        shift = 0 if seg.audio_start is None else frame_at(seg.audio_start, fps) - start
        job.segment_face.append(add(FaceChoice.from_params(seg), f"segments[{k}]", start, stop, shift))


@contextmanager
def _prepared_video(job: JobState, cache: AvatarCache | None) -> Iterator[bool]:
    """Sets job.track (and job.avatar, where its latents live) from the cache or by tracking now;
    yields whether it was a cache hit."""
    if not job.choices:  # an avatar's preparation: the job's face only, no audio
        job.choices, job.envelopes, job.labels = [job.face], [None], [""]
    if cache is None:
        job.tracks = [_track(job, k) for k in range(len(job.choices))]
        job.avatars = [None] * len(job.choices)
        yield False
        return
    opts = job.opts
    with job.clock("cache"):
        video_hash = cache.video_hash(job.video)
    # One entry per face: a segment's own face is its own preparation (track and latents), the job's
    # keeps the key it always had (an avatar's, a job's without segment faces).
    hits = []
    with ExitStack() as entries:
        for k, choice in enumerate(job.choices):
            # Only what changes the track or the latents: sync mode, silence and segments do not.
            params = AvatarParams(
                bbox_shift=job.params.bbox_shift if opts.version == "v1" else 0,  # v1.5 ignores bbox_shift
                version=opts.version, extra_margin=opts.extra_margin, detector=job.detector.name,
                detect_every=opts.detect_every, weights_id=str(getattr(job.model, "weights_id", "")),
                face=choice.key(job.envelopes[k]))
            avatar, hit = entries.enter_context(cache.open(params.key(video_hash), lambda k=k: _track(job, k)))
            job.tracks.append(avatar.track)
            job.avatars.append(avatar)
            hits.append(hit)
        yield all(hits)


def _track(job: JobState, k: int) -> FaceTrack:
    """The track of the job's k-th face: everyone found (one decode for all the faces), then the choice."""
    if job.found is None:
        job.found = _find(job)
    start = time.perf_counter()
    try:
        return choose_track(job.found, job.choices[k], job.found.frame_hw, job.envelopes[k], job.info.fps)
    except InvalidInputError as exc:  # which parameter named nobody (NoFaceError stays what it is)
        if not job.labels[k]:
            raise
        raise type(exc)(f"{job.labels[k]}: {exc}") from None
    finally:
        job.clock.seconds["faces"] += time.perf_counter() - start


def _find(job: JobState) -> FaceTracks:
    """Decode every frame once and find every face on each; keep the frames for the render when
    that is the plan's policy (plan.spools_frames)."""
    info, opts = job.info, job.opts
    n_video = info.frame_count_estimate if job.n_decode is None else job.n_decode
    if spools_frames(job.params, n_video=n_video, n_audio=job.n_audio, width=info.width,
                     height=info.height, max_spool_bytes=opts.max_spool_bytes, cold=True):
        job.frames.store = job.new_store()
    expected = max(1, n_video)

    def chunks() -> Iterator[np.ndarray]:
        with closing(job.frames.chunks(DETECT_CHUNK)) as decoded:
            for chunk in decoded:
                job.check_cancel()
                job.report("faces", FACES_SHARE * min(1.0, job.frames.decoded / expected))
                yield chunk

    # Face detection time is the total minus what decoding and spooling took inside the generator.
    before = job.clock.seconds["decode"] + job.clock.seconds["spool"]
    start = time.perf_counter()
    # closed here, not when garbage collected: a stop (cancel, no face) waits for the read-ahead and
    # the store write in flight before the job closes the reader and the store under them
    detector = job.detector if any(c.needs_detection for c in job.choices) else None  # boxes only: no detection
    with closing(chunks()) as tracked:
        found = find_tracks(tracked, detector, bbox_shift=job.params.bbox_shift, version=opts.version,
                            extra_margin=opts.extra_margin, detect_every=opts.detect_every)
    io = job.clock.seconds["decode"] + job.clock.seconds["spool"] - before
    job.clock.seconds["faces"] += time.perf_counter() - start - io
    return found


def _arrange_frames(job: JobState) -> None:
    """Make the frame source able to serve the plan with as few decodes as possible."""
    frames, plan = job.frames, job.plan
    if frames.complete:  # decoded once into the store while tracking: everything is there
        return
    if frames.decoded == 0:  # face track from the cache: one straight decode, stored only if it goes back
        if not plan.sequential:
            frames.store = job.new_store()
        return
    # Tracked without keeping the frames (too large to spool): decode a second time.
    frames.rewind(store=None if plan.sequential else job.new_store())


def _audio_features(job: JobState) -> None:
    """Whisper states of the audio, padded with silence as far as the generated frames read."""
    job.report("audio", FACES_SHARE)
    plan, fps = job.plan, job.info.fps
    pcm = job.pcm
    needed = plan.audio_frames_needed()
    if needed > job.n_audio:  # cross-fades into sync_mode=silence's padded tail
        samples = -(-(needed + 1) * audio_math.SAMPLE_RATE * fps.denominator // fps.numerator)
        pcm = np.concatenate([pcm, np.zeros(max(0, samples - len(pcm)), np.float32)])
    with job.clock("audio"):
        job.steps = job.model.audio_features(pcm) if plan.generate.any() else None
        if plan.sound_is_the_audio:
            job.sound = job.audio
        else:
            handle = tempfile.NamedTemporaryFile(prefix="sound-", suffix=".wav", dir=job.work_dir, delete=False)
            handle.close()
            job.sound = Path(handle.name)
            write_soundtrack(job.audio, plan.sound, job.sound, timeout_s=job.opts.ffmpeg_timeout_s)
    job.pcm = None
    job.check_cancel()


@dataclass
class _Pending:
    """Generated faces waiting to be pasted into their frames."""

    sel: np.ndarray
    faces: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray | None
    weights: np.ndarray


def _render(job: JobState, window: tuple[int, int] | None = None, sink=None) -> JobResult:
    """Execute the plan in overlapped stages: while the model works on the last ``chunks_in_flight``
    chunks, the next is read (decode or frame store) and cropped, and the one before them is blended
    and encoded. Each stage keeps its order (outputs are written in plan order, identical to one chunk
    at a time); at most chunks_in_flight + 2 chunks are in memory; the first error from any stage stops
    the others and is raised. ``window``: output frames [start, stop) only (a preview); ``sink``: where
    frames go instead of the job's VideoWriter (anything with write and close)."""
    plan, info, opts = job.plan, job.info, job.opts
    first, end = window or (0, len(plan))
    n_out = end - first
    batch = opts.batch_size
    starts = list(range(first, end, batch))
    in_flight = max(1, opts.chunks_in_flight)
    written = 0

    def progress(fraction: float) -> None:
        job.report("generate", FACES_SHARE + (1 - FACES_SHARE) * fraction)

    def read(start: int) -> tuple[np.ndarray, np.ndarray]:
        out_idx = np.arange(start, min(start + batch, end))
        return out_idx, job.frames.take(plan.source[out_idx])

    def finish(writer: VideoWriter, frames: np.ndarray, pending: _Pending | None) -> int:
        if pending is not None:
            with job.clock("blend"):
                faces, frame_masks = pending.faces, None
                if job.params.sharpen > 0 or job.masks is not None:  # these take the frames as one array
                    source = frames[pending.sel]
                    if job.params.sharpen > 0:
                        faces = restore_detail(source, faces, pending.boxes, pending.landmarks, job.params.sharpen)
                    frame_masks = masks_for(job.masks, source, pending.boxes, pending.landmarks)
                # views of the chunk's frames: only the mask rectangles are written, no frame is copied
                blend_faces([frames[i] for i in pending.sel], faces, pending.boxes, pending.landmarks,
                            masks=frame_masks, weights=pending.weights, inplace=True)
        with job.clock("encode"):
            writer.write(frames)
        return len(frames)

    with sink or VideoWriter(job.output, info.width, info.height, info.fps, audio_path=job.sound, crf=opts.crf,
                             preset=opts.preset, timeout_s=opts.ffmpeg_timeout_s, codec=opts.codecs.encoder,
                             threads=opts.codecs.threads, quality=job.params.quality,
                             output_height=job.params.output_height, hls=opts.hls) as writer, \
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="lipsync-io") as pool, \
            ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="lipsync-model") as calls:
        next_read = pool.submit(read, starts[0])
        at_model: deque[tuple[np.ndarray, Future]] = deque()  # (chunk's frames, its faces to come), in order
        last_write: Future | None = None

        def hand_oldest_to_writer() -> None:
            nonlocal last_write, written
            frames, generated = at_model.popleft()
            pending = generated.result()
            if last_write is not None:
                written += last_write.result()
                progress(written / n_out)
            last_write = pool.submit(finish, writer, frames, pending)

        for k in range(len(starts)):
            job.check_cancel()
            out_idx, frames = next_read.result()
            if k + 1 < len(starts):
                next_read = pool.submit(read, starts[k + 1])
            at_model.append((frames, _generate_chunk(job, out_idx, frames, calls)))
            while len(at_model) >= in_flight:
                hand_oldest_to_writer()
        while at_model:
            hand_oldest_to_writer()
        if last_write is not None:
            written += last_write.result()
            progress(written / n_out)
        with job.clock("encode"):
            writer.close()
    has_face = np.any([t.has_face for t in job.tracks], axis=0)
    return JobResult(output=job.output, frames=written, source_frames=len(job.track), face_frames=int(has_face.sum()),
                     fps=info.fps, width=info.width, height=info.height, generated=int(plan.generate.sum()),
                     faces=faces_summary(job))


def faces_summary(job: JobState) -> dict | None:
    """The job status' ``faces``: everyone found and who was dubbed (``chosen``: every track dubbed);
    with segments that name their own face, ``segments``: per such segment, the tracks it dubs."""
    summary = job.track.summary
    if summary is None or not any(seg.chooses_face for seg in job.params.segments or ()):
        return summary
    summary = dict(summary)
    chosen: list[int] = []
    segments = []
    for k, row in enumerate(job.segment_face):
        ids = list((job.tracks[row].summary or {}).get("chosen", [])) if row is not None else []
        chosen += [i for i in ids if i not in chosen]
        if job.params.segments[k].chooses_face:
            segments.append({"segment": k, "chosen": ids})
    summary["chosen"] = chosen
    summary["segments"] = segments
    return summary


def _generate_chunk(job: JobState, out_idx: np.ndarray, frames: np.ndarray, calls: Executor) -> Future:
    """Hand one chunk's generated frames to the model on `calls`; the future gives the faces to paste
    (a _Pending, or None: nothing generated in this chunk).

    A chunk's frames are grouped by whose face they dub (a speaker per segment: mostly one group).
    Where the model has the runner's combined calls, a frame that needs both prepare and generate
    makes one round trip: prepare_generate (the latents stay on the runner), or with an avatar entry
    prepare_generate_latents (they come back, for the next job); frames whose latents are cached
    only generate."""
    plan, model, clock = job.plan, job.model, job.clock
    sel = np.flatnonzero(plan.generate[out_idx])
    if len(sel) == 0:
        done: Future = Future()
        done.set_result(None)
        return done
    rows = out_idx[sel]
    src = plan.source[rows]
    whose = plan.face[rows]
    groups = [np.flatnonzero(whose == k) for k in np.unique(whose)]  # one per face in the chunk (mostly one)
    boxes = np.empty((len(rows), 4), np.int32)
    landmarks = None
    if all(job.tracks[whose[g[0]]].landmarks is not None for g in groups):
        landmarks = np.empty((len(rows), *job.tracks[whose[0]].landmarks.shape[1:]), np.float32)
    for g in groups:
        track = job.tracks[whose[g[0]]]
        boxes[g] = track.boxes[src[g]]
        if landmarks is not None:
            landmarks[g] = track.landmarks[src[g]]
    windows = audio_math.frame_windows(job.steps, plan.audio[rows], job.info.fps)
    weights = plan.weight[rows]
    both = getattr(model, "prepare_generate", None)
    keep = getattr(model, "prepare_generate_latents", None)

    def crops(g: np.ndarray, positions: np.ndarray | slice = slice(None)) -> np.ndarray:
        return crop_faces([frames[i] for i in sel[g][positions]], boxes[g][positions])

    # per group, what runs on `calls` and fills faces[g]; crops and a local prepare stay on this thread
    faces = np.empty((len(sel), CROP_SIZE, CROP_SIZE, 3), np.uint8)
    work: list[Callable[[], None]] = []
    for g in groups:
        avatar = job.avatars[whose[g[0]]]
        if avatar is None and both is not None:
            with clock("prepare"):  # the crops; their VAE encode runs on the runner, with generate
                cropped = crops(g)

            def call(g: np.ndarray = g, cropped: np.ndarray = cropped) -> None:
                with clock("generate"):
                    faces[g] = both(cropped, windows[g])
        elif avatar is None:
            with clock("prepare"):
                latents = model.prepare(crops(g))

            def call(g: np.ndarray = g, latents: np.ndarray = latents) -> None:
                with clock("generate"):
                    faces[g] = model.generate(latents, windows[g])
        else:
            def call(g: np.ndarray = g, avatar: Avatar = avatar) -> None:
                fresh = np.zeros(len(g), bool)

                def encode(todo: np.ndarray) -> np.ndarray:  # only frames no job has prepared before
                    if keep is None:
                        return model.prepare(crops(g, todo))
                    faces[g[todo]], latents = keep(crops(g, todo), windows[g[todo]])
                    fresh[todo] = True
                    return latents

                latents = _cached_latents(job, src[g], encode, avatar)
                rest = np.flatnonzero(~fresh)
                if len(rest):
                    with clock("generate"):
                        faces[g[rest]] = model.generate(latents[rest], windows[g[rest]])
        work.append(call)

    def run_all() -> _Pending:
        for call in work:
            call()
        return _Pending(sel, faces, boxes, landmarks, weights)
    return calls.submit(run_all)


def _cached_latents(job: JobState, src: np.ndarray, encode: Callable[[np.ndarray], np.ndarray],
                    avatar: Avatar | None = None) -> np.ndarray:
    """Latents of source frames `src` from the job's avatar entry; `encode(positions)` VAE-encodes the
    missing ones (in the service, in the same round trip as their generate). Timed apart: "prepare"
    is that encoding only (absent when every latent was cached), "cache" the reads of the entry, so a
    job's timings show whether it encoded anything."""
    clock = job.clock
    encoding = 0.0

    def timed(todo: np.ndarray) -> np.ndarray:
        nonlocal encoding
        start = time.perf_counter()
        try:
            with clock("prepare"):
                return encode(todo)
        finally:
            encoding += time.perf_counter() - start

    start = time.perf_counter()
    latents = (avatar or job.avatar).latents_for(src, timed)
    clock.add("cache", time.perf_counter() - start - encoding)
    return latents


# --------------------------------------------------------------------------- avatars


@dataclass
class AvatarResult:
    frames: int  # source frames
    face_frames: int  # frames with a face (their latents are in the entry)
    fps: Fraction
    width: int
    height: int
    encoded: int  # frames this call VAE-encoded (0 when the entry was complete already)
    seconds: dict[str, float] = field(default_factory=dict)
    cache_hit: bool = False  # the face track was in the cache already
    faces: dict | None = None  # FaceTrack.summary: the people found and who is dubbed


AVATAR_TRACK_SHARE = 0.5  # share of an avatar's progress bar given to face tracking (the rest: VAE encoding)


def prepare_avatar(
    model: LipSyncModel,
    detector: FaceDetector,
    video: Path | str,
    cache: AvatarCache,
    options: PipelineOptions | None = None,
    *,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    work_dir: Path | str | None = None,
    video_info: VideoInfo | None = None,
) -> AvatarResult:
    """Prepare once, dub many: the face track and the latents of every face frame of `video`, into
    its entry of `cache`, exactly as a job on this video with these options computes them (the same
    key, the same batches of frames in order), so a later job skips face tracking and VAE encoding.

    Only what shapes the preparation matters (options.params.bbox_shift, the model, the detector,
    the margins); there is no audio and no output video.
    """
    opts = options or PipelineOptions()
    opts = opts if opts.codecs is not None else replace(opts, codecs=video_codecs())
    video = Path(video)
    info = video_info or probe_video(video, timeout_s=min(PROBE_TIMEOUT_S, opts.ffmpeg_timeout_s or PROBE_TIMEOUT_S),
                                     max_pixels=opts.limits.max_video_pixels)
    clock = StageClock()
    report = progress or (lambda stage, fraction: None)
    frames = FrameSource(lambda: _reader(video, info, opts), (info.height, info.width, 3), clock=clock,
                         name=video.name)

    def tracking(stage: str, fraction: float) -> None:  # _track reports "faces" up to FACES_SHARE
        report(stage, AVATAR_TRACK_SHARE * min(1.0, fraction / FACES_SHARE))

    job = JobState(model=model, detector=detector, video=video, audio=None, output=None, info=info, opts=opts,
                   clock=clock, report=tracking, should_cancel=should_cancel,
                   work_dir=Path(work_dir) if work_dir is not None else None, frames=frames)
    try:
        report("faces", 0.0)
        with _prepared_video(job, cache) as hit:
            encoded = _encode_all(job, lambda done: report("prepare", AVATAR_TRACK_SHARE
                                                           + (1 - AVATAR_TRACK_SHARE) * done))
    finally:
        frames.close()
    report("done", 1.0)
    track = job.track
    return AvatarResult(frames=len(track), face_frames=int(track.has_face.sum()), fps=info.fps, width=info.width,
                        height=info.height, encoded=encoded, seconds=dict(clock.seconds), cache_hit=hit,
                        faces=track.summary)


def _encode_all(job: JobState, progress: Callable[[float], None]) -> int:
    """The latents of every face frame into the avatar entry, in the batches a forward job uses
    (consecutive source frames, batch_size at a time); returns how many were VAE-encoded."""
    track, frames, batch = job.track, job.frames, job.opts.batch_size
    n = len(track)
    if job.avatar.prepared[track.has_face].all():  # prepared before (this video, these options): nothing to do
        return 0
    if not frames.complete and frames.decoded:  # tracked without keeping the frames: decode again
        frames.rewind()
    encoded = 0
    for start in range(0, n, batch):
        job.check_cancel()
        idx = np.arange(start, min(start + batch, n))
        sel = np.flatnonzero(track.has_face[idx])
        if len(sel):
            chunk = frames.take(idx)
            src = idx[sel]
            boxes = track.boxes[src]

            def encode(todo: np.ndarray) -> np.ndarray:
                nonlocal encoded
                encoded += len(todo)
                return job.model.prepare(crop_faces([chunk[i] for i in sel[todo]], boxes[todo]))

            _cached_latents(job, src, encode)
        elif not frames.complete:
            frames.take(idx)  # keep the decoder in step
        progress(min(1.0, (start + len(idx)) / max(1, n)))
    return encoded


# --------------------------------------------------------------------------- preview


@dataclass
class PreviewResult:
    frames: np.ndarray  # [k, H, W, 3] RGB: output frames start..stop-1, as the full job renders them
    start: int  # first output frame
    stop: int  # exclusive
    fps: Fraction
    output: Path | None  # the stretch as an MP4 (with its sound), when asked for
    faces: dict | None  # as JobResult.faces
    cache_hit: bool | None = None
    seconds: dict[str, float] = field(default_factory=dict)


class _Collect:
    """A render sink that keeps the frames (a preview's stretch is short)."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def __enter__(self) -> "_Collect":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def write(self, frames: np.ndarray) -> None:
        self.frames.extend(np.array(f) for f in frames)

    def close(self) -> None:
        pass


def preview(
    model: LipSyncModel,
    detector: FaceDetector,
    video: Path | str,
    audio: Path | str,
    options: PipelineOptions | None = None,
    *,
    at: float | None = None,
    seconds: float = 1.5,
    output: Path | str | None = None,
    cache: AvatarCache | None = None,
    work_dir: Path | str | None = None,
    video_info: VideoInfo | None = None,
    masks: MaskProvider | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> PreviewResult:
    """A short stretch of the job `run` would do with these inputs and options: the same plan (faces,
    segments, sync mode, audio windows over the whole audio), rendered for output frames
    [at, at + seconds) only. ``at`` (seconds of the output): default, where the dubbing starts (the
    first generated frame: the first speech, with silence=keep). With a cache, the face track is
    built (or found) for the whole video, so the job that follows does not track again.
    ``output``: also write the stretch, with its sound, as an MP4 there."""
    opts = options or PipelineOptions()
    opts = opts if opts.codecs is not None else replace(opts, codecs=video_codecs())
    video, audio = Path(video), Path(audio)
    info = video_info or validate_inputs(video, audio, opts.ffmpeg_timeout_s, opts.limits.max_video_pixels)[0]
    clock = StageClock()
    frames = FrameSource(lambda: _reader(video, info, opts, job.n_decode), (info.height, info.width, 3), clock=clock,
                         name=video.name)
    job = JobState(model=model, detector=detector, video=video, audio=audio, output=None, info=info, opts=opts,
                   clock=clock, report=lambda stage, fraction: None, should_cancel=should_cancel,
                   work_dir=Path(work_dir) if work_dir is not None else None, frames=frames, masks=masks)
    sound: Path | None = None
    try:
        _read_audio(job)
        if job.n_decode is not None:
            cache = None
        with _prepared_video(job, cache) as hit:
            job.plan = plan = build_plan(job.params, n_video=len(job.track), n_audio=job.n_audio, fps=info.fps,
                                         has_face=np.stack([t.has_face for t in job.tracks]), speech=job.speech,
                                         fade=opts.fade_frames, segment_face=job.segment_face)
            start, stop = preview_window(plan, at, seconds)
            _arrange_frames(job)
            _audio_features(job)
            collected = _Collect()
            _render(job, (start, stop), collected)
        stretch = np.stack(collected.frames)
        out = None
        if output is not None:
            out = Path(output)
            sound = out.with_name(out.stem + "-sound.wav")
            write_soundtrack(audio, stretch_sound(plan, start, stop), sound, timeout_s=opts.ffmpeg_timeout_s)
            with clock("encode"), VideoWriter(out, info.width, info.height, info.fps, audio_path=sound, crf=opts.crf,
                                              preset=opts.preset, timeout_s=opts.ffmpeg_timeout_s,
                                              codec=opts.codecs.encoder, threads=opts.codecs.threads) as writer:
                writer.write(stretch)
    finally:
        frames.close()
        if job.sound is not None and job.sound != audio:
            job.sound.unlink(missing_ok=True)
        if sound is not None:
            sound.unlink(missing_ok=True)
    return PreviewResult(frames=stretch, start=start, stop=stop, fps=info.fps, output=out, faces=faces_summary(job),
                         cache_hit=hit if cache is not None else None, seconds=dict(clock.seconds))


def preview_window(plan: RenderPlan, at: float | None, seconds: float) -> tuple[int, int]:
    """Output frames [start, stop) of a preview: from ``at`` (or the first generated frame), ``seconds``
    long, within the output; InvalidInputError (400) for an ``at`` past the output's end."""
    n_out = len(plan)
    if at is None:
        generated = np.flatnonzero(plan.generate)
        start = int(generated[0]) if len(generated) else 0
    else:
        start = frame_at(at, plan.fps)
        if start >= n_out:
            raise InvalidInputError(f"at: {at:g} s is past the end of the output ({float(plan.duration):.3f} s)")
    length = max(1, round(seconds * plan.fps))
    start = max(0, min(start, n_out - length))  # a full-length stretch where the output allows
    return start, min(n_out, start + length)


def stretch_sound(plan: RenderPlan, start: int, stop: int) -> tuple[AudioPiece, ...]:
    """The output's sound for frames [start, stop), on the stretch's own timeline (from 0)."""
    a, b = Fraction(start) / plan.fps, Fraction(stop) / plan.fps
    pieces = []
    for p in plan.sound:
        lo, hi = max(a, p.out_start), min(b, p.out_start + p.duration)
        if hi > lo:
            pieces.append(AudioPiece(lo - a, p.src_start + (lo - p.out_start), hi - lo))
    return tuple(pieces)
