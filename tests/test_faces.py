"""Face detection, MuseTalk's crop-box rule and temporal tracking (lipsync_runner.faces)."""

from __future__ import annotations

import socket
import urllib.request

import cv2
import numpy as np
import pytest
import skimage.data

from lipsync_runner.errors import ModelFilesError, NoFaceError
from lipsync_runner.media.samples import actor_frames, synthetic_landmarks, two_people
from lipsync_runner.faces import (
    FAN_FILENAME,
    S3FD_FILENAME,
    FaceDetection,
    FaceDetector,
    FaceTrack,
    FanFaceDetector,
    OneEuro,
    HaarFaceDetector,
    fan_weights_present,
    load_face_detector,
    musetalk_crop_box,
    track_faces,
)

# Where the astronaut's face is in skimage.data.astronaut() (512x512): roughly x 180..270, y 65..165.
ASTRONAUT_FACE_CENTER = (224.0, 113.0)




def det_from(box, landmarks=None, score=1.0) -> FaceDetection:
    return FaceDetection(box=np.asarray(box, dtype=float), landmarks=landmarks, score=score)


# --------------------------------------------------------------------------- Haar


@pytest.fixture(scope="module")
def haar() -> HaarFaceDetector:
    return HaarFaceDetector()


def _center(box):
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def test_haar_finds_the_astronauts_face(haar):
    frame = skimage.data.astronaut()
    [[det]] = haar.detect(frame[None])
    assert isinstance(det, FaceDetection)
    assert det.landmarks is None and 0 < det.score <= 1
    assert det.box.shape == (4,)
    cx, cy = _center(det.box)
    assert abs(cx - ASTRONAUT_FACE_CENTER[0]) < 20 and abs(cy - ASTRONAUT_FACE_CENTER[1]) < 20
    assert 70 < det.box[2] - det.box[0] < 130


def test_haar_finds_a_scaled_translated_face_in_a_larger_canvas(haar):
    scale, ox, oy = 300 / 512, 250, 40
    canvas = np.full((360, 640, 3), 90, np.uint8)
    canvas[oy : oy + 300, ox : ox + 300] = cv2.resize(skimage.data.astronaut(), (300, 300), interpolation=cv2.INTER_AREA)
    [[det]] = haar.detect(canvas[None])
    cx, cy = _center(det.box)
    ex, ey = ox + ASTRONAUT_FACE_CENTER[0] * scale, oy + ASTRONAUT_FACE_CENTER[1] * scale
    assert abs(cx - ex) < 15 and abs(cy - ey) < 15
    assert 40 < det.box[2] - det.box[0] < 80


def test_haar_finds_every_face_of_two_real_people_largest_first(haar):
    actors = two_people(1, (480, 270))  # Grace Hopper (170 px head shot) left, the astronaut (140 px) right
    [dets] = haar.detect(next(actor_frames(actors, 1, (480, 270)))[None])
    assert len(dets) == 2
    areas = [(d.box[2] - d.box[0]) * (d.box[3] - d.box[1]) for d in dets]
    assert areas[0] > areas[1]
    for d, actor in zip(dets, actors):
        cx, cy = _center(d.box)
        ex, ey = actor.face_center(0)
        assert abs(cx - ex) < actor.size / 6 and abs(cy - ey) < actor.size / 4


def test_haar_finds_no_face_in_flat_or_noise_frames(haar):
    rng = np.random.default_rng(0)
    flat = np.full((360, 640, 3), 128, np.uint8)
    noise = rng.integers(0, 256, (360, 640, 3), dtype=np.uint8)
    assert haar.detect(np.stack([flat, noise])) == [[], []]


def test_haar_returns_one_result_per_frame_in_order(haar):
    face = cv2.resize(skimage.data.astronaut(), (360, 360))
    canvas = np.full((360, 640, 3), 128, np.uint8)
    with_face = canvas.copy()
    with_face[:, 100:460] = face
    res = haar.detect(np.stack([with_face, canvas, with_face]))
    assert [len(r) for r in res] == [1, 0, 1]
    assert isinstance(haar, FaceDetector) and haar.name == "haar"


# --------------------------------------------------------------------------- box rule


