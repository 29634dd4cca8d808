"""Make BentoML's side of the service answer like the REST API.

One ASGI middleware over the whole `LipSync` app:

* `POST /preview` is served by the REST route `POST /api/lip-sync/preview` (its answer is a
  file with headers, which BentoML's endpoint model cannot express).
* `POST /generate` (BentoML's endpoint) is served by the REST route `POST
  /api/lip-sync/generate`: BentoML would read the whole multipart body into memory and a
  temp dir before our code runs; the REST route streams it through the one admission path.
  BentoML's own client sends its fields JSON-encoded (`"bounce"`, `5`, `false`), which the
  admission path reads as well as curl's plain values.
* Errors are JSON everywhere: BentoML's `[{"error": ...}]` bodies are unwrapped, the
  plain-text `Not Found` / `Method Not Allowed` of paths nobody serves become
  `{"error": ...}` in our vocabulary (api/errors.py).
* The probes say what they mean: `/readyz` and `/livez` answer `{"status": ...}` instead of
  an empty body.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header

from lipsync_runner.api.body_guard import answer_json, header, replay
from lipsync_runner.api.errors import generic_error
from lipsync_runner.api.operations import JobOperations

BENTOML_GENERATE = "/generate"
BENTOML_PREVIEW = "/preview"  # served by the REST route POST /api/lip-sync/preview (multipart, binary answer)
PROBES = {"/readyz": ("ready", "not ready"), "/livez": ("alive", "not alive")}
_JSON = b"application/json"
log = logging.getLogger(__name__)


class BentoMLSurface:
    def __init__(self, app, rest_generate_path: str, input_models: dict[str, Any] | None = None) -> None:
        self.app = app
        self.rest_generate_path = rest_generate_path
        # path -> the endpoint's input model: a body it refuses is a 400 answered here, in one log line
        # (BentoML answers 400 too, but logs each one as an error with a traceback)
        self.input_models = input_models or {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        problem = None
        if path in _BENTOML_PATHS and scope.get("method") == "POST":
            # The body is small (BodyGuard read it whole): check it here. BentoML's form parser raises
            # on broken multipart framing (a 500 with a traceback in the log).
            body = await _whole_body(receive)
            receive = replay(body, receive)
            if _is_multipart(scope):
                problem = _malformed_multipart(scope, body)
            elif path in self.input_models:
                problem = _invalid_json(self.input_models[path], body)
        if problem is not None:
            log.info("refused %s %s: %s", scope.get("method"), path, problem)
            await answer_json(send, 400, {"error": problem})
            return
        if path == BENTOML_GENERATE and scope.get("method") == "POST":
            scope = {**scope, "path": self.rest_generate_path, "raw_path": self.rest_generate_path.encode()}
        elif path == BENTOML_PREVIEW and scope.get("method") == "POST":  # the REST route, as generate's
            rest = self.rest_generate_path.rsplit("/", 1)[0] + BENTOML_PREVIEW
            scope = {**scope, "path": rest, "raw_path": rest.encode()}
        probe = PROBES.get(path)

        held: dict = {}
        body = bytearray()

        async def rewriting_send(message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                if (status >= 400 and not content_type.startswith(_JSON)) or (status >= 400 and path in
                                                                              _BENTOML_PATHS) or probe:
                    held.update(message)  # small bodies: rewrite them whole
                    return
                await send(message)
                return
            if not held:
                await send(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            status = held["status"]
            payload = _rewrite(status, bytes(body), dict(held.get("headers") or []).get(b"content-type", b""), probe)
            headers = [(k, v) for k, v in held.get("headers", []) if k not in (b"content-length", b"content-type")]
            headers += [(b"content-type", _JSON), (b"content-length", str(len(payload)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})

        await self.app(scope, receive, rewriting_send)


_BENTOML_PATHS = frozenset({"/status", "/download", "/cancel", "/cleanup", "/jobs", "/health", "/usage"})
_BOUNDARY_RE = re.compile(rb"^[0-9A-Za-z'()+_,\-./:=? ]{1,70}$")  # RFC 2046's boundary characters


def _invalid_json(model: Any, body: bytes) -> str | None:
    """Why an endpoint's input model refuses a JSON body, in one line, or None."""
    from pydantic import ValidationError

    try:
        model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        first = exc.errors(include_context=False, include_input=False)[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"Invalid request body: {where + ': ' if where else ''}{first.get('msg', 'invalid')}"
    return None


def _is_multipart(scope) -> bool:
    return _content_type(scope).lower().startswith(b"multipart/")


def _content_type(scope) -> bytes:
    return header(scope, b"content-type") or b""


async def _whole_body(receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if message["type"] != "http.request" or not message.get("more_body"):
            return bytes(body)


def _malformed_multipart(scope, body: bytes) -> str | None:
    """Why a multipart body's framing cannot be parsed (no boundary, an invalid one, parts that do not
    follow it), or None."""
    _, options = parse_options_header(_content_type(scope))
    boundary = options.get(b"boundary", b"").strip(b'"')
    if not boundary:
        return "Malformed multipart body: the Content-Type has no boundary"
    if not _BOUNDARY_RE.match(boundary) or boundary.endswith(b" "):
        return "Malformed multipart body: the boundary is not valid"
    ended = False

    def on_end() -> None:
        nonlocal ended
        ended = True

    try:
        parser = MultipartParser(boundary, {"on_end": on_end})
        parser.write(body)
        parser.finalize()
    except Exception:  # noqa: BLE001 - python-multipart's errors differ by version; any means malformed
        return "Malformed multipart body: its parts do not follow the boundary"
    return None if ended else "Malformed multipart body: it ends before its closing boundary"


def _rewrite(status: int, payload: bytes, content_type: bytes, probe: tuple[str, str] | None) -> bytes:
    if probe is not None:
        return json.dumps({"status": probe[0] if status < 400 else probe[1]}).encode()
    if content_type.startswith(_JSON):
        try:
            data = json.loads(payload)
        except ValueError:
            data = None
        if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict) and "error" in data[0]:
            return json.dumps(data[0]).encode()  # [{"error": "..."}] -> {"error": "..."}
        if isinstance(data, dict) and "error" in data:
            return payload
        if isinstance(data, dict) and "detail" in data:
            return json.dumps(generic_error(status, str(data["detail"]))).encode()
    text = payload.decode("utf-8", "replace").strip()
    return json.dumps(generic_error(status, text[:300] or None)).encode()


class RunningCore:
    """The running `LipSync` instance's core, for the REST app that BentoML mounts when the class is
    defined, before any instance exists. BentoML's own FastAPI class views reach the instance the same
    way (``bentoml.get_current_service()``); the core itself is built in one pass in ``__init__``."""

    def __init__(self, attribute: str = "core") -> None:
        self.attribute = attribute

    def _core(self) -> Any:
        import bentoml

        return getattr(bentoml.get_current_service(), self.attribute)

    @property
    def operations(self) -> JobOperations:
        return _LiveOperations(lambda: self._core().operations)

    async def health(self, **kwargs: Any) -> dict[str, Any]:
        return await self._core().health(**kwargs)

    def live(self) -> Any:
        """The live sessions' gateway (serving/live.py), per session."""
        return self._core().live


class _LiveOperations(JobOperations):
    """Every attribute is the running core's JobOperations' (resolved per access, per request)."""

    def __init__(self, target: Callable[[], JobOperations]) -> None:  # noqa: super().__init__ on purpose not called
        object.__setattr__(self, "_target", target)

    def __getattribute__(self, name: str) -> Any:
        if name in ("_target", "__class__"):
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "_target")(), name)
