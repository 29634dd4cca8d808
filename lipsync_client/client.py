"""``LipSyncClient``: the synchronous client (an ``httpx.Client`` driving the shared core)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
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
from .live import LiveSession, connect_options, live_url
from .models import Avatar, AvatarDeleted, AvatarList, CleanupResult, Health, Job, JobList, Preview, Usage


class LipSyncClient(ClientBase):
    """Client of the lip-sync REST API (``/api/lip-sync``), locally or on BentoCloud.

    ``base_url`` defaults to ``$LIPSYNC_SERVER`` or ``http://localhost:3000`` and may carry a
    path prefix; ``token`` (default ``$LIPSYNC_TOKEN``) is sent as ``Authorization: Bearer``.
    ``timeout`` bounds each network operation (connect, each read/write), not a whole upload.
    Idempotent GETs are retried ``retries`` times on connection errors. Errors are the typed
    exceptions of ``lipsync_client.errors``.

        with LipSyncClient("http://localhost:3000") as c:
            job = c.generate("in.mp4", "speech.wav", wait=True, progress=print)
            c.download(job.job_id, "out.mp4")
    """

    _http_class = httpx.Client

    # -- the API

    def health(self) -> Health:
        """The service's health; ``.ready`` is False (no exception) while models load or failed to."""
        return self._run(self._core.health())

    def generate(self, video: Optional[FileInput] = None, audio: Optional[FileInput] = None,
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
        return self._run(self._core.generate(video, audio, params, wait, progress, timeout, idempotency_key))

    def preview(self, video: Optional[FileInput] = None, audio: Optional[FileInput] = None, *,
                at: Optional[float] = None, image: bool = False, **params: Any) -> Preview:
        """Render a short stretch of what ``generate`` would make with these files and parameters, at once
        (``at``: seconds of the output; default where the dubbing starts). Returns the MP4's bytes (a JPEG
        strip of the frames with ``image=True``) and ``faces``, as a job status' (who was found and
        dubbed). The face tracking is cached: a generate that follows does not track again."""
        return self._run(self._core.preview(video, audio, params, at, image))

    def status(self, job_id: str) -> Job:
        return self._run(self._core.status(job_id))

    def wait(self, job_id: str, progress: Optional[ProgressCallback] = None, timeout: Optional[float] = None) -> Job:
        """Poll until the job finishes; ``progress(job)`` on every change. JobFailed / WaitTimeout otherwise."""
        return self._run(self._core.wait(job_id, progress=progress, timeout=timeout))

    def download(self, job_id: str, path: Union[str, "os.PathLike[str]"],
                 progress: Optional[BytesCallback] = None) -> Path:
        """Stream the result to ``path`` (a file, or a directory to put ``lip_sync_<id>.mp4`` or ``.webm`` in).
        ``progress(bytes_done, total_or_None)``. No partial file is left behind on error."""
        return self._run(self._core.download(job_id, path, progress))

    def credentials(self, job_id: str) -> dict[str, Any]:
        """The result's content credentials: its C2PA manifest store as JSON (``active_manifest``,
        ``manifests``, ``validation_state``). NotFound when it carries none; NotFinished before it completes."""
        return self._run(self._core.credentials(job_id))

    def cleanup(self, job_id: str) -> CleanupResult:
        return self._run(self._core.cleanup(job_id))

    def cancel(self, job_id: str) -> Job:
        return self._run(self._core.cancel(job_id))

    def jobs(self, limit: int = 100) -> JobList:
        return self._run(self._core.jobs(limit))

    def create_avatar(self, video: Optional[FileInput] = None, *, video_url: Optional[str] = None,
                      bbox_shift: Optional[int] = None, wait: bool = False,
                      progress: Optional[ProgressCallback] = None, timeout: Optional[float] = None,
                      idempotency_key: Optional[str] = None, **params: Any) -> Avatar:
        """Prepare ``video`` (a path or binary file; or ``video_url``) once: its face track and latents.
        Then ``generate(avatar_id=avatar.avatar_id, audio=...)`` for each language uploads only the audio.
        ``params``: the other parameters that shape the preparation (``GET /params``: those marked
        ``x-prepares-video``). With ``wait=True``, poll until it is ready (``AvatarFailed`` otherwise)."""
        params = {"video_url": video_url, "bbox_shift": bbox_shift, **params}
        return self._run(self._core.create_avatar(video, params, wait, progress, timeout, idempotency_key))

    def avatar(self, avatar_id: str) -> Avatar:
        """An avatar's status (``ready`` once prepared)."""
        return self._run(self._core.avatar(avatar_id))

    def wait_avatar(self, avatar_id: str, progress: Optional[ProgressCallback] = None,
                    timeout: Optional[float] = None) -> Avatar:
        """Poll until the avatar is ready; ``progress(avatar)`` on every change."""
        return self._run(self._core.wait_avatar(avatar_id, progress=progress, timeout=timeout))

    def avatars(self, limit: int = 100) -> AvatarList:
        """Your avatars, newest first."""
        return self._run(self._core.avatars(limit))

    def delete_avatar(self, avatar_id: str) -> AvatarDeleted:
        """Delete an avatar and its prepared data (a preparation still running is cancelled)."""
        return self._run(self._core.delete_avatar(avatar_id))

    def usage(self, since: Optional[Union[str, date]] = None,
              until: Optional[Union[str, date]] = None) -> Usage:
        """Your own usage (your token's jobs) by UTC day between ``since`` and ``until`` (default: 30 days)."""
        return self._run(self._core.usage(since, until))

    # -- lifecycle

    @contextmanager
    def live(self, avatar_id: str) -> Iterator[LiveSession]:
        """A real-time session on a ready avatar (lipsync_client/live.py): ``send`` speech, ``end``, iterate
        over what comes back. Opens once the server is ready (``session.ready``)."""
        with httpx_ws.connect_ws(live_url(self.api_url, avatar_id), self._http, **connect_options()) as ws:
            session = LiveSession(ws)
            session._open()
            yield session

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "LipSyncClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LipSyncClient({self._core.base_url!r})"

    # -- the driver

    def _run(self, op: Op) -> Any:
        try:
            step = next(op)
            while True:
                step = op.send(self._perform(step))
        except StopIteration as done:
            return done.value
        finally:
            op.close()

    def _perform(self, step: Any) -> Any:
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        if isinstance(step, Notify):
            step.callback(step.job)
            return None
        return self._send(step)

    def _send(self, call: Call) -> Any:
        try:
            with ExitStack() as stack:
                args = self._core.request_args(call, stack)
                if call.download_to is None:
                    return self._http.request(**args)
                with self._http.stream(**args) as response:
                    if response.status_code >= 300:
                        response.read()
                        return response
                    with self._core.sink(call, response) as sink:
                        for chunk in response.iter_bytes():
                            sink.write(chunk)
                    return sink.target
        except httpx.TransportError as exc:
            return exc