def test_box_rule_with_landmarks_v1():
    lm = synthetic_landmarks(100, 200, y29=150, chin=230)
    d = det_from([90, 60, 210, 240], lm)
    # mid = y29 = 150, half = 230 - 150 = 80, top = 70
    assert musetalk_crop_box(d, (480, 640), version="v1") == (100, 70, 200, 230)
    # bbox_shift moves the mid line: mid = 160, half = 70, top = 90
    assert musetalk_crop_box(d, (480, 640), version="v1", bbox_shift=10) == (100, 90, 200, 230)
    assert musetalk_crop_box(d, (480, 640), version="v1", bbox_shift=-10) == (100, 50, 200, 230)


def test_box_rule_casts_landmarks_to_int_like_musetalk():
    lm = synthetic_landmarks(100.9, 200.9, y29=150.7, chin=230.9)
    d = det_from([90, 60, 210, 240], lm)
    assert musetalk_crop_box(d, (480, 640), version="v1") == (100, 70, 200, 230)


def test_box_rule_top_is_clamped_at_zero():
    lm = synthetic_landmarks(100, 200, y29=50, chin=230)
    assert musetalk_crop_box(det_from([90, 0, 210, 240], lm), (480, 640), version="v1") == (100, 0, 200, 230)


def test_box_rule_v15_adds_extra_margin_and_ignores_bbox_shift():
    lm = synthetic_landmarks(100, 200, y29=150, chin=230)
    d = det_from([90, 60, 210, 240], lm)
    assert musetalk_crop_box(d, (480, 640)) == (100, 70, 200, 240)  # default v15, margin 10
    assert musetalk_crop_box(d, (480, 640), version="v15", bbox_shift=25) == (100, 70, 200, 240)
    assert musetalk_crop_box(d, (480, 640), extra_margin=20) == (100, 70, 200, 250)


def test_box_rule_v15_margin_is_capped_at_the_frame_height():
    lm = synthetic_landmarks(100, 200, y29=150, chin=230)
    assert musetalk_crop_box(det_from([90, 60, 210, 235], lm), (235, 640)) == (100, 70, 200, 235)


@pytest.mark.parametrize(
    "lm, why",
    [
        (synthetic_landmarks(-5, 200, y29=150, chin=230), "x1 < 0"),
        (synthetic_landmarks(100, 100, y29=150, chin=230), "x2 <= x1"),
    ],
)
def test_invalid_landmark_box_falls_back_to_the_detector_box(lm, why):
    d = det_from([90.4, 60.6, 210.2, 240.0], lm)
    assert musetalk_crop_box(d, (480, 640), version="v1") == (90, 61, 210, 240), why
    assert musetalk_crop_box(d, (480, 640), version="v15") == (90, 61, 210, 250), why


def test_bbox_shift_below_the_chin_makes_the_landmark_box_invalid():
    lm = synthetic_landmarks(100, 200, y29=150, chin=230)
    d = det_from([90, 60, 210, 240], lm)
    # mid = 230 = chin -> half 0 -> y2 - y1 == 0: detector box
    assert musetalk_crop_box(d, (480, 640), version="v1", bbox_shift=80) == (90, 60, 210, 240)


def test_box_rule_without_landmarks_derives_from_the_detector_box():
    # Haar box 100x100 at (100, 100): jaw x inset 4 px each side, nose bridge at y 155, chin at 215,
    # so top = 155 - 60 = 95; v1.5 adds the margin below the chin
    d = det_from([100, 100, 200, 200])
    assert musetalk_crop_box(d, (480, 640), version="v1") == (104, 95, 196, 215)
    assert musetalk_crop_box(d, (480, 640), version="v15") == (104, 95, 196, 225)
    assert musetalk_crop_box(d, (480, 640), version="v1", bbox_shift=10) == (104, 115, 196, 215)
    # the crop reaches below the Haar box (which ends about at the lower lip) to take in the chin
    x1, y1, x2, y2 = musetalk_crop_box(d, (480, 640))
    assert y2 - 200 >= 0.2 * 100 and y1 <= 100


def test_box_rule_clamps_to_the_frame():
    lm = synthetic_landmarks(600, 700, y29=150, chin=230)
    x1, y1, x2, y2 = musetalk_crop_box(det_from([590, 60, 700, 240], lm), (480, 640), version="v1")
    assert (x1, y1, x2, y2) == (600, 70, 640, 230)


