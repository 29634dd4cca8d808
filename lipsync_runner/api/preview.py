"""``POST /api/lip-sync/preview``: a short stretch of what generate would make, answered at once.

The request is generate's (multipart: ``video`` and ``audio`` files or ``avatar_id``, and every job
parameter) plus ``at`` (seconds of the output; default: where the dubbing starts, the first speech).
It is received and checked by generate's own admission (Admission.receive_preview: same limits,
same errors), then rendered synchronously by a :class:`Previewer` (serving/preview.py), beside the
job workers and not in their queue, so a preview neither waits behind queued jobs nor takes a
worker from them; at most ``LIP_SYNC_MAX_CONCURRENT_PREVIEWS`` render at once (429 with Retry-After
beyond).

The contract (the web page relies on it):

* body: ``video/mp4`` (the stretch with its sound), or with ``Accept: image/jpeg`` a JPEG strip of
  the stretch's frames side by side;
* ``X-Lip-Sync-Faces``: the face-track summary as compact JSON, shaped as a job status' ``faces``;
* ``X-Lip-Sync-Preview``: ``start=<s>;end=<s>``, the stretch in seconds of the output.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio

from lipsync_runner.api.admission import Admission, PreviewRequest
from lipsync_runner.errors import LipSyncError

FACES_HEADER = "X-Lip-Sync-Faces"
RANGE_HEADER = "X-Lip-Sync-Preview"
MP4, JPEG = "video/mp4", "image/jpeg"


@dataclass
class PreviewAnswer:
    body: bytes
    media_type: str  # MP4 or JPEG
    faces: dict[str, Any] | None  # as a job status' `faces`
    start: float  # seconds of the output
    end: float

    def headers(self) -> dict[str, str]:
        return {FACES_HEADER: json.dumps(self.faces, separators=(",", ":")),  # ASCII: a valid header value
                RANGE_HEADER: f"start={self.start:.3f};end={self.end:.3f}"}


class Previewer(Protocol):
    """What renders previews (serving/preview.py); the API layer only calls it."""

    def check_room(self) -> None:
        """Raise QueueFullError (429) when every preview slot is taken, before the body is read."""

    def slot(self) -> AbstractContextManager[None]:
        """Hold one of the bounded preview slots (429 with Retry-After when none is free)."""

    def work_dir(self) -> AbstractContextManager[Path]:
        """A scratch directory for one preview, removed afterwards."""

    def render(self, request: PreviewRequest, owner: str | None, media_type: str) -> PreviewAnswer:
        """Render the stretch (blocking: called in a worker thread)."""


def wanted_type(accept: str | None) -> str:
    """``image/jpeg`` when the client asks for it, else the MP4."""
    return JPEG if accept and JPEG in accept.lower() else MP4


async def run_preview(admission: Admission, previewer: Previewer, stream: AsyncIterator[bytes],
                      content_type: str | None, *, owner: str | None, client: str,
                      accept: str | None) -> PreviewAnswer:
    """Receive and check the request as generate does, then render it in a preview slot."""
    media_type = wanted_type(accept)
    previewer.check_room()  # 429 before an upload is read for nothing
    with previewer.work_dir() as work:
        request = await admission.receive_preview(stream, content_type, work, owner=owner, client=client)
        with previewer.slot():
            try:
                return await anyio.to_thread.run_sync(previewer.render, request, owner, media_type)
            except LipSyncError as exc:  # the user's file names, never the server's paths
                _scrub(exc, work, request)
                raise


def _scrub(exc: LipSyncError, work: Path, request: PreviewRequest) -> None:
    message = exc.message
    for path, shown in ((request.video, request.video_name), (request.audio, request.audio_name)):
        if shown:
            message = message.replace(str(path), shown).replace(path.name, shown)
    for root in {str(work), str(work.resolve())}:
        message = message.replace(root + "/", "").replace(root, "")
    exc.message = message
    exc.args = (message,)

