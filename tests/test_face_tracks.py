"""Faces with identity, the choice of face, speaker detection and steadier boxes (issue 12, items 4-5).

Real media: two real people side by side (scikit-image's astronaut and matplotlib's photo of
Grace Hopper), moving a little, found by the Haar detector; scripted detections where a test
needs exact control (ties, crossings, landmarks).
"""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from lipsync_runner.errors import InvalidInputError, NoFaceError
from lipsync_runner.faces import (
    FaceChoice,
    FaceDetection,
    FaceTrack,
    FaceTracks,
    HaarFaceDetector,
    IdentityTracker,
    TrackerSettings,
    audio_envelope,
    choose_track,
    explicit_track,
    find_tracks,
    one_euro,
    speech_correlation,
    track_faces,
)
from lipsync_runner.params import parse_fields
from lipsync_runner.media.samples import Actor, actor_frames, speech_like_signal, synthetic_landmarks, two_people

SIZE = (480, 270)  # width, height of the real-media clips
HW = (SIZE[1], SIZE[0])


def det(box, landmarks=None) -> FaceDetection:
    return FaceDetection(box=np.asarray(box, float), landmarks=landmarks, score=1.0)


def tracks_of(script: list[list], n_frames: int | None = None, settings: TrackerSettings | None = None,
              hw=(200, 400), mouth: list[list[float]] | None = None) -> FaceTracks:
    """Feed per-frame detections (boxes or FaceDetections) to the tracker; crop box = detector box."""
    tracker = IdentityTracker(settings)
    for i, frame in enumerate(script):
        dets = [d if isinstance(d, FaceDetection) else det(d) for d in frame]
        tracker.update(i, dets, [d.box for d in dets], None if mouth is None else mouth[i])
    n = n_frames or len(script)
    return tracker.finish(n, hw, np.ones(n, bool), "scripted")


def chunks(frames, size: int = 16):
    batch = []
    for f in frames:
        batch.append(f)
        if len(batch) == size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def centres(boxes: np.ndarray) -> np.ndarray:
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)


def on_actor(track: FaceTrack, actor: Actor, frames=None) -> bool:
    """Every face frame's crop box is centred on this actor's face (within a third of the head shot)."""
    idx = np.flatnonzero(track.has_face) if frames is None else np.asarray(frames)
    c = centres(track.boxes[idx].astype(float))
    truth = np.array([actor.face_center(i) for i in idx])
    return bool(len(idx)) and bool((np.linalg.norm(c - truth, axis=1) < actor.size / 3).all())


@pytest.fixture(scope="module")
def haar() -> HaarFaceDetector:
    return HaarFaceDetector()


# --------------------------------------------------------------------------- identity


def test_two_people_side_by_side_keep_their_ids_when_the_larger_one_changes_every_frame():
    # nearly equal faces: the detector's largest-first order flips every frame
    script = []
    for i in range(30):
        a = [40, 50, 120 + (i % 2) * 4, 130 + (i % 2) * 4]
        b = [240, 52, 322 - (i % 2) * 4, 134 - (i % 2) * 4]
        script.append(sorted([a, b], key=lambda box: -(box[2] - box[0]) * (box[3] - box[1])))
    tracks = tracks_of(script)
    assert len(tracks) == 2
    left, right = tracks.tracks
    assert (left.boxes[:, 0] < 100).all() and (right.boxes[:, 0] > 200).all()
    assert len(left.frames) == len(right.frames) == 30
    # the default choice dubs one person throughout, never the other
    track = choose_track(tracks, FaceChoice(), (200, 400), smoothing=None)
    assert track.has_face.all()
    assert len({int(x < 200) for x in centres(track.boxes.astype(float))[:, 0]}) == 1


def test_a_person_hidden_for_a_few_frames_keeps_their_id_and_is_not_dubbed_while_hidden():
    a, b = [40, 50, 120, 130], [240, 50, 320, 130]
    script = [[a, b]] * 10 + [[b]] * 8 + [[a, b]] * 10  # someone walks in front of a for 8 frames
    tracks = tracks_of(script)
    assert len(tracks) == 2 and tracks.tracks[0].frames.tolist() == list(range(10)) + list(range(18, 28))
    track = choose_track(tracks, FaceChoice(face=0), (200, 400))
    assert track.has_face.tolist() == [True] * 10 + [False] * 8 + [True] * 10  # the occluder is not painted over
    # hidden longer than max_age: they come back as a new track (a new id, never someone else's)
    short = tracks_of(script, settings=TrackerSettings(max_age=5))
    assert len(short) == 3 and [t.first_frame for t in short.tracks] == [0, 0, 18]