# --------------------------------------------------------------------------- tracking


class ScriptedDetector:
    """Returns a scripted detection per global frame index (frame content is ignored)."""

    name = "scripted"

    def __init__(self, script):
        self.script = script
        self.calls: list[int] = []
        self.seen = 0

    def detect(self, frames):
        # track_faces passes the frames it wants detected; their indices are recovered from the
        # frames' first pixel, which the test writes
        out = []
        for f in frames:
            i = int(f[0, 0, 0]) + 256 * int(f[0, 0, 1])
            self.calls.append(i)
            out.append(self.script[i])
        return out


def frame_chunks(n, chunk=7, hw=(120, 160)):
    """Tiny frames whose first pixel encodes the index, yielded in chunks (a stream)."""
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        frames = np.zeros((b, *hw, 3), np.uint8)
        idx = np.arange(start, start + b)
        frames[:, 0, 0, 0] = idx % 256
        frames[:, 0, 0, 1] = idx // 256
        yield frames


def boxes_script(boxes):
    return [[] if b is None else [det_from(b)] for b in boxes]


def test_track_smooths_jittery_boxes():
    rng = np.random.default_rng(1)
    n = 40
    base = np.array([40.0, 20.0, 100.0, 80.0])
    raw = [base + rng.normal(0, 3, 4) for _ in range(n)]
    det = ScriptedDetector(boxes_script(raw))
    raw_track = track_faces(frame_chunks(n), det, smoothing=None, version="v1")
    smooth_track = track_faces(frame_chunks(n), ScriptedDetector(boxes_script(raw)), smoothing=OneEuro(),
                               version="v1")
    assert raw_track.boxes.shape == (n, 4) and raw_track.boxes.dtype == np.int32
    jitter_raw = np.abs(np.diff(raw_track.boxes.astype(float), axis=0)).mean()
    jitter_smooth = np.abs(np.diff(smooth_track.boxes.astype(float), axis=0)).mean()
    assert jitter_smooth < jitter_raw / 2
    assert smooth_track.has_face.all() and smooth_track.detector == "scripted"
    assert smooth_track.landmarks is None


def test_track_smoothing_never_crosses_a_no_face_gap():
    a, b = [10, 10, 60, 60], [30, 10, 80, 60]  # the same person, moved while out of sight for 5 frames
    script = boxes_script([a] * 10 + [None] * 5 + [b] * 10)
    track = track_faces(frame_chunks(25), ScriptedDetector(script), smoothing=OneEuro(min_cutoff=0.05), version="v1")
    assert track.summary["count"] == 1
    box_a = musetalk_crop_box(det_from(a), (120, 160), version="v1")
    box_b = musetalk_crop_box(det_from(b), (120, 160), version="v1")
    assert (track.boxes[:10] == box_a).all()
    assert (track.boxes[15:] == box_b).all()
    assert not track.has_face[10:15].any() and (track.boxes[10:15] == -1).all()
    assert track.has_face[:10].all() and track.has_face[15:].all()


def test_track_flags_frames_without_a_face():
    box = [10, 10, 60, 60]
    script = boxes_script([None, None, box, box, box, None, None, None, box, box])
    track = track_faces(frame_chunks(10, chunk=3), ScriptedDetector(script), fill_gaps=0)
    assert isinstance(track, FaceTrack) and len(track) == 10
    assert track.has_face.tolist() == [False, False, True, True, True, False, False, False, True, True]
    assert (track.boxes[~track.has_face] == -1).all()
    assert (track.boxes[track.has_face] >= 0).all()


def test_track_fills_a_short_isolated_miss_by_interpolation():
    a, b = [10, 10, 60, 60], [14, 10, 64, 60]
    script = boxes_script([a] * 5 + [None] + [b] * 5 + [None] * 3 + [b] * 3 + [None])
    track = track_faces(frame_chunks(len(script)), ScriptedDetector(script), smoothing=None, fill_gaps=2)
    assert track.has_face[5]  # one missed frame between overlapping boxes: filled
    assert track.boxes[5, 0] == (track.boxes[4, 0] + track.boxes[6, 0]) // 2
    assert not track.has_face[11:14].any()  # 3 frames: longer than fill_gaps, kept as no face
    assert not track.has_face[-1]  # a miss at the end is never filled
    off = track_faces(frame_chunks(len(script)), ScriptedDetector(script), smoothing=None, fill_gaps=0)
    assert not off.has_face[5]


