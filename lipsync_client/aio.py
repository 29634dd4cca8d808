"""``AsyncLipSyncClient``: the asyncio twin (an ``httpx.AsyncClient`` driving the shared core)."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from datetime import date
from pathlib import Path
from typing import Any, Optional, Union

import httpx
import httpx_ws

from ._core import (
    BytesCallback,
    Call,
    ClientBase,
    FileInput,
    Notify,
    Op,
    ProgressCallback,
    Sleep,
)
from .live import AsyncLiveSession, connect_options, live_url
from .models import Avatar, AvatarDeleted, AvatarList, CleanupResult, Health, Job, JobList, Preview, Usage


class AsyncLipSyncClient(ClientBase):
    """The async twin of ``LipSyncClient``: same arguments, same methods (awaitable), same errors.
    ``progress`` callbacks may be plain functions or coroutine functions.

        async with AsyncLipSyncClient("http://localhost:3000") as c:
            job = await c.generate("in.mp4", "speech.wav", wait=True)
            await c.download(job.job_id, "out.mp4")
    """

    _http_class = httpx.AsyncClient

    async def health(self) -> Health:
        return await self._run(self._core.health())

    async def generate(self, video: Optional[FileInput] = None, audio: Optional[FileInput] = None,
                       bbox_shift: Optional[int] = None, wait: bool = False, *,
                       progress: Optional[ProgressCallback] = None, timeout: Optional[float] = None,
                       idempotency_key: Optional[str] = None, **params: Any) -> Job:
        """Start a job from ``video`` and ``audio`` (paths or binary files, streamed from disk), or from
        URLs the server fetches (``video_url=``, ``audio_url=``; one of each pair), or from a prepared
        avatar instead of the video (``avatar_id=``, see ``create_avatar``: no face tracking, no VAE
        encoding; ``AvatarNotReady`` until it is ready).

        ``params``: any job parameter by name (``bbox_shift=5``, ``webhook_url="https://..."``,
        ``webhook_events=["completed", "failed"]``: ``GET /api/lip-sync/params`` lists them; the server
        checks them and answers 400 for a bad one). A parameter left out takes the deployment's default.
        ``idempotency_key``: the same key and request within 24 h returns the original job instead of
        starting another (so the POST is retried on connection errors); another request with it is a
        409 (``NotFinished``). With ``wait=True``, poll until it completes and return the finished job."""
        params = {"bbox_shift": bbox_shift, **params}
        return await self._run(self._core.generate(video, audio, params, wait, progress, timeout, idempotency_key))

    async def preview(self, video: Optional[FileInput] = None, audio: Optional[FileInput] = None, *,
                      at: Optional[float] = None, image: bool = False, **params: Any) -> Preview:
        """As LipSyncClient.preview: a short stretch rendered at once, and the faces found."""
        return await self._run(self._core.preview(video, audio, params, at, image))

    async def status(self, job_id: str) -> Job:
        return await self._run(self._core.status(job_id))

    async def wait(self, job_id: str, progress: Optional[ProgressCallback] = None,
                   timeout: Optional[float] = None) -> Job:
        return await self._run(self._core.wait(job_id, progress=progress, timeout=timeout))

    async def download(self, job_id: str, path: Union[str, "os.PathLike[str]"],
                       progress: Optional[BytesCallback] = None) -> Path:
        return await self._run(self._core.download(job_id, path, progress))

    async def cleanup(self, job_id: str) -> CleanupResult:
        return await self._run(self._core.cleanup(job_id))

    async def cancel(self, job_id: str) -> Job:
        return await self._run(self._core.cancel(job_id))

    async def credentials(self, job_id: str) -> dict[str, Any]:
        """The result's content credentials (C2PA manifest store as JSON); see LipSyncClient.credentials."""
        return await self._run(self._core.credentials(job_id))

    async def jobs(self, limit: int = 100) -> JobList:
        return await self._run(self._core.jobs(limit))

    async def create_avatar(self, video: Optional[FileInput] = None, *, video_url: Optional[str] = None,
                      bbox_shift: Optional[int] = None, wait: bool = False,
                      progress: Optional[ProgressCallback] = None, timeout: Optional[float] = None,
                      idempotency_key: Optional[str] = None, **params: Any) -> Avatar:
        """Prepare ``video`` (a path or binary file; or ``video_url``) once: its face track and latents.
        Then ``generate(avatar_id=avatar.avatar_id, audio=...)`` for each language uploads only the audio.
        ``params``: the other parameters that shape the preparation (``GET /params``: those marked
        ``x-prepares-video``). With ``wait=True``, poll until it is ready (``AvatarFailed`` otherwise)."""
        params = {"video_url": video_url, "bbox_shift": bbox_shift, **params}
        return await self._run(self._core.create_avatar(video, params, wait, progress, timeout, idempotency_key))

    async def avatar(self, avatar_id: str) -> Avatar:
        """An avatar's status (``ready`` once prepared)."""
        return await self._run(self._core.avatar(avatar_id))

    async def wait_avatar(self, avatar_id: str, progress: Optional[ProgressCallback] = None,
                    timeout: Optional[float] = None) -> Avatar:
        """Poll until the avatar is ready; ``progress(avatar)`` on every change."""
        return await self._run(self._core.wait_avatar(avatar_id, progress=progress, timeout=timeout))

    async def avatars(self, limit: int = 100) -> AvatarList:
        """Your avatars, newest first."""
        return await self._run(self._core.avatars(limit))

    async def delete_avatar(self, avatar_id: str) -> AvatarDeleted:
        """Delete an avatar and its prepared data (a preparation still running is cancelled)."""
        return await self._run(self._core.delete_avatar(avatar_id))

    async def usage(self, since: Optional[Union[str, date]] = None,
                    until: Optional[Union[str, date]] = None) -> Usage:
        """Your own usage (your token's jobs) by UTC day between ``since`` and ``until`` (default: 30 days)."""
        return await self._run(self._core.usage(since, until))

    @asynccontextmanager
    async def live(self, avatar_id: str) -> AsyncIterator[AsyncLiveSession]:
        """The async twin of ``LipSyncClient.live``."""
        async with httpx_ws.aconnect_ws(live_url(self.api_url, avatar_id), self._http, **connect_options()) as ws:
            session = AsyncLiveSession(ws)
            await session._open()
            yield session

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncLipSyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncLipSyncClient({self._core.base_url!r})"

    # -- the driver

    async def _run(self, op: Op) -> Any:
        try:
            step = next(op)
            while True:
                step = op.send(await self._perform(step))
        except StopIteration as done:
            return done.value
        finally:
            op.close()

    async def _perform(self, step: Any) -> Any:
        if isinstance(step, Sleep):
            await asyncio.sleep(step.seconds)
            return None
        if isinstance(step, Notify):
            result = step.callback(step.job)
            if inspect.isawaitable(result):
                await result
            return None
        return await self._send(step)

    async def _send(self, call: Call) -> Any:
        try:
            with ExitStack() as stack:
                args = self._core.request_args(call, stack)
                if call.download_to is None:
                    return await self._http.request(**args)
                async with self._http.stream(**args) as response:
                    if response.status_code >= 300:
                        await response.aread()
                        return response
                    with self._core.sink(call, response) as sink:
                        async for chunk in response.aiter_bytes():
                            sink.write(chunk)
                    return sink.target
        except httpx.TransportError as exc:
            return exc