def test_people_crossing_paths_do_not_swap_when_the_one_behind_is_hidden():
    # a walks right, b walks left in front of it; while they overlap only b is detected
    script = []
    for i in range(40):
        xa, xb = 20 + 6 * i, 254 - 6 * i
        boxes = [[xb, 60, xb + 50, 110]]
        if abs(xa - xb) >= 50:
            boxes.append([xa, 60, xa + 50, 110])
        script.append(boxes)
    tracks = tracks_of(script)
    assert len(tracks) == 2
    a, b = sorted(tracks.tracks, key=lambda t: t.boxes[0][0])
    np.testing.assert_allclose(a.boxes[:, 0], 20 + 6 * a.frames)  # each track stays on its own path
    np.testing.assert_allclose(b.boxes[:, 0], 254 - 6 * b.frames)
    assert a.last_frame == 39 and b.last_frame == 39


def test_a_few_stray_detections_are_not_a_person():
    a = [40, 50, 120, 130]
    script = [[a]] * 20
    script[7] = [a, [300, 10, 330, 40]]  # one false hit in the background, twice
    script[8] = [a, [301, 10, 331, 40]]
    tracks = tracks_of(script)
    assert len(tracks) == 1 and len(tracks.tracks[0].frames) == 20


def test_landmarks_keep_identity_and_travel_with_the_track():
    def face(x):
        return det([x, 40, x + 80, 140], synthetic_landmarks(x + 5, x + 75, y29=80, chin=135))

    script = [[face(30 + i), face(220 - i)] for i in range(12)]
    tracks = tracks_of(script)
    assert len(tracks) == 2
    for t in tracks.tracks:
        assert t.landmarks.shape == (12, 68, 2)
        np.testing.assert_allclose(t.landmarks[:, 29, 0] - t.boxes[:, 0], 40, atol=1e-4)


def test_summary_is_json_and_says_who_is_where():
    a, b = [40, 50, 120, 130], [240, 50, 320, 130]
    tracks = tracks_of([[a]] * 5 + [[a, b]] * 15)
    s = tracks.summary(chosen=[1])
    assert json.loads(json.dumps(s)) == s
    assert s["count"] == 2 and s["frames"] == 20 and s["chosen"] == [1]
    assert s["tracks"][0] == {"id": 0, "first_frame": 0, "last_frame": 19, "frames": 20, "box": a}
    assert s["tracks"][1] == {"id": 1, "first_frame": 5, "last_frame": 19, "frames": 15, "box": b}


def test_skipped_frames_between_detections_are_filled_per_person(haar):
    script = [[[10 + 2 * i, 40, 70 + 2 * i, 100], [300, 40, 360, 100]] if i % 3 == 0 or i == 9 else []
              for i in range(10)]
    tracker = IdentityTracker()
    for i, frame in enumerate(script):
        if frame:
            tracker.update(i, [det(b) for b in frame], [np.asarray(b, float) for b in frame])
    detected = np.array([bool(f) for f in script])
    tracks = tracker.finish(10, (200, 400), detected, "scripted")
    crops, _, present = tracks.dense(tracks.tracks[0])
    assert present.all()
    np.testing.assert_allclose(crops[:, 0], 10 + 2 * np.arange(10))  # linear motion: exact


# --------------------------------------------------------------------------- the choice (scripted)


def test_largest_means_most_screen_area_over_the_video_not_in_one_frame():
    big_briefly, steady = [10, 10, 150, 150], [240, 50, 320, 130]
    script = [[big_briefly, steady]] * 4 + [[steady]] * 26
    tracks = tracks_of(script)
    track = choose_track(tracks, FaceChoice(), (200, 400))
    assert track.track_id == 1 and track.has_face.all()


