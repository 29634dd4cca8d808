"""A speaker per segment (issue 23, item 1): each segment may name its own person.

Real media as in the face-choice tests (tests/test_face_tracks.py): two real people side by side
(matplotlib's photo of Grace Hopper, left and larger, and scikit-image's astronaut, right), moving a
little. Region PSNR against the decoded source tells what a job changed: a re-encode alone keeps a
region above ~35 dB, a re-generated mouth falls far below.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lipsync_runner.errors import InvalidInputError
from lipsync_runner.faces import HaarFaceDetector, audio_envelope, load_face_detector
from lipsync_runner.media.ffmpeg import VideoReader
from lipsync_runner.media.samples import (Actor, speech_like_signal, two_people, write_actors_video,
                                          write_speech_like_audio)
from lipsync_runner.params import JobParams, parse_fields
from lipsync_runner.pipeline.avatar_cache import AvatarCache
from lipsync_runner.pipeline.job import PipelineOptions, run

SIZE = (480, 270)
FPS = 25
UNTOUCHED_DB = 35.0  # a region only re-encoded (crf 8) stays above this
DUBBED_DB = 25.0  # a re-generated mouth (tiny random-weight model) falls below this


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def frames_of(path) -> np.ndarray:
    with VideoReader(path) as r:
        return np.stack(list(r))


def mouth(actor: Actor, i: int) -> tuple[slice, slice]:
    mx, my = (int(v) for v in actor.mouth_center(i))
    return slice(my - 8, my + 8), slice(mx - 15, mx + 15)


@pytest.fixture(scope="module")
def haar() -> HaarFaceDetector:
    return HaarFaceDetector()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """28 frames (1.12 s) of the two people, and a speech-like audio as long."""
    root = tmp_path_factory.mktemp("speakers")
    n = 28
    actors = two_people(n, SIZE)
    video = write_actors_video(root / "two.mp4", actors, n, size=SIZE, fps=FPS)
    audio = write_speech_like_audio(root / "a.wav", seconds=n / FPS)
    return video, audio, actors, n


def two_segments(actors: list[Actor]) -> str:
    """Frames 0-7 dub the astronaut (the point on her face), frames 12-19 Hopper (the larger face)."""
    x, y = actors[1].face_center(0)
    return json.dumps([{"start": 0, "end": 0.32, "face_point": f"{x:.0f},{y:.0f}"},
                       {"start": 0.48, "end": 0.8, "face": "largest"}])


def test_two_segments_each_dub_their_own_person_and_nothing_else(model, haar, clip, tmp_path):
    video, audio, actors, n = clip
    hopper, astronaut = actors
    params = parse_fields({"silence": "generate", "segments": two_segments(actors)})
    out = run(model, haar, video, audio, tmp_path / "o.mp4", PipelineOptions(params=params, batch_size=8, crf=8))
    src, got = frames_of(video), frames_of(out.output)
    assert out.frames == n

    # inside each segment (frames fully weighted, away from the cross-fade), only its person's mouth
    for i, dubbed, other in ((3, astronaut, hopper), (4, astronaut, hopper), (15, hopper, astronaut),
                             (16, hopper, astronaut)):
        assert psnr(got[i][mouth(dubbed, i)], src[i][mouth(dubbed, i)]) < DUBBED_DB, f"frame {i}: not dubbed"
        ox1, oy1, ox2, oy2 = (max(0, v) for v in other.tile(i))
        assert psnr(got[i][oy1:oy2, ox1:ox2], src[i][oy1:oy2, ox1:ox2]) > UNTOUCHED_DB, \
            f"frame {i}: the other person changed"
    # outside the segments, nothing: every frame as a whole
    for i in [*range(8, 12), *range(20, n)]:
        assert psnr(got[i], src[i]) > UNTOUCHED_DB, f"frame {i} (outside the segments) changed"

    # the status names who each segment dubbed: two different people, both among the chosen
    faces = out.faces
    assert faces["count"] == 2
    by_segment = {s["segment"]: s["chosen"] for s in faces["segments"]}
    assert set(by_segment) == {0, 1} and len(by_segment[0]) == len(by_segment[1]) == 1
    assert by_segment[0] != by_segment[1] and set(faces["chosen"]) == {*by_segment[0], *by_segment[1]}
    box = next(t["box"] for t in faces["tracks"] if t["id"] == by_segment[0][0])
    cx, cy = astronaut.face_center(0)
    assert box[0] < cx < box[2] and box[1] < cy < box[3], "segment 0's track is not the astronaut"


def test_a_speaker_segment_picks_whoever_speaks_within_it(model, tmp_path):
    # Each person's mouth follows the loudness of the audio in one half and another loudness in the
    # other: the astronaut speaks in the first second, Hopper in the second.
    n = 50
    env = audio_envelope(speech_like_signal(n / FPS), FPS)  # the loudness of the audio written below
    noise = audio_envelope(speech_like_signal(n / FPS, seed=5)[::-1], FPS)
    env, noise = env / env.max(), noise / noise.max()
    half = n // 2
    actors = two_people(n, SIZE)
    actors[0].mouth = np.concatenate([noise[:half], env[half:]])  # Hopper: speaks second
    actors[1].mouth = np.concatenate([env[:half], noise[half:]])  # the astronaut: speaks first
    video = write_actors_video(tmp_path / "two.mp4", actors, n, size=SIZE, fps=FPS)
    audio = write_speech_like_audio(tmp_path / "a.wav", seconds=n / FPS, sample_rate=16000)
    # short segments keep the model's time low; the choice judges each whole segment
    params = JobParams(silence="generate", segments=[{"start": 0, "end": 1.0, "face": "speaker"},
                                                     {"start": 1.0, "end": 2.0, "face": "speaker"}])
    out = run(model, load_face_detector("mediapipe"), video, audio, tmp_path / "o.mp4",
              PipelineOptions(params=params, batch_size=8, crf=8))
    by_segment = {s["segment"]: s["chosen"][0] for s in out.faces["segments"]}
    centre = {t["id"]: t["box"] for t in out.faces["tracks"]}

    def holds(track_id: int, actor: Actor) -> bool:
        x1, y1, x2, y2 = centre[track_id]
        cx, cy = actor.face_center(0)
        return x1 < cx < x2 and y1 < cy < y2

    assert holds(by_segment[0], actors[1]), "segment 0 did not pick the astronaut, who speaks in it"
    assert holds(by_segment[1], actors[0]), "segment 1 did not pick Hopper, who speaks in it"
    src, got = frames_of(video), frames_of(out.output)
    for i, dubbed, other in ((12, actors[1], actors[0]), (37, actors[0], actors[1])):
        assert psnr(got[i][mouth(dubbed, i)], src[i][mouth(dubbed, i)]) < DUBBED_DB, f"frame {i}: not dubbed"
        assert psnr(got[i][mouth(other, i)], src[i][mouth(other, i)]) > UNTOUCHED_DB, f"frame {i}: other dubbed"


def test_a_segment_face_that_names_nobody_fails_listing_the_tracks_found(model, haar, clip, tmp_path):
    video, audio, _, _ = clip
    params = JobParams(segments=[{"start": 0, "end": 0.2}, {"start": 0.4, "end": 0.6, "face": 7}])
    with pytest.raises(InvalidInputError, match=r"segments\[1\]: face=7: this video has no face track 7; "
                                                r"its tracks are 0, 1"):
        run(model, haar, video, audio, tmp_path / "o.mp4", PipelineOptions(params=params))


def test_a_segment_chooses_its_face_as_the_job_does_and_is_refused_the_same_way():
    seg = parse_fields({"segments": '[{"start": 0, "end": 1, "face": " Speaker "}, {"start": 1, "end": 2, '
                                    '"face_point": "320,180"}, {"start": 2, "end": 3, "face_boxes": '
                                    '[{"frame": 9, "box": [1, 2, 30, 40]}, {"frame": 0, "box": null}]}]'}).segments
    assert seg[0].face == "speaker" and seg[1].face_point == (320.0, 180.0)
    assert [b.frame for b in seg[2].face_boxes] == [0, 9]  # sorted, as the job's
    assert [s.chooses_face for s in seg] == [True, True, True]
    assert not parse_fields({"segments": '[{"start": 0, "end": 1}]'}).segments[0].chooses_face
    for bad, message in [
        ('{"face": "bob"}', r"segments\.0\.face: 'bob' is not a face choice"),
        ('{"face": 10000}', r"segments\.0\.face"),
        ('{"face": 1, "face_point": "3,4"}', r"segments\.0: face and face_point both choose the face"),
        ('{"face_point": "left"}', r"segments\.0\.face_point: 'left' is not a point"),
        ('{"face_boxes": [{"frame": 0, "box": [1, 2, 3, 4]}, {"frame": 0, "box": null}]}',
         r"segments\.0\.face_boxes: each frame may have one box only"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            parse_fields({"segments": f'[{{"start": 0, "end": 1, {bad[1:-1]}}}]'})


def test_segment_faces_go_through_the_avatar_cache_and_the_jobs_own_entry_keeps_its_key(model, haar, clip,
                                                                                        tmp_path):
    video, audio, actors, _ = clip
    cache = AvatarCache(tmp_path / "avatars")
    x, y = actors[1].face_center(0)
    segments = json.dumps([{"start": 0, "end": 0.2, "face_point": f"{x:.0f},{y:.0f}"}, {"start": 0.4, "end": 0.6}])
    opts = PipelineOptions(params=parse_fields({"segments": segments, "silence": "generate"}), batch_size=8)
    cold = run(model, haar, video, audio, tmp_path / "1.mp4", opts, cache=cache)
    assert cold.cache_hit is False and cache.builds == 2  # the job's face and the segment's: two entries
    warm = run(model, haar, video, audio, tmp_path / "2.mp4", opts, cache=cache)
    assert warm.cache_hit is True and cache.builds == 2 and "faces" not in warm.seconds
    assert np.array_equal(frames_of(cold.output), frames_of(warm.output))
    # a job without segment faces uses the entry the job's face (largest) built
    plain = run(model, haar, video, audio, tmp_path / "3.mp4",
                PipelineOptions(params=JobParams(segments=[{"start": 0, "end": 0.2}]), batch_size=8), cache=cache)
    assert plain.cache_hit is True and cache.builds == 2
