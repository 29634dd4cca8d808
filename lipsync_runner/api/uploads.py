"""Streaming multipart/form-data uploads straight into a job directory.

The request body is fed chunk by chunk (as the server receives it) through
python-multipart's low-level ``MultipartParser``; file parts are written to disk
as they arrive, under fixed names (``input_video[.ext]`` / ``input_audio[.ext]``),
and watched by an :class:`UploadGuard`: a part over its limit aborts the upload with
413 before any byte past the limit is written, an upload that stalls or crawls below
the minimum rate is cut off with 408 (it would hold a slot for an hour), and free
space is re-checked as the bytes arrive (507). Nothing is buffered beyond one request
chunk.

Inputs are recognised by their content (ffmpeg probes them later); the user's file
name is only a hint: a known extension is kept on the stored name, and a sanitised
display name is kept for messages. It is never part of a path.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, AsyncIterator
from urllib.parse import parse_qsl

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from lipsync_runner.errors import InputTooLargeError, InvalidInputError, UploadTooSlowError

from lipsync_runner.config import ApiLimits
from lipsync_runner.inputs.files import FileFieldSpec, human_size, media_specs, sanitize_filename

MAX_TEXT_FIELD_BYTES = 256 * 1024  # a job parameter: a number, a word, or a JSON list (segments, key-frame boxes)
MAX_PARTS = 32  # two files, the job parameters, and some slack for clients that send extras
MAX_HEADER_BYTES = 8 * 1024
MAX_JSON_BYTES = MAX_TEXT_FIELD_BYTES  # a JSON body holds only parameters (URLs, segments)
SPACE_CHECK_BYTES = 8 * 2**20  # free space is re-checked every this many bytes received


class UploadGuard:
    """What one upload may do: file sizes, transfer rate, and the disk it lands on.

    * each file stops at its limit (413);
    * no byte for ``upload_idle_timeout_s``, or an average below ``upload_min_bytes_per_s``
      once ``upload_rate_grace_s`` have passed: 408, the slot is freed;
    * every ``SPACE_CHECK_BYTES`` the free-space floor is checked again (507), so parallel
      uploads cannot fill the disk under the running jobs.
    """

    def __init__(self, limits: ApiLimits, check_space: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.specs = media_specs(limits.max_video_bytes, limits.max_audio_bytes)
        self.check_space = check_space
        self.clock = clock
        self.started = clock()
        self.received = 0
        self._next_space_check = SPACE_CHECK_BYTES

    @property
    def idle_timeout_s(self) -> float:
        return self.limits.upload_idle_timeout_s

    def saved_file(self, field: str, raw_filename: str | None) -> SavedFile:
        spec = self.specs[field]
        ext = os.path.splitext(sanitize_filename(raw_filename, ""))[1].lower()
        ext = ext if ext in spec.hint_extensions else ""
        display = sanitize_filename(raw_filename, f"{spec.field}{ext}")
        return SavedFile(field=field, file_name=f"{spec.stem}{ext}", display_name=display)

    def check_size(self, field: str, size: int) -> None:
        spec = self.specs[field]
        if size > spec.max_bytes:
            raise InputTooLargeError(
                f"The uploaded {spec.kind} exceeds the maximum allowed size of {human_size(spec.max_bytes)}")

    def received_bytes(self, n: int) -> None:
        """Account for ``n`` more bytes of the request body."""
        self.received += n
        elapsed = self.clock() - self.started
        if elapsed > self.limits.upload_rate_grace_s and self.received / elapsed < self.limits.upload_min_bytes_per_s:
            raise UploadTooSlowError(
                f"Upload too slow: {self.received / elapsed / 1024:.0f} KB/s, below the minimum of "
                f"{self.limits.upload_min_bytes_per_s / 1024:.0f} KB/s")
        if self.check_space is not None and self.received >= self._next_space_check:
            self._next_space_check = self.received + SPACE_CHECK_BYTES
            self.check_space()

    def idle(self) -> UploadTooSlowError:
        return UploadTooSlowError(f"Upload stalled: no data for {self.idle_timeout_s:g} s")


@dataclass
class SavedFile:
    field: str
    file_name: str  # the safe name inside the job directory
    display_name: str  # the user's name, sanitised, for display only
    size: int = 0


@dataclass
class UploadResult:
    files: dict[str, SavedFile] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)


def is_multipart(content_type: str | None) -> bool:
    ctype, params = parse_options_header(content_type or "")
    return ctype == b"multipart/form-data" and bool(params.get(b"boundary"))


def is_json(content_type: str | None) -> bool:
    ctype, _ = parse_options_header(content_type or "")
    return ctype == b"application/json"


def is_urlencoded(content_type: str | None) -> bool:
    ctype, _ = parse_options_header(content_type or "")
    return ctype == b"application/x-www-form-urlencoded"


async def _small_body(stream: AsyncIterator[bytes], idle_timeout_s: float, max_bytes: int, what: str) -> bytes:
    body = bytearray()
    iterator = stream.__aiter__()
    while True:
        try:
            with anyio.fail_after(idle_timeout_s):
                chunk = await iterator.__anext__()
        except StopAsyncIteration:
            return bytes(body)
        except TimeoutError:
            raise UploadTooSlowError(f"Request body stalled: no data for {idle_timeout_s:g} s") from None
        body += chunk
        if len(body) > max_bytes:
            raise InvalidInputError(f"{what} body too large (at most {human_size(max_bytes)}; files go as "
                                    "multipart/form-data)")


async def receive_json(stream: AsyncIterator[bytes], *, idle_timeout_s: float,
                       max_bytes: int = MAX_JSON_BYTES) -> dict:
    """A small JSON object body (job parameters, inputs by URL); InvalidInputError (400) otherwise."""
    body = await _small_body(stream, idle_timeout_s, max_bytes, "JSON")
    try:
        data = json.loads(body)
    except ValueError:
        raise InvalidInputError("Malformed JSON body") from None
    if not isinstance(data, dict):
        raise InvalidInputError("The JSON body must be an object of job parameters")
    return data


async def receive_urlencoded(stream: AsyncIterator[bytes], *, idle_timeout_s: float,
                             max_bytes: int = MAX_JSON_BYTES) -> dict[str, str]:
    """A form without files (``a=1&b=2``: what BentoML's client sends when no file is given)."""
    body = await _small_body(stream, idle_timeout_s, max_bytes, "Form")
    fields: dict[str, str] = {}
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body),
                          max_num_fields=MAX_PARTS)
    except (UnicodeDecodeError, ValueError):
        raise InvalidInputError("Malformed form body") from None
    for name, value in pairs:
        if name in fields:
            raise InvalidInputError(f"Field '{sanitize_filename(name, '?')[:64]}' was sent more than once")
        fields[name] = value
    return fields


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class _Part:
    __slots__ = ("headers", "name", "spec", "saved", "text", "size", "handle")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.name: str = ""
        self.spec: FileFieldSpec | None = None
        self.saved: SavedFile | None = None
        self.text: bytearray | None = None  # collected value of a small text field
        self.size = 0
        self.handle: IO[bytes] | None = None