def test_a_rule_follows_the_person_across_a_cut_and_never_dubs_someone_on_screen_with_them():
    a, b, after_cut = [20, 40, 140, 160], [260, 60, 340, 140], [170, 50, 270, 150]
    script = [[a, b]] * 10 + [[b]] * 5 + [[]] * 3 + [[after_cut]] * 12  # a leaves; then a new shot
    tracks = tracks_of(script)
    assert len(tracks) == 3
    track = choose_track(tracks, FaceChoice(), (200, 400), smoothing=None)
    assert track.summary["chosen"] == [0, 2] and track.track_id == 0
    assert track.has_face.tolist() == [True] * 10 + [False] * 8 + [True] * 12  # b is never dubbed
    assert tuple(track.boxes[0]) == tuple(a) and tuple(track.boxes[-1]) == tuple(after_cut)
    assert choose_track(tracks, FaceChoice(face=0), (200, 400)).has_face.sum() == 10  # an id is one track


def test_someone_else_back_after_a_long_look_away_is_still_someone_else():
    a, b = [20, 40, 140, 160], [260, 60, 340, 140]
    script = [[a, b]] * 10 + [[b]] * 5 + [[]] * 30 + [[[262, 60, 342, 140]]] * 10  # b gone for 30 frames
    tracks = tracks_of(script)
    assert len(tracks) == 3  # longer than max_age: b's return is a new track, never on screen with a
    track = choose_track(tracks, FaceChoice(), (200, 400))
    assert track.summary["chosen"] == [0] and track.has_face.sum() == 10


def test_center_picks_the_face_nearest_the_middle():
    left, middle = [20, 50, 120, 150], [170, 60, 240, 130]
    track = choose_track(tracks_of([[left, middle]] * 10), FaceChoice(face="center"), (200, 400))
    assert tuple(track.boxes[0]) == tuple(middle)


def test_a_track_id_picks_that_person_and_an_unknown_id_is_a_400():
    a, b = [40, 50, 120, 130], [240, 50, 320, 130]
    tracks = tracks_of([[a, b]] * 10)
    assert tuple(choose_track(tracks, FaceChoice(face=1), (200, 400)).boxes[0]) == tuple(b)
    with pytest.raises(InvalidInputError, match="no face track 7; its tracks are 0, 1") as info:
        choose_track(tracks, FaceChoice(face=7), (200, 400))
    assert info.value.http_status == 400


def test_a_point_picks_the_face_under_it_on_the_first_frame_that_face_appears():
    a = [40, 50, 120, 130]
    script = [[a]] * 10 + [[a, [240 + i, 50, 320 + i, 130]] for i in range(10)]  # b enters at frame 10
    tracks = tracks_of(script)
    track = choose_track(tracks, FaceChoice(point=(250, 60)), (200, 400), smoothing=None)
    assert track.track_id == 1 and track.has_face.tolist() == [False] * 10 + [True] * 10
    with pytest.raises(InvalidInputError, match="face_point=200,20: no face") as info:
        choose_track(tracks, FaceChoice(point=(200, 20)), (200, 400))
    assert info.value.http_status == 400


def test_explicit_boxes_are_interpolated_held_and_ended():
    keys = ((2, (10, 10, 50, 50)), (6, (50, 10, 90, 50)), (8, None), (10, (100, 20, 140, 60)))
    track = explicit_track(keys, 14, (100, 200))
    assert track.has_face.tolist() == [False] * 2 + [True] * 6 + [False] * 2 + [True] * 4
    assert track.boxes[2:7, 0].tolist() == [10, 20, 30, 40, 50]  # moving linearly to the next box
    assert track.boxes[7].tolist() == [50, 10, 90, 50]  # held until the null
    assert (track.boxes[10:] == [100, 20, 140, 60]).all()  # the last holds to the end
    assert (track.boxes[~track.has_face] == -1).all() and track.detector == "explicit"
    assert tuple(explicit_track(((0, (150, 80, 400, 300)),), 1, (100, 200)).boxes[0]) == (150, 80, 200, 100)
    with pytest.raises(InvalidInputError, match="frame 20 is past the end of the video"):
        explicit_track(((20, (1, 1, 5, 5)),), 14, (100, 200))
    with pytest.raises(InvalidInputError, match="outside"):
        explicit_track(((0, (300, 1, 350, 5)),), 14, (100, 200))


