"""Make BentoML's own endpoints answer like the REST API.

BentoML wraps 4xx bodies as `[{"error": ...}]`, has no way to attach `Retry-After`
to an error, and answers 500 when its own multipart parsing meets a form it cannot
read (an unknown file field, a malformed body). This ASGI middleware, on the BentoML
endpoint paths only, unwraps error bodies, adds `Retry-After` to 429s, and turns a 500
that followed a broken form into a 400 that says what was wrong with it.
"""

from __future__ import annotations

import json
import re

from python_multipart.multipart import MultipartParser, parse_options_header

BENTOML_PATHS = frozenset({"/generate", "/status", "/download", "/cancel", "/cleanup", "/jobs", "/health"})
FORM_FIELDS = ("video", "audio")
RETRY_AFTER_KEY = "lipsync_retry_after"
_BENTOML_TEMP_NAME = re.compile(r"^tmp[a-z0-9_]{8}(.+)$")


def user_filename(name: str) -> str:
    """BentoML stores an upload as NamedTemporaryFile(suffix=<user's name>): recover that name."""
    match = _BENTOML_TEMP_NAME.match(name)
    return match.group(1) if match else name


class _FormChecker:
    """Reads the part headers of a multipart body as it streams past; keeps no data."""

    def __init__(self, content_type: str) -> None:
        _, options = parse_options_header(content_type)
        self.problem: str | None = None
        self.files: list[str] = []
        self._field = bytearray()
        self._value = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        boundary = options.get(b"boundary")
        if not boundary:
            self.problem = "Malformed multipart body: no boundary"
            self.parser = None
            return
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._headers.clear,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
        })

    def _header_end(self) -> None:
        self._headers.append((bytes(self._field).lower(), bytes(self._value)))
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        disposition = next((v for k, v in self._headers if k == b"content-disposition"), b"")
        _, options = parse_options_header(disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            self.files.append(name)

    def feed(self, chunk: bytes) -> None:
        if self.parser is None or self.problem or not chunk:
            return
        try:
            self.parser.write(chunk)
        except Exception:  # noqa: BLE001 - any parser error means the body is malformed
            self.problem = "Malformed multipart body"

    def fault(self) -> str | None:
        """What is wrong with the form as far as our fields go, or None when it looked fine."""
        if self.problem:
            return self.problem
        unexpected = [f for f in self.files if f not in FORM_FIELDS]
        if unexpected:
            return f"Unexpected file field '{unexpected[0][:64]}'; expected 'video' and 'audio'"
        missing = [f for f in FORM_FIELDS if f not in self.files]
        if missing:
            return f"Missing file field '{missing[0]}'"
        return None


class BentoMLErrorBodies:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") not in BENTOML_PATHS:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        checker: _FormChecker | None = None
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
        if scope["path"] == "/generate" and content_type.startswith("multipart/"):
            checker = _FormChecker(content_type)

            async def checked_receive():
                message = await receive()
                if message["type"] == "http.request":
                    checker.feed(message.get("body", b""))
                return message
        else:
            checked_receive = receive

        held: dict = {}
        body = bytearray()

        async def rewriting_send(message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    await send(message)
                else:
                    held.update(message)  # errors are small: rewrite them whole
                return
            if not held:
                await send(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            status, payload = held["status"], bytes(body)
            fault = checker.fault() if status == 500 and checker is not None else None
            if fault is not None:
                status, payload = 400, json.dumps({"error": fault}).encode()
            else:
                payload = _unwrap(payload)
            headers = [(k, v) for k, v in held.get("headers", []) if k not in (b"content-length", b"content-type")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
            if status == 429:
                headers.append((b"retry-after", str(int(state.get(RETRY_AFTER_KEY, 30))).encode()))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})

        await self.app(scope, checked_receive, rewriting_send)


def _unwrap(payload: bytes) -> bytes:
    """[{"error": "..."}] -> {"error": "..."} (what the REST routes answer)."""
    try:
        data = json.loads(payload)
    except ValueError:
        return payload
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict) and "error" in data[0]:
        return json.dumps(data[0]).encode()
    return payload