class _MultipartReceiver:
    """Callbacks for MultipartParser; file I/O is queued and done off the event loop."""

    def __init__(self, dest: Path, guard: UploadGuard, text_fields: frozenset[str]) -> None:
        self.dest = dest
        self.guard = guard
        self.specs = guard.specs
        self.text_fields = text_fields
        self.result = UploadResult()
        self.part = _Part()
        self.parts_seen = 0
        self.ended = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._header_bytes = 0
        self._ops: list[tuple[str, _Part, bytes]] = []  # ("open" | "data" | "close", part, data)
        self._opened: list[_Part] = []

    # ----------------------------------------------------------------- parser callbacks

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.parts_seen += 1
        if self.parts_seen > MAX_PARTS:
            raise InvalidInputError(f"Too many form fields (at most {MAX_PARTS})")
        self.part = _Part()
        self._header_bytes = 0

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:
            raise InvalidInputError("Malformed multipart body: part headers too large")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self.part.headers.append((bytes(self._header_name).lower(), bytes(self._header_value)))
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        part = self.part
        disposition = next((v for k, v in part.headers if k == b"content-disposition"), b"")
        kind, options = parse_options_header(disposition)
        if kind != b"form-data" or b"name" not in options:
            raise InvalidInputError("Malformed multipart body: a part has no form field name")
        part.name = name = _decode(options[b"name"])
        is_file = b"filename" in options
        spec = self.specs.get(name)
        if spec is not None:
            if name in self.result.files:
                raise InvalidInputError(f"Field '{name}' was sent more than once")
            raw_filename = _decode(options[b"filename"]) if is_file else ""
            part.spec = spec
            part.saved = self.guard.saved_file(name, raw_filename)
            self._ops.append(("open", part, b""))
        elif is_file:
            expected = " and ".join(f"'{f}'" for f in self.specs)
            raise InvalidInputError(f"Unexpected file field '{sanitize_filename(name, '?')}'; expected {expected}")
        elif name in self.text_fields:
            if name in self.result.fields:
                raise InvalidInputError(f"Field '{name}' was sent more than once")
            part.text = bytearray()
        else:  # a typo of a parameter must not silently do nothing
            known = ", ".join(sorted(self.text_fields))
            raise InvalidInputError(f"Unknown form field '{sanitize_filename(name, '?')[:64]}'; the fields are "
                                    f"'video', 'audio' and: {known}")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        n = end - start
        if part.spec is not None:
            self.guard.check_size(part.spec.field, part.size + n)
            part.size += n
            self._ops.append(("data", part, data[start:end]))
        elif part.text is not None:
            if len(part.text) + n > MAX_TEXT_FIELD_BYTES:
                raise InvalidInputError(f"Form field '{part.name}' is too long")
            part.text += data[start:end]

    def on_part_end(self) -> None:
        part = self.part
        if part.saved is not None:
            part.saved.size = part.size
            self.result.files[part.name] = part.saved
            self._ops.append(("close", part, b""))
        elif part.text is not None:
            self.result.fields[part.name] = _decode(bytes(part.text)).strip()

    def on_end(self) -> None:
        self.ended = True

    # ----------------------------------------------------------------- file I/O

    def take_ops(self) -> list[tuple[str, _Part, bytes]]:
        ops, self._ops = self._ops, []
        return ops

    def apply(self, ops: list[tuple[str, _Part, bytes]]) -> None:
        """Run queued file operations (in a worker thread)."""
        for op, part, data in ops:
            if op == "open":
                assert part.saved is not None
                # "x": never follow or overwrite something already there
                part.handle = open(self.dest / part.saved.file_name, "xb")
                self._opened.append(part)
            elif op == "data":
                assert part.handle is not None
                part.handle.write(data)
            else:
                assert part.handle is not None
                part.handle.close()

    def abort(self) -> None:
        """Close and delete every file this upload created; never raises."""
        for part in self._opened:
            try:
                if part.handle is not None:
                    part.handle.close()
            except OSError:
                pass
            try:
                assert part.saved is not None
                (self.dest / part.saved.file_name).unlink()
            except (OSError, AssertionError):
                pass


