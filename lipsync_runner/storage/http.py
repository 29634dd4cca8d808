"""A download response for a :class:`StoredObject`, with HTTP Range support.

Local files go out as Starlette's ``FileResponse`` (which does Range itself); objects in a
bucket are streamed through this replica chunk by chunk, one ``GET`` with a ``Range`` per
request, or answered with a redirect to a presigned URL when the storage is set up for it.

Every stored file is someone's upload or made from one, served from the service's own origin:
whatever its bytes or its name, a browser must never render it as a page there (a script in
it could read the jobs list). So each answer forbids sniffing, sandboxes any document it
might become, and is ``inline`` only for media types a browser plays rather than renders.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timezone
from email.utils import format_datetime

import anyio
from starlette.datastructures import MutableHeaders
from starlette.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from lipsync_runner.storage.base import StoredObject, content_disposition

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
# On every file answer (redirects and 416 too): no sniffing into a scriptable type, and a document
# that opens anyway runs no script, loads nothing and gets an opaque origin. The price: a video
# opened on its own in a tab shows a player that cannot fetch it (cross-origin from there); the web
# page plays inputs in its own <video>, which these headers do not touch.
FILE_HEADERS = {"x-content-type-options": "nosniff", "content-security-policy": "sandbox; default-src 'none'"}
# What may be shown in the page (inline): audio and video play as media, raster images only as
# pixels. Never SVG (a document with script) or anything textual: those are attachments.
_PLAYABLE = re.compile(r"(audio|video)/[\w.+-]+|image/(jpeg|png|gif|webp)", re.IGNORECASE)


def _playable(media_type: str) -> bool:
    return _PLAYABLE.fullmatch(media_type.strip()) is not None


class RangeNotSatisfiable(ValueError):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, stop)`` of a single-range ``Range`` header, or None for the whole body.

    A header we do not serve (several ranges, another unit, garbage) means the whole body,
    as RFC 9110 allows; a range that starts past the end raises :class:`RangeNotSatisfiable`.
    """
    if not header:
        return None
    m = _RANGE.match(header)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if first == "" and last == "":
        return None
    if first == "":  # the last N bytes
        n = int(last)
        if n == 0:
            raise RangeNotSatisfiable(header)
        return max(0, size - n), size
    start = int(first)
    stop = size if last == "" else min(size, int(last) + 1)
    if start >= size or stop <= start:
        raise RangeNotSatisfiable(header)
    return start, stop


class _FileResponse(FileResponse):
    """Starlette answers a bad or unsatisfiable Range (400, 416) with a response of its own, which
    would go out without :data:`FILE_HEADERS`: they are added to whatever starts."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(FILE_HEADERS)
            await send(message)

        await super().__call__(scope, receive, send_guarded)


async def _stream(obj: StoredObject, start: int, stop: int) -> AsyncIterator[bytes]:
    """The blocking object reader, one chunk at a time on a worker thread."""
    chunks = obj.iter_range(start, stop)
    done = object()
    try:
        while True:
            chunk = await anyio.to_thread.run_sync(next, chunks, done)
            if chunk is done:
                return
            yield chunk
    finally:
        await anyio.to_thread.run_sync(chunks.close)


def object_response(obj: StoredObject, filename: str, *, range_header: str | None = None,
                    media_type: str = "video/mp4", allow_redirect: bool = True, inline: bool = False) -> Response:
    """The response that downloads ``obj`` as ``filename`` (``inline``: for playback in the page).

    ``media_type`` is the caller's knowledge of the content; ``filename`` is for display only and
    decides nothing. ``inline`` is honoured only for a playable ``media_type`` (audio, video, raster images).
    """
    disposition = "inline" if inline and _playable(media_type) else "attachment"
    if allow_redirect and (url := obj.redirect_url(filename, disposition, media_type)):
        return RedirectResponse(url, status_code=307, headers=FILE_HEADERS)
    if obj.local_path is not None:  # Starlette does Range (and HEAD) itself
        return _FileResponse(obj.local_path, media_type=media_type, filename=filename, headers=FILE_HEADERS,
                             content_disposition_type=disposition)
    headers = {**FILE_HEADERS, "accept-ranges": "bytes",
               "content-disposition": content_disposition(disposition, filename)}
    if obj.etag:
        headers["etag"] = obj.etag
    if obj.last_modified is not None:
        headers["last-modified"] = format_datetime(obj.last_modified.astimezone(timezone.utc), usegmt=True)
    try:
        wanted = parse_range(range_header, obj.size)
    except RangeNotSatisfiable:
        return Response(status_code=416, headers={**headers, "content-range": f"bytes */{obj.size}"})
    if wanted is None:
        start, stop, status = 0, obj.size, 200
    else:
        (start, stop), status = wanted, 206
        headers["content-range"] = f"bytes {start}-{stop - 1}/{obj.size}"
    headers["content-length"] = str(stop - start)
    return StreamingResponse(_stream(obj, start, stop), status_code=status, media_type=media_type, headers=headers)
