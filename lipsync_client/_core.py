"""The transport-free core shared by the sync and the async client.

Every operation is a generator that *yields* what it needs done -- an HTTP ``Call``, a
``Sleep``, or a ``Notify`` of the progress callback -- and receives the outcome. It owns
all the logic: URLs, request bodies, retries of idempotent GETs, error mapping, response
parsing, the polling schedule of ``wait``. The two clients are only drivers that perform
those steps with ``httpx.Client`` or ``httpx.AsyncClient``; the download sink (temporary
file next to the target, renamed once complete) is shared too.
"""

from __future__ import annotations

import json
import mimetypes
import os
import re
import secrets
import time
from collections.abc import Callable, Generator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO, Any, Optional, TypeVar, Union
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from . import __version__
from .errors import (
    AvatarFailed,
    AvatarNotReady,
    ConnectionFailed,
    IdempotencyConflict,
    JobFailed,
    LipSyncClientError,
    TooManyRequests,
    UnexpectedResponse,
    WaitTimeout,
    error_class,
)
from .models import Avatar, AvatarDeleted, AvatarList, CleanupResult, Health, Job, JobList, Preview, Usage

DEFAULT_SERVER = "http://localhost:3000"
API_PREFIX = "/api/lip-sync"
DEFAULT_TIMEOUT = 120.0
IDEMPOTENCY_HEADER = "Idempotency-Key"
INPUTS = ("video", "audio")
POLL_MIN_S, POLL_MAX_S, POLL_GROWTH = 0.5, 2.0, 1.5

FileInput = Union[str, "os.PathLike[str]", IO[bytes]]
ProgressCallback = Callable[[Job], Any]
BytesCallback = Callable[[int, Optional[int]], Any]
M = TypeVar("M", bound=BaseModel)


# ---------------------------------------------------------------------------- steps


@dataclass
class Call:
    """One HTTP request. The driver answers with an ``httpx.Response`` (body read), the
    ``Path`` written for a download, or the ``httpx.TransportError`` it got."""

    method: str
    path: str
    params: Optional[dict[str, Any]] = None
    data: Optional[dict[str, str]] = None
    files: Optional[dict[str, FileInput]] = None
    json: Optional[dict[str, Any]] = None
    headers: Optional[dict[str, str]] = None
    idempotent: bool = False
    download_to: Optional[Path] = None
    on_bytes: Optional[BytesCallback] = None


@dataclass
class Sleep:
    seconds: float


@dataclass
class Notify:
    """Call ``callback(job)``; the async driver awaits the result if it is awaitable."""

    callback: ProgressCallback
    job: Job


Step = Union[Call, Sleep, Notify]
Op = Generator[Step, Any, Any]


# ---------------------------------------------------------------------------- helpers


def resolve_server(base_url: Optional[str]) -> str:
    url = (base_url or os.environ.get("LIPSYNC_SERVER") or DEFAULT_SERVER).strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def resolve_token(token: Optional[str]) -> Optional[str]:
    if token is None:
        token = os.environ.get("LIPSYNC_TOKEN")
    return token.strip() or None if token else None


def api_root(base_url: str, api_prefix: str = API_PREFIX) -> str:
    """``base_url`` (which may carry a path prefix, or already end with the API prefix) + API prefix."""
    prefix = "/" + api_prefix.strip("/") if api_prefix.strip("/") else ""
    if prefix and base_url.endswith(prefix):
        return base_url
    return base_url + prefix


def form_fields(params: Mapping[str, Any]) -> dict[str, str]:
    """Job parameters (lipsync_runner/params.py JobParams, by name) as form fields: strings as they are,
    anything else as JSON (lists of segments, numbers, booleans); None means "not given"."""
    fields = {}
    for name, value in params.items():
        if value is None:
            continue
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        fields[name] = value if isinstance(value, str) else json.dumps(value)
    return fields


def json_fields(params: Mapping[str, Any]) -> dict[str, Any]:
    """Job parameters as a JSON body (inputs by URL); None means "not given"."""
    return {name: value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            for name, value in params.items() if value is not None}


