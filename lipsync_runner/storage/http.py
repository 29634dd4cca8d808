"""A download response for a :class:`StoredObject`, with HTTP Range support.

Local files go out as Starlette's ``FileResponse`` (which does Range itself); objects in a
bucket are streamed through this replica chunk by chunk, one ``GET`` with a ``Range`` per
request, or answered with a redirect to a presigned URL when the storage is set up for it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timezone
from email.utils import format_datetime

import anyio
from starlette.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from lipsync_runner.storage.base import StoredObject, content_disposition

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


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
    """The response that downloads ``obj`` as ``filename`` (``inline``: for playback in the page)."""
    disposition = "inline" if inline else "attachment"
    if allow_redirect and (url := obj.redirect_url(filename, disposition)):
        return RedirectResponse(url, status_code=307)
    if obj.local_path is not None:  # Starlette does Range (and HEAD) itself
        return FileResponse(obj.local_path, media_type=media_type, filename=filename,
                            content_disposition_type=disposition)
    headers = {"accept-ranges": "bytes", "content-disposition": content_disposition(disposition, filename)}
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