def test_explicit_boxes_run_no_detector():
    class Refuses:
        name = "refuses"

        def detect(self, frames):
            raise AssertionError("detection ran")

    frames = (np.zeros((4, 60, 80, 3), np.uint8) for _ in range(3))
    track = track_faces(frames, Refuses(), choice=FaceChoice(boxes=((0, (5, 5, 40, 40)),)))
    assert track.has_face.all() and len(track) == 12 and track.summary["count"] == 0


def test_no_face_anywhere_is_a_no_face_error():
    with pytest.raises(NoFaceError):
        choose_track(tracks_of([[]] * 10), FaceChoice(), (200, 400))


# --------------------------------------------------------------------------- speaker


def test_audio_envelope_is_the_rms_of_each_frames_samples_at_ntsc_rates():
    rate, fps = 16000, Fraction(30000, 1001)
    pcm = np.zeros(rate, np.float32)
    edge = (10 * rate * 1001) // 30000  # first sample of frame 10
    pcm[edge : edge + (rate * 1001) // 30000] = 0.5
    env = audio_envelope(pcm, fps)
    assert len(env) == 29  # floor(1 s * 29.97)
    assert env[10] == pytest.approx(0.5, abs=0.01) and env[9] == 0 and env[11] < 0.02
    assert len(audio_envelope(pcm, 25, n_frames=40)) == 40 and audio_envelope(pcm, 25, n_frames=40)[30:].max() == 0


def test_speaker_is_the_face_whose_lips_open_with_the_audio_landmarks():
    n = 60
    env = audio_envelope(speech_like_signal(n / 25, seed=1), 25)
    other = np.abs(np.sin(np.arange(n) / 3.0))  # talking to another rhythm

    def face(x, opening):
        lm = synthetic_landmarks(x + 5, x + 75, y29=80, chin=135)
        lm[62, 1], lm[66, 1] = 110 - 10 * opening, 110 + 10 * opening  # inner lips
        return det([x, 40, x + 80, 140], lm)

    from lipsync_runner.faces import mouth_measure

    script = [[face(30, env[i] / env.max()), face(240, other[i])] for i in range(n)]
    blank = np.zeros((200, 400, 3), np.uint8)
    mouth = [[mouth_measure(blank, d, d.box) for d in frame] for frame in script]
    tracks = tracks_of(script, mouth=mouth)
    assert speech_correlation(tracks.tracks[0].frames, tracks.tracks[0].mouth, env) > 0.9
    assert choose_track(tracks, FaceChoice(face="speaker"), (200, 400), env).track_id == 0
    swapped = [[face(30, other[i]), face(240, env[i] / env.max())] for i in range(n)]
    mouth = [[mouth_measure(blank, d, d.box) for d in frame] for frame in swapped]
    assert choose_track(tracks_of(swapped, mouth=mouth), FaceChoice(face="speaker"), (200, 400), env).track_id == 1


def test_speaker_with_one_face_is_that_face_and_without_audio_is_an_error():
    tracks = tracks_of([[[40, 50, 120, 130]]] * 10)
    assert choose_track(tracks, FaceChoice(face="speaker"), (200, 400), np.zeros(10)).track_id == 0
    with pytest.raises(ValueError, match="audio envelope"):
        choose_track(tracks_of([[[40, 50, 120, 130], [240, 50, 320, 130]]] * 10), FaceChoice(face="speaker"),
                     (200, 400))


# --------------------------------------------------------------------------- smoothing


def test_one_euro_steadies_a_still_face_and_follows_a_jump_without_lag():
    rng = np.random.default_rng(0)
    still = 100 + rng.normal(0, 1.5, (100, 1))
    smooth = one_euro(still / 80, 25) * 80  # in face heights: an 80 px face
    assert np.abs(np.diff(smooth[:, 0])).mean() < np.abs(np.diff(still[:, 0])).mean() / 3
    step = np.where(np.arange(60) < 30, 100.0, 160.0)[:, None]  # the head moves 60 px at once
    out = one_euro(step / 80, 25) * 80
    assert abs(out[29, 0] - 100) < 12 and abs(out[30, 0] - 160) < 12  # the jump stays where it is ...
    assert abs(out[33, 0] - 160) < 2 and abs(out[26, 0] - 100) < 2  # ... and is settled within 3 frames
    causal = one_euro(step / 80, 25, causal=True) * 80
    assert causal[30, 0] < out[30, 0]  # a live (forward only) filter lags; the offline one does not
    np.testing.assert_array_equal(one_euro(np.full((10, 2), 7.0), 25), np.full((10, 2), 7.0))


def test_smoothing_reduces_real_detector_jitter_on_a_still_face(haar):
    actors = [Actor("astronaut", 160, np.tile([[240.0, 135.0]], (30, 1)))]
    tracks = find_tracks(chunks(actor_frames(actors, 30, SIZE, seed=3)), haar)
    raw = choose_track(tracks, FaceChoice(), HW, smoothing=None)
    steady = choose_track(tracks, FaceChoice(), HW)
    jitter = lambda b: np.abs(np.diff(b.astype(float), axis=0)).mean()  # noqa: E731
    assert raw.has_face.all() and jitter(raw.boxes) > 0.3  # the detector does wobble on noise alone
    assert jitter(steady.boxes) < jitter(raw.boxes) / 2


# --------------------------------------------------------------------------- real photos


@pytest.fixture(scope="module")
def side_by_side(haar):
    """Grace Hopper (larger, left) and the astronaut (right, nearer the centre) moving a little."""
    n = 24
    actors = two_people(n, SIZE)
    actors[1].centers[:, 0] -= 50  # the astronaut nearer the middle
    return actors, find_tracks(chunks(actor_frames(actors, n, SIZE)), haar, detect_every=2)


@pytest.mark.parametrize("how, who", [
    ("largest", 0), ("center", 1), ("point", 1), ("point", 0), ("track id", 1), ("boxes", 1)])
def test_each_face_choice_dubs_the_intended_person_on_real_photos(side_by_side, how, who):
    actors, tracks = side_by_side
    assert len(tracks) == 2 and tracks.detector == "haar"
    target, other = actors[who], actors[1 - who]
    if how == "point":
        choice = FaceChoice(point=target.mouth_center(0))
    elif how == "track id":
        # what a client does: read the status' summary, pick the person by where they are
        summary = json.loads(json.dumps(tracks.summary()))
        x = target.face_center(0)[0]
        [pick] = [t["id"] for t in summary["tracks"] if abs((t["box"][0] + t["box"][2]) / 2 - x) < 40]
        choice = FaceChoice(face=pick)
    elif how == "boxes":
        x, y = target.face_center(0)
        choice = FaceChoice(boxes=((0, (int(x - 35), int(y - 30), int(x + 35), int(y + 45))),))
    else:
        choice = FaceChoice(face=how)
    track = choose_track(tracks, choice, HW, fps=25)
    assert track.has_face.all()
    assert on_actor(track, target) and not on_actor(track, other, [0])


def test_real_people_crossing_paths_keep_their_identities(haar):
    n = 50
    t = np.arange(n)
    hopper = Actor("hopper", 150, np.stack([90 + 6 * t, np.full(n, 135.0)], 1))
    astronaut = Actor("astronaut", 150, np.stack([390 - 6 * t, np.full(n, 140.0)], 1))  # walks in front
    actors = [hopper, astronaut]
    tracks = find_tracks(chunks(actor_frames(actors, n, SIZE)), haar)
    for who in actors:
        track = choose_track(tracks, FaceChoice(point=who.face_center(0)), HW, fps=25)
        # the astronaut's head shot covers the centre of Hopper's face
        hidden = [i for i in range(n) if who is hopper and abs(hopper.centers[i, 0] - astronaut.centers[i, 0]) < 75]
        assert on_actor(track, who), who.photo  # wherever this track is, it is this person
        assert track.has_face[:10].all() and track.has_face[-10:].all(), who.photo  # both ends: same id
        assert not track.has_face[hidden].any()  # never painted over the one in front


@pytest.mark.parametrize("kind", ["haar", "mediapipe"])  # mouth darkness from the crop / inner lips from landmarks
def test_speaker_is_the_real_face_whose_mouth_opens_with_the_new_audio(haar, kind):
    from lipsync_runner.faces import load_face_detector

    detector = haar if kind == "haar" else load_face_detector("mediapipe")
    n = 75 if kind == "haar" else 50  # the crop's darkness is a noisier measure than the lips
    speech = speech_like_signal(n / 25, seed=2)
    env = audio_envelope(speech, 25)
    other = audio_envelope(speech_like_signal(n / 25, seed=5)[::-1], 25)  # someone else's rhythm
    actors = two_people(n, SIZE)
    actors[0].mouth, actors[1].mouth = other / other.max(), env / env.max()
    tracks = find_tracks(chunks(actor_frames(actors, n, SIZE)), detector, detect_every=2)
    assert (tracks.tracks[0].landmarks is None) == (kind == "haar")
    track = choose_track(tracks, FaceChoice(face="speaker"), HW, env, fps=25)
    assert on_actor(track, actors[1])  # the astronaut speaks the new audio
    assert choose_track(tracks, FaceChoice(), HW).track_id != track.track_id  # largest would be wrong
    actors[0].mouth, actors[1].mouth = actors[1].mouth, actors[0].mouth
    tracks = find_tracks(chunks(actor_frames(actors, n, SIZE)), detector, detect_every=2)
    assert on_actor(choose_track(tracks, FaceChoice(face="speaker"), HW, env, fps=25), actors[0])


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("fields, expected", [
    ({}, FaceChoice()),
    ({"face": "center"}, FaceChoice(face="center")),
    ({"face": "2"}, FaceChoice(face=2)),
    ({"face": '"speaker"'}, FaceChoice(face="speaker")),  # BentoML's client sends JSON strings
    ({"face_point": "320,180"}, FaceChoice(point=(320.0, 180.0))),
    ({"face_boxes": '[{"frame": 9, "box": null}, {"frame": 0, "box": [1, 2, 30, 40]}]'},
     FaceChoice(boxes=((0, (1, 2, 30, 40)), (9, None)))),
])
def test_face_parameters_parse_into_a_choice(fields, expected):
    assert FaceChoice.from_params(parse_fields(fields)) == expected


@pytest.mark.parametrize("fields, message", [
    ({"face": "tallest"}, "face: .*not a face choice"),
    ({"face": "-1"}, "face: .*not a face choice"),
    ({"face_point": "12"}, "face_point: .*not a point"),
    ({"face_point": "-3,4"}, "face_point: .*not a point"),
    ({"face": "center", "face_point": "1,2"}, "face and face_point both choose the face"),
    ({"face_point": "1,2", "face_boxes": '[{"frame": 0, "box": [1, 2, 3, 4]}]'}, "face_point and face_boxes"),
    ({"face_boxes": '[{"frame": 0, "box": [30, 2, 10, 40]}]'}, "face_boxes.0.box: .*not a box"),
    ({"face_boxes": '[{"frame": 0, "box": [1, 2, 3]}]'}, "face_boxes.0.box"),
    ({"face_boxes": '[{"frame": 3, "box": null}, {"frame": 3, "box": [1, 2, 3, 4]}]'}, "one box only"),
    ({"face_boxes": "[]"}, "face_boxes"),
    ({"face_boxes": "not json"}, "face_boxes"),
])
def test_bad_face_parameters_are_a_400_naming_the_field(fields, message):
    with pytest.raises(InvalidInputError, match=message) as info:
        parse_fields(fields)
    assert info.value.http_status == 400


@pytest.mark.parametrize("fields", [{}, {"face": "1"}, {"face_point": "3,4"},
                                    {"face_boxes": '[{"frame": 2, "box": [1, 2, 30, 40]}, {"frame": 5, "box": null}]'}])
def test_face_parameters_survive_the_job_record(fields):
    from lipsync_runner.params import JobParams

    params = parse_fields(fields)  # a job record stores them as JSON and reads them back
    assert JobParams.model_validate_json(params.model_dump_json()) == params
    assert JobParams.model_validate(json.loads(params.model_dump_json())) == params


def test_the_cache_key_of_a_choice_changes_with_the_choice():
    keys = {FaceChoice().key(), FaceChoice(face="center").key(), FaceChoice(face=1).key(),
            FaceChoice(point=(1.0, 2.0)).key(), FaceChoice(boxes=((0, (1, 2, 3, 4)),)).key()}
    assert len(keys) == 5 and FaceChoice(face="center").key() == FaceChoice(face="center").key()


# --------------------------------------------------------------------------- through the pipeline


@pytest.mark.parametrize("fields, who", [({"face_point": "{x:.0f},{y:.0f}"}, 1), ({"face_boxes": "{boxes}"}, 0)])
def test_the_pipeline_dubs_the_chosen_person_and_leaves_the_other_untouched(model, haar, tmp_path, fields, who):
    from lipsync_runner.media.ffmpeg import VideoReader
    from lipsync_runner.pipeline.job import PipelineOptions, run
    from lipsync_runner.media.samples import write_actors_video, write_speech_like_audio

    n = 12
    actors = two_people(n, SIZE)
    target, other = actors[who], actors[1 - who]
    video = write_actors_video(tmp_path / "two.mp4", actors, n, size=SIZE)
    audio = write_speech_like_audio(tmp_path / "a.wav", seconds=n / 25)
    x, y = target.face_center(0)
    boxes = json.dumps([{"frame": i, "box": [int(cx - 35), int(cy - 30), int(cx + 35), int(cy + 45)]}
                        for i in (0, n - 1) for cx, cy in [target.face_center(i)]])
    # silence=generate: every frame of the chosen person is dubbed, pauses in the audio included
    params = parse_fields({"silence": "generate", **{k: v.format(x=x, y=y, boxes=boxes) for k, v in fields.items()}})
    out = run(model, haar, video, audio, tmp_path / "o.mp4", PipelineOptions(params=params, batch_size=8, crf=8))
    with VideoReader(video) as r:
        src = np.stack(list(r))
    with VideoReader(out.output) as r:
        got = np.stack(list(r))
    assert out.frames == n and out.face_frames == n
    # the status' summary: both people found and the one under the point dubbed; explicit boxes find nobody
    assert (out.faces["count"], len(out.faces["chosen"])) == ((2, 1) if "face_point" in fields else (0, 0))
    def mouth_change(actor: Actor, i: int) -> float:
        mx, my = (int(v) for v in actor.mouth_center(i))
        mouth = (slice(my - 8, my + 8), slice(mx - 15, mx + 15))
        return float(np.abs(got[i][mouth].astype(int) - src[i][mouth].astype(int)).mean())

    for i in (0, n // 2, n - 1):
        assert mouth_change(target, i) > 10, f"frame {i}: the chosen person's mouth was not re-generated"
        # re-encoding alone changes a detailed region by about 1.5 (measured); a dubbed mouth by about 50
        assert mouth_change(other, i) < 4, f"frame {i}: the other person's mouth changed"
        ox1, oy1, ox2, oy2 = (max(0, v) for v in other.tile(i))
        tile = (slice(oy1, oy2), slice(ox1, ox2))
        assert np.abs(got[i][tile].astype(int) - src[i][tile].astype(int)).mean() < 3, f"frame {i}: the other changed"


def test_the_pipeline_dubs_the_speaker_found_from_the_audio_it_decodes(model, tmp_path):
    from lipsync_runner.faces import load_face_detector
    from lipsync_runner.media.ffmpeg import VideoReader
    from lipsync_runner.params import JobParams
    from lipsync_runner.pipeline.job import PipelineOptions, run
    from lipsync_runner.media.samples import write_actors_video, write_speech_like_audio

    n = 50
    env = audio_envelope(speech_like_signal(n / 25), 25)  # the loudness of the audio file written below
    other = audio_envelope(speech_like_signal(n / 25, seed=5)[::-1], 25)
    actors = two_people(n, SIZE)  # Hopper (larger: `largest` would pick her) and the astronaut, who speaks
    actors[0].mouth, actors[1].mouth = other / other.max(), env / env.max()
    video = write_actors_video(tmp_path / "two.mp4", actors, n, size=SIZE)
    audio = write_speech_like_audio(tmp_path / "a.wav", seconds=n / 25, sample_rate=16000)
    # one short segment: only frames 0-4 are generated (the model's time), the choice sees all 50
    params = JobParams(face="speaker", silence="generate", segments=[{"start": 0, "end": 0.2}])
    out = run(model, load_face_detector("mediapipe"), video, audio, tmp_path / "o.mp4",
              PipelineOptions(params=params, batch_size=8, crf=8))
    assert out.faces["count"] == 2 and len(out.faces["chosen"]) == 1
    chosen = next(t for t in out.faces["tracks"] if t["id"] == out.faces["chosen"][0])
    x1, y1, x2, y2 = chosen["box"]
    cx, cy = actors[1].face_center(0)
    assert x1 < cx < x2 and y1 < cy < y2, "the summary's chosen track is not the astronaut"
    with VideoReader(video) as r:
        src = np.stack(list(r))
    with VideoReader(out.output) as r:
        got = np.stack(list(r))
    for i in (0, 1):  # fully generated frames of the segment
        changes = []
        for actor in actors:
            mx, my = (int(v) for v in actor.mouth_center(i))
            mouth = (slice(my - 8, my + 8), slice(mx - 15, mx + 15))
            changes.append(float(np.abs(got[i][mouth].astype(int) - src[i][mouth].astype(int)).mean()))
        assert changes[1] > 10 and changes[0] < 4, f"frame {i}: mouth changes (Hopper, astronaut) {changes}"


def test_a_speaker_choice_is_cached_per_audio():
    env = audio_envelope(speech_like_signal(2.0), 25)
    speaker = FaceChoice(face="speaker")
    assert speaker.key(env) == speaker.key(env.copy()) != speaker.key(env[::-1].copy())
    assert FaceChoice().key(env) == FaceChoice().key()  # other choices do not depend on the audio
    with pytest.raises(ValueError, match="audio envelope"):
        speaker.key()


def test_the_avatar_cache_keeps_the_face_summary_for_warm_jobs(tmp_path):
    from lipsync_runner.pipeline.avatar_cache import AvatarCache

    tracks = tracks_of([[[40, 50, 120, 130], [240, 50, 320, 130]]] * 6)
    track = choose_track(tracks, FaceChoice(face=1), (200, 400))
    cache = AvatarCache(tmp_path / "avatars")
    with cache.open("k", lambda: track) as (cold, hit):
        assert not hit
    with cache.open("k", lambda: pytest.fail("a hit builds nothing")) as (warm, hit):
        assert hit and warm.track.track_id == 1
        assert warm.track.summary == track.summary and warm.track.summary["chosen"] == [1]


def test_a_summary_lists_the_chosen_and_the_longest_seen_when_there_are_many():
    from lipsync_runner.faces.identity import MAX_LISTED, IdentityTrack

    def person(i: int, frames: int) -> IdentityTrack:
        box = np.tile([10.0 * i, 0, 10.0 * i + 8, 8], (frames, 1))
        return IdentityTrack(id=i, frames=np.arange(frames), boxes=box, crops=box, landmarks=None,
                             mouth=np.zeros(frames), scores=np.ones(frames))

    people = [person(i, 1 + i % 7) for i in range(MAX_LISTED + 8)]  # a crowd
    tracks = FaceTracks(people, 10, (100, 1000), np.ones(10, bool), "scripted")
    s = tracks.summary(chosen=[0])  # on one frame only, but dubbed: listed
    ids = [t["id"] for t in s["tracks"]]
    assert s["count"] == MAX_LISTED + 8 and len(ids) == MAX_LISTED and ids == sorted(ids) and 0 in ids
    shortest_listed = min(t["frames"] for t in s["tracks"] if t["id"] != 0)
    assert all(t.frames.size <= shortest_listed for t in people if t.id not in ids)


def test_the_job_status_carries_the_face_summary(tmp_path):
    from lipsync_runner.jobs.schemas import status_body
    from lipsync_runner.jobs import OUTPUT_NAME, JobManager, JobOutcome, JobParams, JobStatus

    summary = tracks_of([[[40, 50, 120, 130]]] * 5).summary(chosen=[0])

    def execute(ctx):
        ctx.output_path.write_bytes(b"mp4")
        return JobOutcome(output_file=OUTPUT_NAME, frames=5, faces=summary)

    manager = JobManager.from_data_dir(tmp_path / "data", execute, orphan_grace_s=0)
    manager.start()
    try:
        job_id, directory = manager.new_upload()
        (directory / "video.mp4").write_bytes(b"video")
        (directory / "audio.wav").write_bytes(b"audio")
        manager.submit(job_id, video_file="video.mp4", audio_file="audio.wav", video_filename="v.mp4",
                       audio_filename="a.wav", params=JobParams())
        done = manager.wait(job_id, timeout=10)
        assert done.status is JobStatus.completed
        assert manager.store.get(job_id).faces == summary  # stored, so a restart keeps it
        assert status_body(done)["faces"] == summary
    finally:
        manager.close(timeout=5)