def error_message(response: httpx.Response, body: Any) -> str:
    """The server's own words: ``{"error", "details"|"message"}``, a gateway's ``message``/``detail``, or text."""
    if isinstance(body, dict):
        parts = [str(body[k]).strip() for k in ("error", "message", "detail", "details") if body.get(k)]
        parts = [p for i, p in enumerate(parts) if p not in parts[:i]]
        if parts:
            return ": ".join(parts[:2])
    text = response.text.strip() if response.content and len(response.content) < 4096 else ""
    if text and not text.lstrip().startswith("<"):
        return text.splitlines()[0][:300]
    return f"HTTP {response.status_code} {response.reason_phrase}".strip()


def retry_after(response: httpx.Response) -> Optional[float]:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def raise_for_status(response: httpx.Response) -> None:
    """Map an HTTP error to its typed exception, with the server's message."""
    if response.status_code < 400:
        return
    body = _json(response)
    cls = error_class(response.status_code)
    message = error_message(response, body)
    if _avatar_not_ready(response, message):
        cls = AvatarNotReady
    elif response.status_code == 409 and response.request.url.path.endswith(("/generate", "/avatars")):
        cls = IdempotencyConflict  # their other 409
    if cls is TooManyRequests:
        raise TooManyRequests(message, response.status_code, body=body, retry_after=retry_after(response))
    raise cls(message, response.status_code, body=body)


def _avatar_not_ready(response: httpx.Response, message: str) -> bool:
    """generate's 409 for an avatar_id whose avatar is not ready (the server says "avatar <id> ...")."""
    return (response.status_code == 409 and response.request.url.path.endswith("/generate")
            and message.startswith("avatar "))


def parse(response: httpx.Response, model: type[M]) -> M:
    body = _json(response)
    try:
        return model.model_validate(body)
    except ValidationError:
        snippet = response.text[:120].replace("\n", " ")
        raise UnexpectedResponse(
            f"unexpected response from {response.request.url} (HTTP {response.status_code}): {snippet!r}; "
            "is this a lip-sync server?",
            response.status_code,
        ) from None


def describe_transport_error(exc: httpx.TransportError, root: str) -> str:
    reason = str(exc).strip() or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out talking to {root} ({type(exc).__name__}: {reason})"
    return f"cannot reach {root}: {reason}"


class DownloadSink:
    """Write a download to a temporary file next to ``target``; rename it into place only
    when the whole body arrived (the size matches Content-Length). On any error the
    temporary file is removed, so no partial output is ever left behind."""

    def __init__(self, target: Path, response: httpx.Response, on_bytes: Optional[BytesCallback]) -> None:
        self.target = target
        self.on_bytes = on_bytes
        self.done = 0
        length = response.headers.get("content-length")
        encoded = response.headers.get("content-encoding", "identity") not in ("", "identity")
        self.total = int(length) if length and length.isdigit() and not encoded else None
        self.tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self.file = os.fdopen(fd, "wb")

    def __enter__(self) -> "DownloadSink":
        if self.on_bytes:
            self.on_bytes(0, self.total)
        return self

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.done += len(chunk)
        if self.on_bytes:
            self.on_bytes(self.done, self.total)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.file.close()
            if exc_type is None and self.total is not None and self.done != self.total:
                raise httpx.RemoteProtocolError(f"download ended after {self.done} of {self.total} bytes")
            if exc_type is None:
                os.replace(self.tmp, self.target)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


# ---------------------------------------------------------------------------- the core


