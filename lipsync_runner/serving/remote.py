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

from .. import audio
from ..errors import LipSyncError, ModelsNotReadyError
from .packing import pack_generate

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
        # Calls are pure functions of their input, so a request lost in transport (a pooled
        # keep-alive connection the server closed just as we reused it) is safely sent again.
        # In-flight requests are never cancelled: that would leave them in the runner's batcher.
        for attempt in range(self.TRANSPORT_RETRIES + 1):
            try:
                return np.asarray(future.result(timeout=self.timeout_s))
            except LipSyncError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                message = str(exc) or type(exc).__name__
                if _is_transport_error(exc) and attempt < self.TRANSPORT_RETRIES:
                    time.sleep(0.05 * 2**attempt)  # let a replaced connection pool settle
                    future = self.submit(endpoint, chunk)
                    continue
                if "not loaded" in message.lower() or "503" in message:
                    raise ModelsNotReadyError(f"the model runner is not available: {message}") from exc
                raise LipSyncError(f"the model runner failed: {message}") from exc
        raise AssertionError("unreachable")

    def audio_features(self, pcm: np.ndarray) -> np.ndarray:
        pcm = np.asarray(pcm, dtype=np.float32)
        states = self._call_chunked("audio_pieces", audio.pad_pieces(pcm), 1)
        return states.reshape(-1, *states.shape[2:])[: audio.step_count(len(pcm))]

    def prepare(self, crops: np.ndarray) -> np.ndarray:
        return self._call_chunked("prepare", np.ascontiguousarray(crops), self.chunk_frames)

    def generate(self, latents: np.ndarray, audio_windows: np.ndarray) -> np.ndarray:
        packed = pack_generate(latents, audio_windows, self.tag)
        return self._call_chunked("generate", packed, self.chunk_frames)


def _is_transport_error(exc: BaseException) -> bool:
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


def is_transport_error(exc: BaseException) -> bool:
    return _is_transport_error(exc)