def test_track_does_not_fill_a_miss_between_different_faces():
    script = boxes_script([[10, 10, 60, 60]] * 3 + [None] + [[100, 50, 150, 100]] * 3)
    track = track_faces(frame_chunks(7), ScriptedDetector(script), smoothing=None)
    assert track.summary["count"] == 2  # two tracks, one after the other (a cut): both are dubbed
    assert track.has_face.tolist() == [True] * 3 + [False] + [True] * 3


def test_track_raises_no_face_error_when_no_frame_has_a_face():
    with pytest.raises(NoFaceError, match="no face was detected in any frame of the video") as info:
        track_faces(frame_chunks(12), ScriptedDetector([[]] * 12))
    assert info.value.http_status == 400


def test_track_with_detect_every_interpolates_skipped_frames():
    n = 10
    script = boxes_script([[10 + 2 * i, 10, 60 + 2 * i, 60] for i in range(n)])
    det = ScriptedDetector(script)
    track = track_faces(frame_chunks(n, chunk=4), det, smoothing=None, detect_every=3, version="v1")
    assert sorted(det.calls) == [0, 3, 6, 9]
    assert track.has_face.all()
    full = track_faces(frame_chunks(n), ScriptedDetector(script), smoothing=None, version="v1")
    assert np.abs(track.boxes - full.boxes).max() <= 1  # linear motion: interpolation is exact


def test_the_detector_sees_views_of_the_decoded_chunks_not_copies():
    """Every k-th frame reaches the detector as a view into the chunk: at 720p a copy of the
    detected frames cost the tracking pass's main thread about a fifth of the detector's own time."""
    chunks = list(frame_chunks(10, chunk=4))
    shared: list[bool] = []

    class Watching(ScriptedDetector):
        def detect(self, frames):
            shared.append(any(np.shares_memory(frames, c) for c in chunks))
            return super().detect(frames)

    det = Watching(boxes_script([[10, 10, 60, 60]] * 10))
    track_faces(iter(chunks), det, smoothing=None, detect_every=3, version="v1")
    assert det.calls == [0, 3, 6, 9] and shared == [True, True, True]


def test_track_keeps_landmarks_and_nan_rows():
    lm = synthetic_landmarks(40, 100, y29=50, chin=100)
    face = det_from([35, 20, 105, 105], lm)
    script = [[face], [face], [], [], [], [face]]
    track = track_faces(frame_chunks(6), ScriptedDetector(script))
    assert track.landmarks.shape == (6, 68, 2) and track.landmarks.dtype == np.float32
    assert np.isnan(track.landmarks[2:5]).all()
    np.testing.assert_allclose(track.landmarks[0], lm, atol=1e-4)
    assert tuple(track.boxes[0]) == musetalk_crop_box(face, (120, 160))


def test_track_with_haar_on_real_frames(haar):
    frame = skimage.data.astronaut()
    chunks = [np.stack([frame, frame]), np.stack([np.full_like(frame, 128), frame])]
    track = track_faces(iter(chunks), haar, fill_gaps=0)
    assert track.has_face.tolist() == [True, True, False, True]
    assert track.landmarks is None and track.detector == "haar"


# --------------------------------------------------------------------------- FAN (random weights)


@pytest.fixture(scope="module")
def fan_models_dir(tmp_path_factory):
    """A models dir holding random-weight S3FD and FAN files under their real names.

    S3FD's classifier heads are set to say "face" everywhere and its box regressors to zero, so
    every anchor becomes a box and the detection path always finds a face.
    """
    import torch
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    (root / "face-alignment").mkdir()
    sd = s3fd().state_dict()
    for k in sd:
        if "_mbox_" in k:
            sd[k].zero_()
        if "_mbox_conf" in k and k.endswith("bias"):
            sd[k][:] = -10.0
            sd[k][-1] = 10.0  # last channel: face
    torch.save(sd, root / "face-alignment" / S3FD_FILENAME)
    torch.save(FAN(4).state_dict(), root / "face-alignment" / FAN_FILENAME)
    return root


