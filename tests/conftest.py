"""Shared fixtures: tiny random-weight models in MuseTalk's real layout, and test media."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _our_loggers_enabled() -> None:
    """BentoML's logging setup (`disable_existing_loggers`), run in process by a test that imports
    the service, disables loggers created before it; the served process runs it before importing
    ours. Tests that read the log (caplog) must not depend on which test ran first."""
    for name, logger in logging.root.manager.loggerDict.items():
        if name.startswith("lipsync_runner") and isinstance(logger, logging.Logger):
            logger.disabled = False


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach for the network
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores (and the servers they start, which inherit this): one intra-op
    # thread each. torch's OpenMP threads spin while they wait, and oversubscribed they made
    # in-process pipeline tests 2 to 4 times slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
warnings.filterwarnings("ignore", message=".*low cpu memory usage.*")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny MuseTalk v1.5 + v1.0 directory (sd-vae, whisper, musetalkV15, musetalk)."""
    from lipsync_runner.models.tiny import write_models_dir

    return write_models_dir(tmp_path_factory.mktemp("models"), versions=("v15", "v1"))


@pytest.fixture(scope="session")
def model(models_dir: Path):
    from lipsync_runner.models.musetalk import MuseTalk

    return MuseTalk.from_pretrained(models_dir, device="cpu")


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """face.mp4 (2 s, 25 fps, 320x240), speech_short.wav (1.2 s), speech_long.wav (3.3 s)."""
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

    root = tmp_path_factory.mktemp("media")
    write_face_video(root / "face.mp4", seconds=2.0, fps=25, size=(320, 240))
    write_speech_like_audio(root / "speech_short.wav", seconds=1.2)
    write_speech_like_audio(root / "speech_long.wav", seconds=3.3)
    return root


# -- real backing services (tests/backends.py): one PostgreSQL cluster and one S3 server per session


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (skipped without the server binaries, unless CI=true)."""
    from .backends import postgres_cluster

    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def pg_database(postgres) -> str:
    """The URL of a fresh database on that cluster for one test module (each test empties what it uses)."""
    return postgres.create_database()


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1, spoken to only through the S3 API."""
    from .backends import s3_server

    with s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def face_clip(tmp_path_factory: pytest.TempPathFactory):
    """16 frames of a 640x360 talking head (frame 8 without a face), their Haar crop boxes, and
    generated faces that differ from the frames everywhere."""
    from lipsync_runner.render.crops import crop_faces
    from lipsync_runner.faces import HaarFaceDetector, track_faces
    from lipsync_runner.media.ffmpeg import VideoReader
    from lipsync_runner.media.samples import write_face_video

    path = write_face_video(tmp_path_factory.mktemp("clip") / "face.mp4", seconds=0.64, size=(640, 360),
                            blank_frames=(8,))
    with VideoReader(path) as reader:
        frames = reader.read_chunk(64)
    track = track_faces([frames], HaarFaceDetector(), detect_every=2, fill_gaps=0)
    assert not track.has_face[8] and track.has_face.sum() >= 12
    faces = 255 - crop_faces(frames, track.boxes)  # a face, in negative: differs from the frame
    return frames, track.boxes, faces


@pytest.fixture(scope="session")
def open_server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    """The real server as a newcomer starts it: no API tokens, tiny models (v1.5 loaded).

    Shared by the README examples (test_readme.py) and the browser's view without auth (test_ui.py).
    """
    from .server import running_server

    with running_server(tmp_path_factory.mktemp("open-server"), models_dir) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (tests/browser.py), one per test module."""
    from .browser import launch_chromium

    yield from launch_chromium()
