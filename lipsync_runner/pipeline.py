"""One lip-sync job end to end, as a straight line of streaming stages.

    validate -> audio features -> pass 1: decode + track faces -> pass 2: decode ->
    crop -> prepare (VAE encode) -> generate (UNet + VAE decode) -> blend -> encode + mux

Frames flow through in chunks and are never all held at once; only per-frame boxes
(a few hundred bytes each) and the audio features (384 KB per second of audio) are
kept for the whole job. The model is anything with `audio_features`, `prepare` and
`generate` (the local MuseTalk component, or the GPU service's client).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from . import audio as audio_math
from .avatar_cache import Avatar, AvatarCache, AvatarParams
from .blend import blend_faces
from .crops import crop_faces
from .detail import restore_detail
from .errors import InvalidInputError, JobCancelledError, MediaProcessingError
from .faces import FaceDetector, FaceTrack, track_faces
from .framestore import FrameStore, pingpong_indices
from .masks import MaskProvider, masks_for
from .media import (PROBE_TIMEOUT_S, AudioInfo, VideoInfo, VideoReader, VideoWriter, decode_audio, probe_audio,
                    probe_video)
from .musetalk import LipSyncModel

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, float], None]
"""Called with (stage, overall fraction done in 0..1)."""

STAGES = ("audio", "decode", "faces", "prepare", "generate", "blend", "encode")
DETECT_CHUNK = 32  # frames per face-detection call
FACES_SHARE = 0.2  # share of the progress bar given to pass 1


@dataclass
class PipelineOptions:
    bbox_shift: int = 0
    batch_size: int = 8
    version: str = "v15"
    extra_margin: int = 10
    detect_every: int = 2  # face detection on every 2nd frame, interpolated between (then smoothed)
    crf: int = 18
    preset: str = "veryfast"
    ffmpeg_timeout_s: float | None = None
    sharpen: float = 0.0  # detail.restore_detail's amount; 0: plain paste


@dataclass
class JobResult:
    output: Path
    frames: int  # frames written
    source_frames: int  # frames in the input video
    face_frames: int  # input frames with a face
    fps: Fraction
    width: int
    height: int
    seconds: dict[str, float] = field(default_factory=dict)
    cache_hit: bool | None = None  # None: no avatar cache in use


class StageClock:
    """Wall time per stage; nested stages are not double counted by construction of the call sites."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


