"""Which face is dubbed: one person's per-frame crop boxes out of all the tracks found.

The job parameters ``face``, ``face_point`` and ``face_boxes`` (lipsync_runner/params.py) become a
:class:`FaceChoice`; :func:`choose_track` turns the tracks found in a video into the
:class:`FaceTrack` the render uses: that person's crop box on every frame where they are seen,
short detector misses filled, smoothed, and ``has_face`` False on every other frame (those frames
pass through untouched, whoever else is on them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lipsync_runner.errors import InvalidInputError, NoFaceError
from lipsync_runner.params import FACE_RULES
from lipsync_runner.faces.boxes import clamp_box
from lipsync_runner.faces.detectors.base import NUM_LANDMARKS
from lipsync_runner.faces.identity import FaceTracks, IdentityTrack, iou
from lipsync_runner.faces.smoothing import OneEuro, runs, smooth_runs
from lipsync_runner.faces.speaker import speech_correlation

#: A person on screen for less than this share of the longest-seen person's frames is not a
#: candidate for largest / center / speaker (a passer-by, a face on a poster seen for a moment).
MIN_SCREEN_SHARE = 0.25
DEFAULT_FPS = 25.0

KeyBox = tuple[int, tuple[int, int, int, int] | None]


@dataclass
class FaceTrack:
    """Per-frame crop boxes of the person being dubbed, for a whole video (no frames kept)."""

    boxes: np.ndarray  # (N, 4) int32 crop boxes x1, y1, x2, y2; rows of -1 where no face
    landmarks: np.ndarray | None  # (N, 68, 2) float32 frame pixels, NaN rows where no face; None (Haar)
    has_face: np.ndarray  # (N,) bool
    detector: str
    track_id: int | None = None  # the chosen person's (first) track id in `summary` (None: explicit boxes)
    summary: dict[str, Any] | None = None  # FaceTracks.summary(): everyone found, for the job status

    def __len__(self) -> int:
        return len(self.has_face)

    def landmarks_or_none(self, start: int, stop: int) -> np.ndarray | None:
        """Landmarks for frames [start, stop) or None when the track has none."""
        return None if self.landmarks is None else self.landmarks[start:stop]


@dataclass(frozen=True)
class FaceChoice:
    """Whose face is dubbed; at most one of a non-default ``face``, ``point`` and ``boxes``.

    * ``face``: ``largest`` (the most screen area over time), ``center`` (nearest the frame's
      centre on average), ``speaker`` (mouth moving with the new audio) or a track id from an
      earlier job's status on the same video. A rule also takes the tracks never on screen
      together with the chosen one (the same person after a cut): see chosen_tracks.
    * ``point``: (x, y) pixels; the person whose face box holds it on the first frame they appear.
    * ``boxes``: explicit crop boxes ``(frame, (x1, y1, x2, y2) or None)``, frames increasing; no
      detection runs. A box holds (interpolated towards the next one) until the next given frame,
      the last one to the end of the video; None ends a stretch; frames before the first pass through.
    """

    face: str | int = "largest"
    point: tuple[float, float] | None = None
    boxes: tuple[KeyBox, ...] | None = None

    @classmethod
    def from_params(cls, params: Any) -> FaceChoice:
        """From a JobParams (any object with ``face``, ``face_point``, ``face_boxes``)."""
        boxes = getattr(params, "face_boxes", None)
        point = getattr(params, "face_point", None)
        return cls(
            face=getattr(params, "face", "largest"),
            point=None if point is None else (float(point[0]), float(point[1])),
            boxes=None if boxes is None else tuple(
                (int(k.frame), None if k.box is None else tuple(int(v) for v in k.box)) for k in boxes),
        )

    @property
    def needs_detection(self) -> bool:
        return self.boxes is None

    @property
    def needs_audio(self) -> bool:
        return self.boxes is None and self.point is None and self.face == "speaker"

    def key(self, audio_envelope: np.ndarray | None = None) -> str:
        """Canonical text of the choice, for a cache key (equal choices give equal text).

        ``face=speaker`` picks by the audio, so its key holds a digest of the audio envelope: the
        same video with another audio may dub someone else. (A client that reuses a video passes
        the track id from the first job's status, ``faces.chosen``, and hits the cache.)"""
        body: dict[str, Any] = {"face": self.face, "point": self.point,
                                "boxes": None if self.boxes is None else [[f, b] for f, b in self.boxes]}
        if self.needs_audio:
            if audio_envelope is None:
                raise ValueError("face=speaker: the cache key needs the audio envelope")
            body["audio"] = hashlib.sha256(np.asarray(audio_envelope, np.float32).tobytes()).hexdigest()[:32]
        return json.dumps(body, sort_keys=True, separators=(",", ":"))


def choose_track(tracks: FaceTracks, choice: FaceChoice | None, frame_hw: tuple[int, int],
                 audio_envelope: np.ndarray | None = None, fps: float | None = None, *,
                 fill_gaps: int = 2, smoothing: OneEuro | None = OneEuro()) -> FaceTrack:
    """The chosen person's :class:`FaceTrack` (see FaceChoice for the rules).

    * Short misses: a run of at most ``fill_gaps`` frames where the person's face was not found,
      between two frames where it was, with overlapping crop boxes (IoU >= 0.3), is filled by
      linear interpolation (a detector blinking is far likelier than a face vanishing that
      briefly, and passing those frames through would flicker). ``fill_gaps=0`` disables it.
    * Smoothing: a zero-lag One-Euro filter on crop boxes and landmarks within each run of
      frames with the face (smoothing.py); None disables it. ``fps`` (default 25) sets its time base.
    * ``audio_envelope`` (per source frame, speaker.audio_envelope) is needed for ``face=speaker``.

    Raises NoFaceError when nobody was found, InvalidInputError when the choice names nobody
    (an unknown track id, a point on no face, boxes past the video's end).
    """
    choice = choice or FaceChoice()
    if choice.boxes is not None:
        return explicit_track(choice.boxes, tracks.n_frames, frame_hw, tracks.summary())
    if not tracks.tracks:
        raise NoFaceError("no face was detected in any frame of the video")
    chosen = chosen_tracks(tracks, choice, frame_hw, audio_envelope)
    n = tracks.n_frames
    boxes = np.full((n, 4), -1, np.int32)
    has = np.zeros(n, bool)
    with_landmarks = all(t.landmarks is not None for t in chosen)
    lms_out = np.full((n, NUM_LANDMARKS, 2), np.nan, np.float32) if with_landmarks else None
    for track in chosen:  # highest rank first: it keeps a frame two tracks might both reach
        crops, lms, present = _steady(tracks, track, fill_gaps, smoothing, float(fps or DEFAULT_FPS))
        mine = present & ~has
        for i in np.flatnonzero(mine):
            boxes[i] = clamp_box(np.rint(crops[i]), frame_hw)
        if lms_out is not None and lms is not None:
            lms_out[mine] = lms[mine]
        has |= mine
    return FaceTrack(boxes=boxes, landmarks=lms_out, has_face=has, detector=tracks.detector, track_id=chosen[0].id,
                     summary=tracks.summary([t.id for t in chosen]))


def _steady(tracks: FaceTracks, track: IdentityTrack, fill_gaps: int, smoothing: OneEuro | None, rate: float
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """One track's per-frame crops, landmarks and presence, short misses filled, smoothed."""
    crops, lms, present = tracks.dense(track)
    n = len(present)
    if fill_gaps > 0:
        for a, b in runs(~present):
            if a == 0 or b == n or b - a > fill_gaps or iou(crops[a - 1], crops[b]) < 0.3:
                continue
            t = ((np.arange(a, b) - (a - 1)) / (b - a + 1))[:, None]
            crops[a:b] = (1 - t) * crops[a - 1] + t * crops[b]
            if lms is not None:
                lms[a:b] = (1 - t[:, :, None]) * lms[a - 1] + t[:, :, None] * lms[b]
            present[a:b] = True
    if smoothing is not None:
        scale = crops[:, 3] - crops[:, 1]
        crops = smooth_runs(crops, present, scale, rate, smoothing)
        if lms is not None:
            lms = smooth_runs(lms, present, scale, rate, smoothing)
    return crops, lms, present


# --------------------------------------------------------------------------- the rules


def chosen_tracks(tracks: FaceTracks, choice: FaceChoice, frame_hw: tuple[int, int],
                  audio_envelope: np.ndarray | None = None) -> list[IdentityTrack]:
    """The tracks dubbed, the one the choice names first (tracks non-empty).

    A point or a track id names one track. A rule (largest, center, speaker) ranks every track
    and takes the best, then, best first, every track that is never on screen together with one
    already taken: the same person in the next shot after a cut, or back after leaving the frame
    (their track ended), as far as can be told without recognising faces. Whoever shares the
    screen with the chosen person is someone else and is never dubbed, nor is a track that
    starts where one of theirs ended (that person back after a long look away)."""
    if choice.point is not None:
        return [_under_point(tracks, choice.point)]
    face = choice.face
    if isinstance(face, (int, np.integer)) and not isinstance(face, bool):
        found = tracks.by_id(int(face))
        if found is None:
            raise InvalidInputError(f"face={face}: this video has no face track {face}; "
                                    f"its tracks are {_ids(tracks)}")
        return [found]
    chosen: list[IdentityTrack] = []
    others: list[IdentityTrack] = []
    for t in ranked(tracks, face, frame_hw, audio_envelope):
        (others if any(_together(t, c) for c in chosen) else chosen).append(t)
    # A track that starts where one of the others ended is that person back (after turning
    # away for longer than a track waits), not the chosen one.
    moved = True
    while moved:
        moved = False
        for t in chosen[1:]:
            if _continues(t, chosen + others) in others:
                chosen.remove(t)
                others.append(t)
                moved = True
                break
    return chosen


def _together(a: IdentityTrack, b: IdentityTrack) -> bool:
    """Both on screen at some time (their spans from first to last sighting overlap)."""
    return not (a.last_frame < b.first_frame or a.first_frame > b.last_frame)


def _continues(t: IdentityTrack, pool: list[IdentityTrack]) -> IdentityTrack | None:
    """The track of ``pool`` that ended before ``t`` began, nearest to where ``t`` begins (within
    half a face: someone back where they were, not a new shot's framing), or None."""
    start = (t.crops[0, :2] + t.crops[0, 2:]) / 2
    size = float(np.sqrt(np.prod(t.crops[0, 2:] - t.crops[0, :2])))
    best, best_d = None, 0.5
    for x in pool:
        if x is t or x.last_frame >= t.first_frame:
            continue
        d = float(np.linalg.norm((x.crops[-1, :2] + x.crops[-1, 2:]) / 2 - start)) / max(size, 1e-6)
        if d < best_d or (d == best_d and best is not None and x.last_frame > best.last_frame):
            best, best_d = x, d
    return best


def ranked(tracks: FaceTracks, rule: str, frame_hw: tuple[int, int],
           audio_envelope: np.ndarray | None = None) -> list[IdentityTrack]:
    """Every track, best first by ``rule``; tracks seen too briefly to be candidates come last."""
    if rule not in FACE_RULES:
        raise ValueError(f"unknown face rule {rule!r} (expected one of {FACE_RULES} or a track id)")
    judged = None  # a segment's speaker: only who is on screen where the audio is judged may be chosen
    if rule == "speaker" and audio_envelope is not None and not np.isfinite(audio_envelope).all():
        judged = np.zeros(tracks.n_frames, bool)
        k = min(tracks.n_frames, len(audio_envelope))
        judged[:k] = np.isfinite(audio_envelope[:k])
    cands = {t.id for t in candidates(tracks, judged)}
    dense = {t.id: tracks.dense(t) for t in tracks.tracks}
    area = {t.id: _screen_area(dense[t.id][0], dense[t.id][2]) for t in tracks.tracks}
    if rule == "largest" or (rule == "speaker" and len(cands) == 1):
        score = dict(area)
    elif rule == "center":
        h, w = frame_hw
        centre = np.array([w / 2, h / 2])
        score = {}
        for t in tracks.tracks:
            crops, _, present = dense[t.id]
            c = (crops[present, :2] + crops[present, 2:]) / 2
            score[t.id] = -float(np.linalg.norm(c - centre, axis=1).mean())
    else:  # speaker; no evidence either way (0) ties, and ties go to the larger face
        if audio_envelope is None:
            raise ValueError("face=speaker needs the audio envelope (speaker.audio_envelope)")
        score = {t.id: round(speech_correlation(t.frames, t.mouth, audio_envelope), 6) for t in tracks.tracks}
    return sorted(tracks.tracks, key=lambda t: (t.id not in cands, -score[t.id], -area[t.id], t.id))


def candidates(tracks: FaceTracks, within: np.ndarray | None = None) -> list[IdentityTrack]:
    """Tracks on screen long enough to be chosen by a rule (see MIN_SCREEN_SHARE); ``within``: counting
    only these frames ([N] bool, a segment's)."""
    counts = {t.id: int((tracks.dense(t)[2] if within is None else tracks.dense(t)[2] & within).sum())
              for t in tracks.tracks}
    longest = max(counts.values())
    return [t for t in tracks.tracks if counts[t.id] >= MIN_SCREEN_SHARE * longest]


def segment_envelope(envelope: np.ndarray, start: int, stop: int, shift: int = 0) -> np.ndarray:
    """The audio envelope a segment's ``face=speaker`` judges: source frames [start, stop) against the
    audio frames that drive them (``shift``: the segment's audio_start), NaN everywhere else, so
    speech_correlation and the candidates see the segment only (and the cache key differs per segment)."""
    out = np.full(max(stop, 0), np.nan)
    idx = np.arange(max(start, 0), max(stop, 0))
    src = idx + shift
    ok = (src >= 0) & (src < len(envelope))
    out[idx[ok]] = np.asarray(envelope, np.float64)[src[ok]]
    return out


def _screen_area(crops: np.ndarray, present: np.ndarray) -> float:
    c = crops[present]
    return float(((c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])).sum())


def _ids(tracks: FaceTracks) -> str:
    return ", ".join(str(t.id) for t in tracks.tracks) or "none"


def _under_point(tracks: FaceTracks, point: tuple[float, float]) -> IdentityTrack:
    x, y = point
    hits = []
    for t in tracks.tracks:
        # the face as a person sees it: the detector's box or the crop box, whichever is larger
        b, c = t.boxes[0], t.crops[0]
        x1, y1, x2, y2 = min(b[0], c[0]), min(b[1], c[1]), max(b[2], c[2]), max(b[3], c[3])
        if x1 <= x <= x2 and y1 <= y <= y2:
            hits.append((float(np.hypot(x - (x1 + x2) / 2, y - (y1 + y2) / 2)), t.id, t))
    if not hits:
        seen = "; ".join(f"track {t.id} from frame {t.first_frame} at {[int(v) for v in t.crops[0]]}"
                         for t in tracks.tracks)
        raise InvalidInputError(f"face_point={x:g},{y:g}: no face lies under that point on the first frame "
                                f"it appears in (faces found: {seen})")
    return min(hits, key=lambda h: (h[0], h[1]))[2]


# --------------------------------------------------------------------------- explicit boxes


def explicit_track(keys: Sequence[KeyBox], n_frames: int, frame_hw: tuple[int, int],
                   summary: dict[str, Any] | None = None) -> FaceTrack:
    """A FaceTrack from user-given crop boxes (FaceChoice.boxes rules); no detection, no smoothing."""
    keys = sorted(keys, key=lambda k: k[0])
    for frame, box in keys:
        if frame >= n_frames:
            raise InvalidInputError(f"face_boxes: frame {frame} is past the end of the video "
                                    f"({n_frames} frames, numbered from 0)")
        if box is not None and (box[0] >= frame_hw[1] or box[1] >= frame_hw[0] or box[2] <= 0 or box[3] <= 0):
            raise InvalidInputError(f"face_boxes: the box {list(box)} of frame {frame} lies outside the "
                                    f"{frame_hw[1]}x{frame_hw[0]} frame")
    boxes = np.full((n_frames, 4), -1, np.int32)
    has = np.zeros(n_frames, bool)
    for k, (frame, box) in enumerate(keys):
        if box is None:
            continue
        nxt = keys[k + 1] if k + 1 < len(keys) else (n_frames, None)
        stop, to = nxt
        a = np.asarray(box, np.float64)
        b = a if to is None else np.asarray(to, np.float64)
        for i in range(frame, stop):
            t = (i - frame) / (stop - frame)
            boxes[i] = clamp_box(np.rint((1 - t) * a + t * b), frame_hw)
            has[i] = True
    return FaceTrack(boxes=boxes, landmarks=None, has_face=has, detector="explicit", track_id=None,
                     summary=summary)
