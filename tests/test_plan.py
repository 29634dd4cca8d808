"""The per-job plan on its own: sync modes, segments, silence cross-fades, the sound track, scratch space.

No video is decoded here; what these pure functions decide, tests/test_pipeline.py checks in real output.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from lipsync_runner.audio.windows import SAMPLE_RATE, frame_count
from lipsync_runner.errors import InvalidInputError
from lipsync_runner.params import JobParams, form_properties, parse_fields
from lipsync_runner.audio.soundtrack import AudioPiece
from lipsync_runner.pipeline.plan import (
    build_plan,
    fade_out_of,
    fade_within,
    frame_at,
    needs_random_access,
    output_length,
    scratch_bytes,
    source_frames,
    spools_frames,
)

NTSC = Fraction(30000, 1001)


def plan_for(n_video: int, n_audio: int, fps: Fraction = Fraction(25), has_face=None, speech=None, **params):
    params.setdefault("silence", "generate")
    return build_plan(JobParams(**params), n_video=n_video, n_audio=n_audio, fps=fps,
                      has_face=np.ones(n_video, bool) if has_face is None else has_face, speech=speech)


# ------------------------------------------------------------------ sync modes: length and order

@pytest.mark.parametrize("mode, shorter_audio, longer_audio", [
    ("bounce", 3, 9), ("loop", 3, 9), ("cut_off", 3, 5), ("silence", 5, 9), ("remap", 3, 9),
])
def test_output_length_of_each_sync_mode(mode, shorter_audio, longer_audio):
    """Video of 5 frames; audio of 3 frames (shorter) or 9 (longer)."""
    assert output_length(mode, 5, 3) == shorter_audio
    assert output_length(mode, 5, 9) == longer_audio
    assert output_length(mode, 5, 5) == 5


def test_bounce_plays_forward_then_backward():
    assert source_frames("bounce", 12, 4).tolist() == [0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3]
    assert source_frames("bounce", 3, 5).tolist() == [0, 1, 2]  # a longer video: its first frames


def test_loop_restarts_from_the_first_frame():
    assert source_frames("loop", 10, 4).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert source_frames("loop", 3, 5).tolist() == [0, 1, 2]  # a longer video: its first frames


def test_cut_off_and_silence_play_the_video_straight():
    assert source_frames("cut_off", 3, 5).tolist() == [0, 1, 2]
    assert source_frames("silence", 5, 5).tolist() == [0, 1, 2, 3, 4]
    assert source_frames("silence", 7, 4).tolist() == [0, 1, 2, 3, 3, 2, 1]  # a shorter video bounces


def test_remap_retimes_the_video_evenly_to_the_audio():
    slow = source_frames("remap", 10, 5)  # 5 frames stretched over 10
    assert slow.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    fast = source_frames("remap", 4, 8)  # 8 frames squeezed into 4: every other one, centred
    assert fast.tolist() == [1, 3, 5, 7]
    assert source_frames("remap", 6, 6).tolist() == list(range(6))
    odd = source_frames("remap", 7, 3)
    assert odd.tolist() == [0, 0, 1, 1, 1, 2, 2] and np.all(np.diff(odd) >= 0)


def test_ntsc_lengths_are_exact_in_frames():
    n_video = int(Fraction(3, 2) * NTSC)  # a 1.5 s clip at 29.97: 44 frames
    n_audio = frame_count(4 * SAMPLE_RATE, NTSC)  # 4.0 s of audio: 119 frames (MuseTalk's int(fps) gives 116)
    assert (n_video, n_audio) == (44, 119)
    assert len(plan_for(n_video, n_audio, NTSC, sync_mode="bounce")) == 119
    assert len(plan_for(n_video, n_audio, NTSC, sync_mode="cut_off")) == 44
    assert len(plan_for(n_video, n_audio, NTSC, sync_mode="silence")) == 119
    remap = plan_for(n_video, n_audio, NTSC, sync_mode="remap")
    assert len(remap) == 119 and remap.source[0] == 0 and remap.source[-1] == 43
    assert np.bincount(remap.source).min() >= 2 and np.bincount(remap.source).max() <= 3  # 119 / 44 = 2.7


def test_random_access_only_when_the_plan_goes_back():
    assert needs_random_access("bounce", 5, 9) and needs_random_access("loop", 5, 9)
    assert needs_random_access("silence", 5, 9)
    assert not needs_random_access("bounce", 9, 5) and not needs_random_access("remap", 5, 9)
    assert not needs_random_access("cut_off", 5, 9)
    assert plan_for(5, 9, sync_mode="remap").sequential and not plan_for(5, 9, sync_mode="loop").sequential


# ------------------------------------------------------------------ silence: keep the source mouth, cross-faded

def test_speech_is_fully_generated_and_silence_eases_out_and_back_in():
    speech = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1], bool)
    w = fade_out_of(speech, 3)
    assert w.tolist() == [1, 1, 0.75, 0.5, 0.25, 0, 0, 0, 0.25, 0.5, 0.75, 1, 1]
    assert fade_out_of(np.zeros(4, bool), 3).tolist() == [0, 0, 0, 0]
    assert fade_out_of(speech, 0).tolist() == speech.astype(float).tolist()  # no fade: a cut


def test_keep_mode_passes_silent_frames_through_and_generate_mode_does_not():
    speech = np.array([1] * 10 + [0] * 10 + [1] * 10, bool)
    keep = plan_for(30, 30, speech=speech, silence="keep")
    assert keep.weight[10:13].tolist() == [0.75, 0.5, 0.25] and keep.weight[17:20].tolist() == [0.25, 0.5, 0.75]
    assert not keep.generate[13:17].any() and keep.generate[:13].all() and keep.generate[17:].all()
    assert plan_for(30, 30, speech=speech, silence="generate").generate.all()
    with pytest.raises(ValueError, match="speech activity"):
        plan_for(30, 30, silence="keep")


def test_frames_without_the_face_are_never_generated():
    has_face = np.ones(10, bool)
    has_face[[2, 7]] = False
    plan = plan_for(10, 20, has_face=has_face, sync_mode="bounce")
    assert (plan.generate == has_face[plan.source]).all() and plan.generate.sum() == 16


def test_silence_mode_pads_a_short_audio_and_the_tail_keeps_its_mouth_in_both_silence_modes():
    for silence in ("keep", "generate"):
        plan = plan_for(20, 10, sync_mode="silence", silence=silence, speech=np.ones(10, bool))
        assert len(plan) == 20 and plan.source.tolist() == list(range(20))
        assert plan.generate[:10].all() and plan.weight[10:13].tolist() == [0.75, 0.5, 0.25]
        assert not plan.generate[13:].any()
        assert plan.audio_frames_needed() == 13  # the cross-fade reads 3 frames of padded silence
        assert plan.sound == (AudioPiece(Fraction(0), Fraction(0), Fraction(20, 25)),)
        assert not plan.sound_is_the_audio  # padded to the video's length


# ------------------------------------------------------------------ segments

def test_segment_times_map_to_whole_frames_exactly():
    assert frame_at(0.04, Fraction(25)) == 1  # 0.04 * 25 is 1.0000000000000002 in floats
    assert frame_at(1.0, NTSC) == 30 and frame_at(1.001, NTSC) == 30 and frame_at(1.0011, NTSC) == 31
    assert frame_at(0, NTSC) == 0


def test_outside_segments_nothing_is_generated_and_the_fade_lies_inside():
    plan = plan_for(50, 50, segments=[{"start": 0.4, "end": 0.8}, {"start": 1.6, "end": 3.0}])
    inside = np.zeros(50, bool)
    inside[10:20] = inside[40:50] = True
    assert (plan.weight[~inside] == 0).all() and not plan.generate[~inside].any()
    assert plan.weight[10:15].tolist() == [0.25, 0.5, 0.75, 1, 1] and plan.weight[16:20].tolist() == [1, 0.75, 0.5, 0.25]
    assert plan.weight[40:44].tolist() == [0.25, 0.5, 0.75, 1] and plan.weight[-1] == 1  # the end of the output
    assert plan.sound_is_the_audio and plan.audio.tolist() == list(range(50))
    assert fade_within(np.ones(3, bool), 3).tolist() == [1, 1, 1]  # one segment over everything


def test_silence_inside_a_segment_still_keeps_the_source_mouth():
    speech = np.ones(40, bool)
    speech[20:30] = False
    plan = plan_for(40, 40, speech=speech, silence="keep", segments=[{"start": 0.0, "end": 1.6}])
    assert plan.generate[:21].all() and not plan.generate[24:27].any() and plan.generate[30:36].all()


def test_a_segment_with_its_own_audio_start_reads_and_plays_that_audio():
    fps = Fraction(25)
    plan = plan_for(100, 100, fps, segments=[{"start": 1.0, "end": 2.0, "audio_start": 3.0}])
    assert plan.audio[25:50].tolist() == list(range(75, 100))  # mouth driven by the audio from 3 s
    assert plan.audio[:25].tolist() == list(range(25)) and plan.audio[50:].tolist() == list(range(50, 100))
    assert plan.sound == (AudioPiece(Fraction(0), Fraction(0), Fraction(1)),
                          AudioPiece(Fraction(1), Fraction(3), Fraction(1)),
                          AudioPiece(Fraction(2), Fraction(2), Fraction(2)))
    assert sum(p.duration for p in plan.sound) == plan.duration and not plan.sound_is_the_audio


def test_segments_that_cannot_be_honoured_are_refused_with_the_reason():
    with pytest.raises(InvalidInputError, match=r"segments\[1\] starts at 5 s, after the end of the output"):
        plan_for(50, 50, segments=[{"start": 0, "end": 1}, {"start": 5, "end": 6}])
    with pytest.raises(InvalidInputError, match=r"segments\[0\]'s audio .* runs past the end of the audio"):
        plan_for(50, 50, segments=[{"start": 0, "end": 1, "audio_start": 1.5}])
    assert len(plan_for(50, 50, segments=[{"start": 1.0, "end": 9.0}])) == 50  # an end past the output: clipped


@pytest.mark.parametrize("segments, message", [
    ('[{"start": 1, "end": 2}, {"start": 1.5, "end": 3}]', "segment 1 (1.5-3 s) starts before segment 0 ends"),
    ('[{"start": 2, "end": 3}, {"start": 0, "end": 1}]', "must be ordered"),
    ('[{"start": 2, "end": 2}]', "end (2 s) must be after start (2 s)"),
    ('[{"start": -1, "end": 2}]', "segments.0.start: Input should be greater than or equal to 0"),
    ('[{"start": 0, "end": 2, "speed": 2}]', "segments.0.speed: unknown parameter"),
    ('{"start": 0, "end": 2}', "segments: Input should be a valid list"),
    ("not json", "segments: Input should be a valid list"),
])
def test_bad_segments_are_a_400_naming_the_problem(segments, message):
    with pytest.raises(InvalidInputError) as err:
        parse_fields({"segments": segments})
    assert err.value.http_status == 400 and message in err.value.message


def test_sync_mode_and_silence_are_checked_by_the_schema():
    assert parse_fields({"sync_mode": "remap", "silence": "generate"}).sync_mode == "remap"
    assert JobParams().sync_mode == "bounce" and JobParams().silence == "keep" and JobParams().segments is None
    with pytest.raises(InvalidInputError, match="sync_mode: Input should be 'bounce', 'loop'"):
        parse_fields({"sync_mode": "stretch"})
    assert parse_fields({"segments": "[]"}).segments is None  # empty: the whole output


def test_the_form_schema_spells_out_segments_without_references():
    import json

    props = form_properties()  # multipart form docs have no $defs to point into
    assert "$ref" not in json.dumps(props)
    item = props["segments"]["anyOf"][0]["items"]
    assert set(item["properties"]) == {"start", "end", "audio_start", "face", "face_point", "face_boxes"}
    assert item["additionalProperties"] is False
    assert props["sync_mode"]["enum"] == ["bounce", "loop", "cut_off", "silence", "remap"]


# ------------------------------------------------------------------ the sound track

def test_the_sound_track_is_the_audio_file_unless_the_plan_cuts_pads_or_moves_it():
    assert plan_for(5, 9, sync_mode="bounce").sound_is_the_audio
    cut = plan_for(5, 9, sync_mode="cut_off")  # the audio past the video is dropped
    assert cut.sound == (AudioPiece(Fraction(0), Fraction(0), Fraction(5, 25)),) and not cut.sound_is_the_audio
    assert plan_for(9, 5, sync_mode="cut_off").sound_is_the_audio


def test_the_laid_out_sound_track_has_each_piece_where_the_plan_puts_it(tmp_path):
    from scipy.io import wavfile

    from lipsync_runner.media.ffmpeg import decode_audio
    from lipsync_runner.audio.soundtrack import write_soundtrack

    rng = np.random.default_rng(0)
    pcm = (rng.uniform(-0.5, 0.5, 3 * SAMPLE_RATE) * 32767).astype(np.int16)  # 3 s of noise: no two stretches alike
    wavfile.write(tmp_path / "in.wav", SAMPLE_RATE, pcm)
    plan = plan_for(100, 75, segments=[{"start": 1.0, "end": 2.0, "audio_start": 0.0}], sync_mode="silence")
    out = decode_audio(write_soundtrack(tmp_path / "in.wav", plan.sound, tmp_path / "out.wav"), SAMPLE_RATE)
    src = pcm.astype(np.float32) / 32768
    second = SAMPLE_RATE
    assert len(out) == 4 * second  # the output's 100 frames at 25 fps
    np.testing.assert_allclose(out[:second], src[:second], atol=1e-4)  # the audio on the video's timeline
    np.testing.assert_allclose(out[second : 2 * second], src[:second], atol=1e-4)  # the segment: from audio_start
    np.testing.assert_allclose(out[2 * second : 3 * second], src[2 * second :], atol=1e-4)  # back on the timeline
    assert not out[3 * second :].any()  # past the end of the audio: silence


# ------------------------------------------------------------------ scratch space for the disk reservation

def test_scratch_estimate_is_the_frame_store_and_the_laid_out_sound():
    frame = 320 * 240 * 3
    common = dict(n_video=50, width=320, height=240, fps=Fraction(25), audio_rate=44100, audio_channels=2)
    cold = scratch_bytes(JobParams(), audio_seconds=1.0, max_spool_bytes=2**30, **common)
    assert cold == 50 * frame  # a cold job keeps its decoded frames: one decode
    assert scratch_bytes(JobParams(), audio_seconds=1.0, max_spool_bytes=2**30, cold=False, **common) == 0
    assert scratch_bytes(JobParams(), audio_seconds=1.0, max_spool_bytes=frame, **common) == 0  # over the bound
    # bounce with a longer audio needs the store at any size
    assert scratch_bytes(JobParams(), audio_seconds=3.0, max_spool_bytes=0, cold=False, **common) == 50 * frame
    padded = scratch_bytes(JobParams(sync_mode="silence"), audio_seconds=1.0, max_spool_bytes=0, **common)
    assert padded >= 2 * 44100 * 2 * 2  # 2 s of 16-bit stereo sound track
    assert spools_frames(JobParams(), n_video=50, n_audio=25, width=320, height=240, max_spool_bytes=50 * frame)