async def _chunks(stream: AsyncIterator[bytes], guard: UploadGuard) -> AsyncIterator[bytes]:
    """The body's chunks; UploadTooSlowError when none arrives within the idle timeout."""
    iterator = stream.__aiter__()
    while True:
        try:
            with anyio.fail_after(guard.idle_timeout_s):
                chunk = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise guard.idle() from None
        guard.received_bytes(len(chunk))
        yield chunk


async def receive_multipart(
    stream: AsyncIterator[bytes],
    content_type: str | None,
    dest: Path,
    *,
    guard: UploadGuard,
    text_fields: frozenset[str] | set[str] = frozenset(),
    required_files: Collection[str] | None = None,
) -> UploadResult:
    """Parse a multipart/form-data body from ``stream`` into ``dest``.

    Returns the saved files (``video`` and ``audio``) and the collected text fields.
    ``required_files``: the file fields that must be there (default: all; admission passes
    none and decides itself, since an input may come as a URL field instead).
    Raises InvalidInputError (400) for a malformed or incomplete body, a missing,
    duplicate or unexpected file field; InputTooLargeError (413) as soon as a file
    part passes its limit; UploadTooSlowError (408) for a stalled or crawling upload;
    InsufficientStorageError (507) when the disk fills up meanwhile. On any failure
    (client disconnect and cancellation included) the files written so far are deleted.
    """
    ctype, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidInputError("Expected a multipart/form-data request with 'video' and 'audio' files")
    receiver = _MultipartReceiver(dest, guard, frozenset(text_fields))
    specs = guard.specs
    try:
        try:
            parser = MultipartParser(boundary, receiver.callbacks(), max_header_size=MAX_HEADER_BYTES)
        except FormParserError:
            raise InvalidInputError("Malformed multipart body: invalid boundary") from None
        async for chunk in _chunks(stream, guard):
            if not chunk:
                continue
            try:
                parser.write(chunk)
            except FormParserError:
                raise InvalidInputError("Malformed multipart body") from None
            ops = receiver.take_ops()
            if ops:
                await anyio.to_thread.run_sync(receiver.apply, ops)
            if receiver.ended:
                break  # the closing boundary was seen; anything after it is the epilogue
        parser.finalize()
        if not receiver.ended:
            raise InvalidInputError("Incomplete multipart body: the upload ended before its closing boundary")
        required = specs if required_files is None else required_files
        missing = [name for name in required if name not in receiver.result.files]
        if missing:
            raise InvalidInputError(f"Missing required file field(s): {', '.join(repr(m) for m in missing)}")
        empty = [f for f in receiver.result.files.values() if f.size == 0]
        if empty:
            raise InvalidInputError(f"The uploaded {empty[0].field} file is empty")
        return receiver.result
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(receiver.abort)
        raise
