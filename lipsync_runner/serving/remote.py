"""The pipeline's model, served by the runner service: same three calls, over BentoML.

A job's worker thread calls these synchronously; each call is cut into chunks that are
all sent at once as async requests on the server's event loop, so the adaptive batcher
can merge them with each other and with other jobs' chunks into one GPU batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from lipsync_runner.audio import windows as audio
from lipsync_runner.errors import LipSyncError, ModelsNotReadyError
from lipsync_runner.serving.packing import pack_generate, pack_render, unpack_faces_latents

Submit = Callable[[str, np.ndarray], "Future[np.ndarray]"]


def runner_submitter(runner: Any, loop: asyncio.AbstractEventLoop | None) -> Submit:
    """How to call the runner: async requests on `loop` for a BentoML proxy, direct calls otherwise.

    A direct instance appears when the services share a process (development mode, tests).
    """
    if hasattr(runner, "to_async"):
        client = runner.to_async

        def submit(endpoint: str, array: np.ndarray) -> Future:
            return asyncio.run_coroutine_threadsafe(getattr(client, endpoint)(array), loop)  # type: ignore[arg-type]
    else:
        def submit(endpoint: str, array: np.ndarray) -> Future:
            future: Future = Future()
            try:
                future.set_result(getattr(runner, endpoint)(array))
            except BaseException as exc:  # noqa: BLE001 - delivered through the future
                future.set_exception(exc)
            return future
    return submit


class RemoteModel:
    """LipSyncModel over the runner service, for one job (its tag marks its rows in a batch)."""

    TRANSPORT_RETRIES = 3

    def __init__(self, submit: Submit, *, chunk_frames: int, tag: float = 0.0, timeout_s: float = 600.0,
                 weights_id: str = "") -> None:
        self.submit = submit
        self.weights_id = weights_id  # the runner's model files, for avatar cache keys
        self.chunk_frames = chunk_frames
        self.tag = tag
        self.timeout_s = timeout_s

    def _call_chunked(self, endpoint: str, rows: np.ndarray, chunk: int) -> np.ndarray:
        chunks = [rows[i : i + chunk] for i in range(0, len(rows), chunk)]
        futures = [self.submit(endpoint, c) for c in chunks]
        results = []
        for attempt_chunk, future in zip(chunks, futures):
            results.append(self._result(endpoint, attempt_chunk, future))
        return np.concatenate(results)

    def _result(self, endpoint: str, chunk: np.ndarray, future: Future) -> np.ndarray:
        # Calls are pure functions of their input, so they are safely sent again when
        # - the request was lost in transport (a pooled connection closed under it), or
        # - the runner's batcher shed it ("overloaded": its queue would wait past max_latency_ms),
        #   which is back-pressure from a busy GPU, not a failure: wait, then queue again.
        # In-flight requests are never cancelled: that would leave them in the runner's batcher.
        transport_retries = 0
        deadline = time.monotonic() + self.timeout_s
        backoff = 0.5
        while True:
            try:
                return np.asarray(future.result(timeout=max(1.0, deadline - time.monotonic())))
            except LipSyncError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                message = str(exc) or type(exc).__name__
                if is_transport_error(exc) and transport_retries < self.TRANSPORT_RETRIES:
                    time.sleep(0.05 * 2**transport_retries)  # let a replaced connection pool settle
                    transport_retries += 1
                elif _is_overloaded(message) and time.monotonic() + backoff < deadline:
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 8.0)
                elif "not loaded" in message.lower() or "503" in message:
                    raise ModelsNotReadyError(f"the model runner is not available: {message}") from exc
                else:
                    raise LipSyncError(f"the model runner failed: {message}") from exc
                future = self.submit(endpoint, chunk)

    def audio_features(self, pcm: np.ndarray) -> np.ndarray:
        pcm = np.asarray(pcm, dtype=np.float32)
        states = self._call_chunked("audio_pieces", audio.pad_pieces(pcm), 1)
        return states.reshape(-1, *states.shape[2:])[: audio.step_count(len(pcm))]

    def prepare(self, crops: np.ndarray) -> np.ndarray:
        return self._call_chunked("prepare", np.ascontiguousarray(crops), self.chunk_frames)

    def generate(self, latents: np.ndarray, audio_windows: np.ndarray) -> np.ndarray:
        packed = pack_generate(latents, audio_windows, self.tag)
        return self._call_chunked("generate", packed, self.chunk_frames)

    def prepare_generate(self, crops: np.ndarray, audio_windows: np.ndarray) -> np.ndarray:
        """prepare then generate in one round trip: uint8 crops and audio windows in (packing.pack_render),
        faces out; the latents stay on the runner."""
        packed = pack_render(crops, audio_windows, self.tag)
        return self._call_chunked("prepare_generate", packed, self.chunk_frames)

    def prepare_generate_latents(self, crops: np.ndarray, audio_windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """prepare_generate that also brings the latents back (the avatar cache keeps them): (faces, latents)."""
        packed = pack_render(crops, audio_windows, self.tag)
        return unpack_faces_latents(self._call_chunked("prepare_generate_latents", packed, self.chunk_frames))


def is_transport_error(exc: BaseException) -> bool:
    """A request that did not reach the runner or lost its connection (not a runner-side error)."""
    kinds: tuple[type[BaseException], ...] = (ConnectionError,)
    try:
        import httpx

        kinds += (httpx.TransportError,)
    except ImportError:  # pragma: no cover
        pass
    try:  # BentoML's clients may run on aiohttp
        import aiohttp

        kinds += (aiohttp.ClientConnectionError,)
    except ImportError:  # pragma: no cover
        pass
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kinds) or "Server disconnected" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _is_overloaded(message: str) -> bool:
    """BentoML's adaptive batcher refusing a request it could not serve within max_latency_ms."""
    return "overloaded" in message.lower()



class RunnerLink:
    """The API side's line to the GPU runner: its health (an unreachable runner is a health state,
    not a crash) and how jobs submit arrays to it. ``loop`` is the server's event loop, known once
    the service starts."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.loop: asyncio.AbstractEventLoop | None = None

    def submitter(self) -> Submit:
        return runner_submitter(self.runner, self.loop)

    async def health(self) -> dict[str, Any]:
        if not hasattr(self.runner, "to_async"):
            return self.runner.health()
        # A pooled connection the runner closed just as we reused it is not an outage: ask again.
        for attempt in range(3):
            try:
                return await asyncio.wait_for(self.runner.to_async.health(), timeout=10)
            except Exception as exc:  # noqa: BLE001 - an unreachable runner is a health state, not a crash
                if is_transport_error(exc) and attempt < 2:
                    await asyncio.sleep(0.05 * (attempt + 1))
                    continue
                return {"status": "unavailable", "models_loaded": False, "device": None, "model_version": None,
                        "error": f"model runner unreachable: {type(exc).__name__}"}
        raise AssertionError("unreachable")

    def health_sync(self) -> dict[str, Any]:
        """From a job's thread: the health, asked on the server's loop."""
        if hasattr(self.runner, "to_async"):
            assert self.loop is not None
            return asyncio.run_coroutine_threadsafe(self.health(), self.loop).result(timeout=30)
        return self.runner.health()