@dataclass
class ClientCore:
    base_url: str
    token: Optional[str] = None
    api_prefix: str = API_PREFIX
    retries: int = 2
    retry_backoff: float = 0.5
    root: str = field(init=False)

    def __post_init__(self) -> None:
        self.base_url = resolve_server(self.base_url)
        self.token = resolve_token(self.token)
        self.root = api_root(self.base_url, self.api_prefix)

    # -- what the drivers need to build their httpx client and requests

    def client_options(self, timeout: Union[float, httpx.Timeout, None], headers: Optional[dict[str, str]]) -> dict:
        all_headers = {"User-Agent": f"lipsync-client/{__version__}", "Accept": "application/json"}
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        all_headers.update(headers or {})
        if not isinstance(timeout, httpx.Timeout):
            timeout = httpx.Timeout(timeout, connect=None if timeout is None else min(timeout, 15.0))
        return {"headers": all_headers, "timeout": timeout, "follow_redirects": True}

    def request_args(self, call: Call, stack: ExitStack) -> dict[str, Any]:
        """httpx ``request``/``stream`` arguments; upload files are opened here (into ``stack``)
        and streamed from disk by httpx, never read into memory."""
        args: dict[str, Any] = {"method": call.method, "url": self.root + call.path}
        if call.params:
            args["params"] = call.params
        if call.data:
            args["data"] = call.data
        if call.json is not None:
            args["json"] = call.json
        if call.headers:
            args["headers"] = call.headers
        if call.files:
            args["files"] = {name: _file_part(value, stack) for name, value in call.files.items()}
        return args

    def sink(self, call: Call, response: httpx.Response) -> DownloadSink:
        assert call.download_to is not None
        return DownloadSink(call.download_to, response, call.on_bytes)

    # -- shared steps

    def _call(self, call: Call, check: bool = True) -> Generator[Step, Any, Any]:
        """Perform ``call``; retry idempotent ones on connection errors (and, for a POST with an
        Idempotency-Key, on the server's 409 "still being received" after its Retry-After);
        map HTTP errors."""
        attempt = 0
        keyed = bool(call.headers and IDEMPOTENCY_HEADER in call.headers)
        while True:
            outcome = yield call
            if isinstance(outcome, httpx.TransportError):
                if call.idempotent and attempt < self.retries:
                    yield Sleep(self.retry_backoff * 2**attempt)
                    attempt += 1
                    continue
                raise ConnectionFailed(describe_transport_error(outcome, self.base_url)) from outcome
            if (keyed and isinstance(outcome, httpx.Response) and outcome.status_code == 409
                    and retry_after(outcome) is not None and attempt < self.retries
                    and not _avatar_not_ready(outcome, error_message(outcome, _json(outcome)))):
                yield Sleep(min(30.0, retry_after(outcome) or 1.0))
                attempt += 1
                continue
            if isinstance(outcome, httpx.Response) and check:
                raise_for_status(outcome)
            return outcome

    @staticmethod
    def _job_path(kind: str, job_id: str) -> str:
        if not job_id or not isinstance(job_id, str):
            raise ValueError("job_id must be a non-empty string")
        return f"/{kind}/{quote(job_id, safe='')}"

    # -- operations

    def health(self) -> Op:
        response = yield from self._call(Call("GET", "/health", idempotent=True), check=False)
        body = _json(response)
        if response.status_code == 503 and isinstance(body, dict) and "status" in body and "models_loaded" in body:
            return parse(response, Health)  # not ready: the body says why
        raise_for_status(response)
        return parse(response, Health)

    def generate(self, video: Optional[FileInput], audio: Optional[FileInput], params: Mapping[str, Any],
                 wait: bool = False, progress: Optional[ProgressCallback] = None, timeout: Optional[float] = None,
                 idempotency_key: Optional[str] = None) -> Op:
        files = {name: value for name, value in (("video", video), ("audio", audio)) if value is not None}
        missing = [name for name in INPUTS if name not in files and params.get(f"{name}_url") is None
                   and not (name == "video" and params.get("avatar_id") is not None)]
        if missing:
            raise ValueError(" and ".join(f"{m}: give a file or {m}_url" + (" (or avatar_id)" if m == "video" else "")
                                          for m in missing))
        response = yield from self._call(self._post("/generate", files, params, idempotency_key))
        job = parse(response, Job)
        if wait:
            job = yield from self.wait(job.job_id, progress=progress, timeout=timeout)
        return job

    def preview(self, video: Optional[FileInput], audio: FileInput, params: Mapping[str, Any],
                at: Optional[float] = None, image: bool = False) -> Op:
        """POST /preview: a short stretch of what generate would make, rendered at once (files only)."""
        if video is None and params.get("avatar_id") is None:
            raise ValueError("video: give a file (or avatar_id)")
        if audio is None:
            raise ValueError("audio: give a file")
        files = {name: value for name, value in (("video", video), ("audio", audio)) if value is not None}
        data = form_fields({**params, "at": at})
        accept = "image/jpeg" if image else "video/mp4"
        response = yield from self._call(Call("POST", "/preview", data=data, files=files, headers={"Accept": accept}))
        stretch = dict(part.split("=", 1) for part in response.headers.get("x-lip-sync-preview", "").split(";")
                       if "=" in part)
        try:
            return Preview(content=response.content, media_type=response.headers.get("content-type", accept),
                           faces=json.loads(response.headers.get("x-lip-sync-faces") or "null"),
                           start=float(stretch["start"]), end=float(stretch["end"]))
        except (KeyError, ValueError):
            raise UnexpectedResponse(f"unexpected response from {response.request.url}: no preview headers; "
                                     "is this a lip-sync server?", response.status_code) from None

    def _post(self, path: str, files: dict[str, FileInput], params: Mapping[str, Any],
              idempotency_key: Optional[str]) -> Call:
        headers = {IDEMPOTENCY_HEADER: idempotency_key} if idempotency_key else None
        # with a key a retried POST cannot start a second job; an open file object cannot be re-sent
        retry = bool(idempotency_key) and all(isinstance(f, (str, os.PathLike)) for f in files.values())
        if files:  # the uploads stream from disk as multipart, the parameters as its fields
            return Call("POST", path, data=form_fields(params), files=files, headers=headers, idempotent=retry)
        return Call("POST", path, json=json_fields(params), headers=headers, idempotent=retry)  # by URL: JSON

    def status(self, job_id: str) -> Op:
        response = yield from self._call(Call("GET", self._job_path("status", job_id), idempotent=True))
        return parse(response, Job)

    def wait(self, job_id: str, progress: Optional[ProgressCallback] = None, timeout: Optional[float] = None,
             clock: Callable[[], float] = time.monotonic) -> Op:
        """Poll until the job finishes (every 0.5 s, growing to 2 s); ``progress(job)`` on each change.
        Returns the completed job; raises JobFailed (failed/cancelled) or WaitTimeout."""
        return (yield from self._poll(lambda: self.status(job_id), JobFailed, progress, timeout, clock))

    def _poll(self, fetch: Callable[[], Op], failed: Callable[[Any], Exception],
              progress: Optional[ProgressCallback], timeout: Optional[float], clock: Callable[[], float]) -> Op:
        start = clock()
        delay = POLL_MIN_S
        seen = None
        while True:
            job = yield from fetch()
            key = (job.status, job.stage, job.progress)
            if progress is not None and key != seen:
                yield Notify(progress, job)
            seen = key
            if job.finished:
                if job.failed:
                    raise failed(job)
                return job
            pause = delay
            if timeout is not None:
                remaining = timeout - (clock() - start)
                if remaining <= 0:
                    raise WaitTimeout(job, timeout)
                pause = min(pause, remaining)
            yield Sleep(pause)
            delay = min(delay * POLL_GROWTH, POLL_MAX_S)

    def download(self, job_id: str, path: Union[str, "os.PathLike[str]"],
                 on_bytes: Optional[BytesCallback] = None) -> Op:
        target = Path(path).expanduser()
        if target.is_dir():  # the server's download name: its suffix is the job's output_format
            job = yield from self.status(job_id)
            name = f"lip_sync_{job_id}.mp4"
            if job.output_path and re.fullmatch(r"lip_sync_[0-9a-f-]+\.(mp4|webm)", job.output_path):
                name = job.output_path
            target = target / name
        if not target.parent.is_dir():
            raise FileNotFoundError(f"output directory does not exist: {target.parent}")
        call = Call("GET", self._job_path("download", job_id), idempotent=True, download_to=target,
                    on_bytes=on_bytes)
        result = yield from self._call(call)
        if not isinstance(result, Path):  # pragma: no cover - the drivers always answer a Path here
            raise LipSyncClientError("download did not produce a file")
        return result

    def credentials(self, job_id: str) -> Op:
        response = yield from self._call(Call("GET", self._job_path("jobs", job_id) + "/credentials", idempotent=True))
        return _json(response)

    def cleanup(self, job_id: str) -> Op:
        response = yield from self._call(Call("DELETE", self._job_path("cleanup", job_id)))
        return parse(response, CleanupResult)

    def cancel(self, job_id: str) -> Op:
        response = yield from self._call(Call("POST", self._job_path("cancel", job_id)))
        return parse(response, Job)

    def jobs(self, limit: int = 100) -> Op:
        response = yield from self._call(Call("GET", "/jobs", params={"limit": int(limit)}, idempotent=True))
        return parse(response, JobList)

    def create_avatar(self, video: Optional[FileInput], params: Mapping[str, Any], wait: bool = False,
                      progress: Optional[ProgressCallback] = None, timeout: Optional[float] = None,
                      idempotency_key: Optional[str] = None) -> Op:
        if video is None and params.get("video_url") is None:
            raise ValueError("video: give a file or video_url")
        files = {"video": video} if video is not None else {}
        response = yield from self._call(self._post("/avatars", files, params, idempotency_key))
        avatar = parse(response, Avatar)
        if wait:
            avatar = yield from self.wait_avatar(avatar.avatar_id, progress=progress, timeout=timeout)
        return avatar

    def avatar(self, avatar_id: str) -> Op:
        response = yield from self._call(Call("GET", self._job_path("avatars", avatar_id), idempotent=True))
        return parse(response, Avatar)

    def wait_avatar(self, avatar_id: str, progress: Optional[ProgressCallback] = None,
                    timeout: Optional[float] = None, clock: Callable[[], float] = time.monotonic) -> Op:
        """Poll until the avatar is ready; AvatarFailed if its preparation failed, WaitTimeout."""
        return (yield from self._poll(lambda: self.avatar(avatar_id), AvatarFailed, progress, timeout, clock))

    def avatars(self, limit: int = 100) -> Op:
        response = yield from self._call(Call("GET", "/avatars", params={"limit": int(limit)}, idempotent=True))
        return parse(response, AvatarList)

    def delete_avatar(self, avatar_id: str) -> Op:
        response = yield from self._call(Call("DELETE", self._job_path("avatars", avatar_id)))
        return parse(response, AvatarDeleted)

    def usage(self, since: Optional[Union[str, date]] = None, until: Optional[Union[str, date]] = None) -> Op:
        params = {k: str(v) for k, v in (("since", since), ("until", until)) if v is not None}
        response = yield from self._call(Call("GET", "/usage", params=params or None, idempotent=True))
        return parse(response, Usage)


def _file_part(value: FileInput, stack: ExitStack) -> tuple[str, IO[bytes], str]:
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        handle: IO[bytes] = stack.enter_context(path.open("rb"))
        name = path.name
    else:
        handle = value
        name = Path(getattr(value, "name", "upload") or "upload").name
    mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return name, handle, mime


class ClientBase:
    """What both clients share around the core: construction and the URLs they talk to."""

    _http_class: type = httpx.Client  # httpx.AsyncClient in the async twin

    def __init__(self, base_url: Optional[str] = None, token: Optional[str] = None,
                 timeout: Union[float, httpx.Timeout, None] = DEFAULT_TIMEOUT, *, retries: int = 2,
                 api_prefix: str = API_PREFIX, headers: Optional[dict[str, str]] = None,
                 **httpx_options: Any) -> None:
        self._core = ClientCore(base_url, token, api_prefix=api_prefix, retries=retries)
        self._http = self._http_class(**self._core.client_options(timeout, headers), **httpx_options)

    @property
    def base_url(self) -> str:
        return self._core.base_url

    @property
    def api_url(self) -> str:
        return self._core.root
