"""The pipeline's model over the runner: chunking, packing, and which failures are retried."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest

from lipsync_runner.errors import LipSyncError, ModelsNotReadyError
from lipsync_runner.serving import remote
from lipsync_runner.serving.packing import job_tag, pack_generate, unpack_generate
from lipsync_runner.serving.remote import RemoteModel


class FlakyRunner:
    """Answers `prepare` by echoing row sums; fails the first calls with the given errors."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls: list[int] = []

    def submit(self, endpoint: str, rows: np.ndarray) -> Future:
        self.calls.append(len(rows))
        future: Future = Future()
        if self.errors:
            future.set_exception(self.errors.pop(0))
        else:
            future.set_result(rows.reshape(len(rows), -1).sum(axis=1, keepdims=True))
        return future


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)


def test_calls_are_cut_into_chunks_and_reassembled_in_order():
    runner = FlakyRunner()
    rows = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    out = RemoteModel(runner.submit, chunk_frames=4).prepare(rows)
    assert runner.calls == [4, 4, 2]
    np.testing.assert_array_equal(out[:, 0], rows.sum(axis=1))


def test_a_shed_request_is_queued_again_until_the_runner_takes_it():
    overloaded = RuntimeError("ServiceUnavailable: process is overloaded")
    runner = FlakyRunner(overloaded, overloaded, overloaded)
    out = RemoteModel(runner.submit, chunk_frames=8).prepare(np.ones((2, 3), np.float32))
    assert out.shape == (2, 1) and runner.calls == [2, 2, 2, 2]


def test_a_request_lost_in_transport_is_sent_again_a_few_times():
    import httpx

    runner = FlakyRunner(httpx.RemoteProtocolError("Server disconnected without sending a response."))
    assert RemoteModel(runner.submit, chunk_frames=8).prepare(np.ones((1, 3), np.float32)).shape == (1, 1)
    lost = [ConnectionResetError("reset")] * 5
    with pytest.raises(LipSyncError, match="runner failed"):
        RemoteModel(FlakyRunner(*lost).submit, chunk_frames=8).prepare(np.ones((1, 3), np.float32))


def test_models_not_loaded_and_other_errors_are_not_retried():
    runner = FlakyRunner(RuntimeError("503: Models not loaded: still loading"))
    with pytest.raises(ModelsNotReadyError):
        RemoteModel(runner.submit, chunk_frames=8).prepare(np.ones((1, 3), np.float32))
    runner = FlakyRunner(ValueError("shape mismatch"))
    with pytest.raises(LipSyncError, match="shape mismatch"):
        RemoteModel(runner.submit, chunk_frames=8).prepare(np.ones((1, 3), np.float32))
    assert runner.calls == [1]


def test_generate_rows_carry_the_job_tag_latents_and_audio_window():
    latents = np.random.default_rng(0).normal(size=(3, 8, 32, 32)).astype(np.float32)
    windows = np.random.default_rng(1).normal(size=(3, 50, 384)).astype(np.float32)
    tag = job_tag("2b1f0c8e-0000-4000-8000-000000000000")
    tags, lat, win = unpack_generate(pack_generate(latents, windows, tag), 384)
    assert (tags == tag).all() and tag == int(tag) < 2**24
    np.testing.assert_array_equal(lat, latents)
    np.testing.assert_array_equal(win, windows)