def validate_inputs(video: Path, audio: Path, timeout_s: float | None = None) -> tuple[VideoInfo, AudioInfo]:
    """Check both files by content (not extension) before any work starts."""
    bound = min(PROBE_TIMEOUT_S, timeout_s or PROBE_TIMEOUT_S)
    return probe_video(video, timeout_s=bound), probe_audio(audio, timeout_s=bound)


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
    `masks`: blend masks per face (masks.load_mask_provider: MuseTalk's face parsing or landmark
    contours); None: blend.py's own lower-face mask.
    """
    opts = options or PipelineOptions()
    video, audio, output = Path(video), Path(audio), Path(output)
    clock = StageClock()
    report = progress or (lambda stage, fraction: None)

    def check_cancel() -> None:
        if should_cancel is not None and should_cancel():
            raise JobCancelledError("the job was cancelled")

    info = video_info or validate_inputs(video, audio, opts.ffmpeg_timeout_s)[0]
    fps = info.fps

    report("audio", 0.0)
    with clock("audio"):
        pcm = decode_audio(audio, audio_math.SAMPLE_RATE, timeout_s=opts.ffmpeg_timeout_s)
        n_out = audio_math.frame_count(len(pcm), fps)
        if n_out == 0:
            raise InvalidInputError(f"{audio.name} is shorter than one video frame")
        steps = model.audio_features(pcm)
    del pcm
    check_cancel()

    # The audio outruns the video: pass 2 plays frames backward, which a stream cannot.
    store = FrameStore(info.height, info.width, work_dir) if n_out > info.frame_count_estimate else None
    faces_progress = lambda f: report("faces", FACES_SHARE * f)  # noqa: E731
    try:
        report("faces", 0.0)
        with _prepared_video(cache, model, detector, video, info, opts, clock, store, check_cancel,
                             faces_progress) as (track, avatar, hit):
            if store is not None and len(store) == 0:  # the face track came from the cache
                _fill_store(video, info, opts, clock, store, check_cancel)
            if n_out > len(track.has_face) and store is None:  # the probe's frame count was too optimistic
                store = FrameStore(info.height, info.width, work_dir)
                _fill_store(video, info, opts, clock, store, check_cancel)
            result = _render(model, track, steps, video, audio, output, info, n_out, opts, clock, store,
                             check_cancel, lambda f: report("generate", FACES_SHARE + (1 - FACES_SHARE) * f),
                             avatar, masks)
        result.cache_hit = hit if cache is not None else None
    finally:
        if store is not None:
            store.close()
    report("done", 1.0)
    result.seconds = dict(clock.seconds)
    return result


@contextmanager
def _prepared_video(cache: AvatarCache | None, model: LipSyncModel, detector: FaceDetector, video: Path,
                    info: VideoInfo, opts: PipelineOptions, clock: StageClock, store: FrameStore | None,
                    check_cancel: Callable[[], None], progress: Callable[[float], None]
                    ) -> Iterator[tuple[FaceTrack, Avatar | None, bool]]:
    """The face track (and, with a cache, the place its latents live): from the cache or computed now."""
    def build() -> FaceTrack:
        return _track(video, info, detector, opts, clock, store, check_cancel, progress)

    if cache is None:
        yield build(), None, False
        return
    params = AvatarParams(
        bbox_shift=opts.bbox_shift if opts.version == "v1" else 0,  # v1.5 ignores bbox_shift
        version=opts.version, extra_margin=opts.extra_margin, detector=detector.name,
        detect_every=opts.detect_every, weights_id=str(getattr(model, "weights_id", "")))
    with clock("cache"):
        key = params.key(cache.video_hash(video))
    with cache.open(key, build) as (avatar, hit):
        yield avatar.track, avatar, hit


def _fill_store(video: Path, info: VideoInfo, opts: PipelineOptions, clock: StageClock, store: FrameStore,
                check_cancel: Callable[[], None]) -> None:
    """Decode every frame into the store (ping-pong needs them), without face detection."""
    with VideoReader(video, info, timeout_s=opts.ffmpeg_timeout_s) as reader:
        for chunk in _chunks(reader, DETECT_CHUNK, clock):
            check_cancel()
            store.append(chunk)


def _chunks(reader: VideoReader, size: int, clock: StageClock) -> Iterator[np.ndarray]:
    while True:
        with clock("decode"):
            chunk = reader.read_chunk(size)
        if len(chunk) == 0:
            return
        yield chunk


def _track(video: Path, info: VideoInfo, detector: FaceDetector, opts: PipelineOptions, clock: StageClock,
           store: FrameStore | None, check_cancel: Callable[[], None],
           progress: Callable[[float], None]) -> FaceTrack:
    """Pass 1: decode every frame once, find the face crop of each, keep frames only if ping-pong needs them."""
    expected = max(1, info.frame_count_estimate)

    def frames() -> Iterator[np.ndarray]:
        done = 0
        with VideoReader(video, info, timeout_s=opts.ffmpeg_timeout_s) as reader:
            for chunk in _chunks(reader, DETECT_CHUNK, clock):
                check_cancel()
                if store is not None:
                    store.append(chunk)
                done += len(chunk)
                progress(min(1.0, done / expected))
                yield chunk

    # Face detection time is measured as the total minus what decoding took inside the generator.
    decode_before = clock.seconds["decode"]
    start = time.perf_counter()
    track = track_faces(frames(), detector, bbox_shift=opts.bbox_shift, version=opts.version,
                        extra_margin=opts.extra_margin, detect_every=opts.detect_every)
    clock.seconds["faces"] += time.perf_counter() - start - (clock.seconds["decode"] - decode_before)
    return track


def _render(model: LipSyncModel, track: FaceTrack, steps: np.ndarray, video: Path, audio: Path, output: Path,
            info: VideoInfo, n_out: int, opts: PipelineOptions, clock: StageClock, store: FrameStore | None,
            check_cancel: Callable[[], None], progress: Callable[[float], None],
            avatar: Avatar | None = None, masks: MaskProvider | None = None) -> JobResult:
    """Pass 2, in three overlapped stages: while the model works on chunk k, chunk k+1 is read
    (decode) and chunk k-1 is blended and encoded. Each stage keeps its order; at most three
    chunks are in memory; the first error from any stage stops the others and is raised."""
    n_src = len(track.has_face)
    reader = None if store is not None else VideoReader(video, info, timeout_s=opts.ffmpeg_timeout_s)
    source = _chunks(reader, opts.batch_size, clock) if reader is not None else None
    starts = list(range(0, n_out, opts.batch_size))
    written = 0

    def read(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out_idx = np.arange(start, min(start + opts.batch_size, n_out))
        if store is not None:
            src_idx = pingpong_indices(out_idx, n_src)
            with clock("decode"):
                return out_idx, src_idx, store.take(src_idx)
        chunk = next(source, None)  # n_out <= n_src: plain forward playback
        if chunk is None or len(chunk) < len(out_idx):
            raise MediaProcessingError(f"{video.name} ended early on the second read")
        return out_idx, out_idx, chunk[: len(out_idx)]

    def finish(writer: VideoWriter, frames: np.ndarray, pending: _Pending | None) -> int:
        if pending is not None:
            with clock("blend"):
                source = frames[pending.sel]
                faces = pending.faces
                if opts.sharpen > 0:
                    faces = restore_detail(source, faces, pending.boxes, pending.landmarks, opts.sharpen)
                frame_masks = masks_for(masks, source, pending.boxes, pending.landmarks)
                frames[pending.sel] = blend_faces(source, faces, pending.boxes, pending.landmarks,
                                                  masks=frame_masks, inplace=True)
        with clock("encode"):
            writer.write(frames)
        return len(frames)

    try:
        with VideoWriter(output, info.width, info.height, info.fps, audio_path=audio, crf=opts.crf,
                         preset=opts.preset, timeout_s=opts.ffmpeg_timeout_s) as writer, \
                ThreadPoolExecutor(max_workers=2, thread_name_prefix="lipsync-io") as pool:
            next_read = pool.submit(read, starts[0])
            last_write: Future | None = None
            for k in range(len(starts)):
                check_cancel()
                out_idx, src_idx, frames = next_read.result()
                if k + 1 < len(starts):
                    next_read = pool.submit(read, starts[k + 1])
                pending = _generate_chunk(model, track, steps, frames, src_idx, out_idx, info.fps, clock, avatar)
                if last_write is not None:
                    written += last_write.result()
                    progress(written / n_out)
                last_write = pool.submit(finish, writer, frames, pending)
            if last_write is not None:
                written += last_write.result()
                progress(written / n_out)
            with clock("encode"):
                writer.close()
    finally:
        if reader is not None:
            reader.close()
    return JobResult(output=output, frames=written, source_frames=n_src, face_frames=int(track.has_face.sum()),
                     fps=info.fps, width=info.width, height=info.height)


@dataclass
class _Pending:
    """Generated faces waiting to be pasted into their frames."""

    sel: np.ndarray
    faces: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray | None


def _generate_chunk(model: LipSyncModel, track: FaceTrack, steps: np.ndarray, frames: np.ndarray,
                    src_idx: np.ndarray, out_idx: np.ndarray, fps: Fraction, clock: StageClock,
                    avatar: Avatar | None = None) -> _Pending | None:
    """Crop, prepare (or take cached latents) and generate the faces of one chunk's face frames."""
    sel = np.flatnonzero(track.has_face[src_idx])
    if len(sel) == 0:
        return None
    boxes = track.boxes[src_idx[sel]]
    landmarks = track.landmarks[src_idx[sel]] if track.landmarks is not None else None
    with clock("prepare"):
        if avatar is None:
            latents = model.prepare(crop_faces(frames[sel], boxes))
        else:  # only frames no job has prepared before go through the VAE encoder
            latents = avatar.latents_for(src_idx[sel],
                                         lambda rows: model.prepare(crop_faces(frames[sel[rows]], boxes[rows])))
    with clock("generate"):
        windows = audio_math.frame_windows(steps, out_idx[sel], fps)
        faces = model.generate(latents, windows)
    return _Pending(sel, faces, boxes, landmarks)
