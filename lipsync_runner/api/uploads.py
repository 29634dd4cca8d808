"""Streaming multipart/form-data uploads straight into a job directory.

The request body is fed chunk by chunk (as the server receives it) through
python-multipart's low-level ``MultipartParser``; file parts are written to disk
as they arrive, under fixed names (``input_video<ext>`` / ``input_audio<ext>``),
and counted per part: a part over its limit aborts the upload with 413 before any
byte past the limit is written. Nothing is buffered beyond one request chunk.

The user's file name is used for two things only: its extension (which must be in
the allowed list) and a sanitised display name. It is never part of a path.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, AsyncIterator, Mapping

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from lipsync_runner.errors import InputTooLargeError, InvalidInputError
from lipsync_runner.media import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS

from .limits import human_size

MAX_DISPLAY_NAME_CHARS = 200
MAX_TEXT_FIELD_BYTES = 64  # bbox_shift, wait: a handful of characters
MAX_PARTS = 16  # two files, two options, and some slack for clients that send extras
MAX_HEADER_BYTES = 8 * 1024


@dataclass(frozen=True)
class FileFieldSpec:
    """One accepted file field: where it goes and what it may be."""

    field: str  # form field name ("video")
    stem: str  # file name stem inside the job directory ("input_video")
    kind: str  # for messages ("video")
    extensions: tuple[str, ...]
    max_bytes: int


def media_specs(max_video_bytes: int, max_audio_bytes: int) -> dict[str, FileFieldSpec]:
    return {
        "video": FileFieldSpec("video", "input_video", "video", VIDEO_EXTENSIONS, max_video_bytes),
        "audio": FileFieldSpec("audio", "input_audio", "audio", AUDIO_EXTENSIONS, max_audio_bytes),
    }


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


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def sanitize_filename(raw: str | None, default: str) -> str:
    """A display-safe base name: no directories, control/format characters or excess length."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Zl", "Zp"))
    name = name.strip()
    if name in ("", ".", ".."):
        return default
    if len(name) > MAX_DISPLAY_NAME_CHARS:
        stem, ext = os.path.splitext(name)
        ext = ext if len(ext) <= 16 else ""
        name = stem[: MAX_DISPLAY_NAME_CHARS - len(ext)] + ext
    return name


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

    def __init__(self, dest: Path, specs: Mapping[str, FileFieldSpec], text_fields: frozenset[str]) -> None:
        self.dest = dest
        self.specs = specs
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
            ext = os.path.splitext(sanitize_filename(raw_filename, ""))[1].lower()
            if ext not in spec.extensions:
                raise InvalidInputError(f"Invalid {spec.kind} format. Supported: {', '.join(spec.extensions)}")
            display = sanitize_filename(raw_filename, f"{spec.field}{ext}")
            part.spec = spec
            part.saved = SavedFile(field=name, file_name=f"{spec.stem}{ext}", display_name=display)
            self._ops.append(("open", part, b""))
        elif is_file:
            expected = " and ".join(f"'{f}'" for f in self.specs)
            raise InvalidInputError(f"Unexpected file field '{sanitize_filename(name, '?')}'; expected {expected}")
        elif name in self.text_fields:
            if name in self.result.fields:
                raise InvalidInputError(f"Field '{name}' was sent more than once")
            part.text = bytearray()
        # any other text field is ignored (its data is dropped as it streams by)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        n = end - start
        if part.spec is not None:
            if part.size + n > part.spec.max_bytes:
                limit = human_size(part.spec.max_bytes)
                raise InputTooLargeError(f"The uploaded {part.spec.kind} exceeds the maximum allowed size of {limit}")
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


async def receive_multipart(
    stream: AsyncIterator[bytes],
    content_type: str | None,
    dest: Path,
    specs: Mapping[str, FileFieldSpec],
    *,
    text_fields: frozenset[str] | set[str] = frozenset(),
) -> UploadResult:
    """Parse a multipart/form-data body from ``stream`` into ``dest``.

    Returns the saved files (all of ``specs`` present) and the collected text fields.
    Raises InvalidInputError (400) for a malformed or incomplete body, a missing,
    duplicate or unexpected file field, or a file extension not allowed by its spec;
    InputTooLargeError (413) as soon as a file part passes its ``max_bytes``. On any
    failure (client disconnect and cancellation included) the files written so far
    are deleted.
    """
    ctype, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidInputError("Expected a multipart/form-data request with 'video' and 'audio' files")
    receiver = _MultipartReceiver(dest, specs, frozenset(text_fields))
    try:
        try:
            parser = MultipartParser(boundary, receiver.callbacks(), max_header_size=MAX_HEADER_BYTES)
        except FormParserError:
            raise InvalidInputError("Malformed multipart body: invalid boundary") from None
        async for chunk in stream:
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
        missing = [name for name in specs if name not in receiver.result.files]
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