@pytest.fixture
def no_network(monkeypatch):
    import torch.hub
    import face_alignment.api
    import face_alignment.utils
    import face_alignment.detection.sfd.sfd_detector as sfd_detector

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(face_alignment.utils, "download_url_to_file", refuse)
    monkeypatch.setattr(face_alignment.utils, "load_file_from_url", refuse)
    monkeypatch.setattr(face_alignment.api, "load_file_from_url", refuse)
    monkeypatch.setattr(sfd_detector, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="module")
def fan_detector(fan_models_dir):
    return FanFaceDetector(fan_models_dir, device="cpu")


def test_fan_loads_local_weights_without_network(fan_models_dir, no_network):
    import torch

    det = FanFaceDetector(fan_models_dir, device="cpu")
    assert det.name == "fan" and isinstance(det, FaceDetector)
    saved = torch.load(fan_models_dir / "face-alignment" / FAN_FILENAME, weights_only=True)
    loaded = det._fa.face_alignment_net.state_dict()
    assert torch.equal(saved["conv1.weight"], loaded["conv1.weight"])


def test_fan_detect_returns_boxes_and_68_landmarks(fan_detector, no_network, monkeypatch):
    frames = skimage.data.astronaut()[None, :192, 128:384]
    monkeypatch.setattr(fan_detector, "max_faces", 2)  # each face is a FAN pass: seconds on a CPU
    res = fan_detector.detect(frames)
    assert len(res) == 1
    for dets in res:
        # the rigged S3FD sees hundreds of faces: landmarks only for the max_faces largest
        assert len(dets) == 2
        areas = [(d.box[2] - d.box[0]) * (d.box[3] - d.box[1]) for d in dets]
        assert areas == sorted(areas, reverse=True)
        for d in dets:
            assert isinstance(d, FaceDetection)
            assert d.box.shape == (4,) and d.landmarks.shape == (68, 2)
            assert np.isfinite(d.landmarks).all() and 0 < d.score <= 1
            assert 0 <= d.box[0] < d.box[2] <= 256 and 0 <= d.box[1] < d.box[3] <= 192
    box = musetalk_crop_box(res[0][0], (192, 256))
    assert len(box) == 4


def test_fan_landmarks_for_given_boxes(fan_detector):
    frame = skimage.data.astronaut()
    lms = fan_detector.landmarks_for_boxes(frame, np.array([[176, 65, 272, 161], [0, 0, 100, 100]]))
    assert lms.shape == (2, 68, 2) and lms.dtype == np.float32


def test_missing_face_model_file_raises_model_files_error(tmp_path, fan_models_dir):
    with pytest.raises(ModelFilesError, match=S3FD_FILENAME) as info:
        FanFaceDetector(tmp_path)
    assert info.value.http_status == 503
    assert "face-alignment" in str(info.value)
    (tmp_path / "face-alignment").mkdir()
    (tmp_path / "face-alignment" / S3FD_FILENAME).symlink_to(fan_models_dir / "face-alignment" / S3FD_FILENAME)
    with pytest.raises(ModelFilesError, match=FAN_FILENAME.replace(".", r"\.")):
        FanFaceDetector(tmp_path)
    with pytest.raises(ModelFilesError):
        load_face_detector("fan", tmp_path)


def test_broken_face_model_file_raises_model_files_error(tmp_path):
    d = tmp_path / "face-alignment"
    d.mkdir()
    (d / S3FD_FILENAME).write_bytes(b"not a checkpoint")
    (d / FAN_FILENAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFilesError, match="unreadable"):
        FanFaceDetector(tmp_path)


def test_load_face_detector_picks_fan_when_its_files_are_present(tmp_path, fan_models_dir, no_network):
    assert not fan_weights_present(tmp_path) and not fan_weights_present(None)
    assert fan_weights_present(fan_models_dir)
    assert load_face_detector("auto", tmp_path).name == "mediapipe"  # no FAN weights: MediaPipe
    assert load_face_detector("auto", None).name == "mediapipe"
    assert isinstance(load_face_detector("haar", fan_models_dir), HaarFaceDetector)
    assert isinstance(load_face_detector("auto", fan_models_dir), FanFaceDetector)
    with pytest.raises(ValueError):
        load_face_detector("dlib")
