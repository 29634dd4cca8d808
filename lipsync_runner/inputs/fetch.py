"""`video_url` / `audio_url`: a job's input fetched into its directory, with the limits of an upload.

The worker calls :func:`fetch_input` before the pipeline runs (never the request handler: a
slow origin must not hold a connection open). What the fetch guarantees:

* **Reachability:** only http and https, through :mod:`lipsync_runner.inputs.netguard` (no loopback,
  private, link-local, CGNAT, multicast, metadata addresses, checked after DNS and on every
  redirect, connected to the vetted address), unless the host is allow-listed.
* **Size:** the real bytes are counted as they arrive and the fetch stops with 413 one chunk
  past the upload limit; a Content-Length over the limit fails before the body is read, a
  smaller one is not trusted. No decoding: ``Accept-Encoding: identity`` and raw bytes, so a
  compressed body cannot expand past the limit on our side.
* **Time:** connect and read timeouts, a redirect limit, and a bound on the whole fetch
  (``url_max_fetch_s``: DNS, connect, headers and body together). httpx's timeouts are per
  read, so an origin that trickles its headers or body would never trip them: a watchdog thread
  stops the fetch at its deadline, or as soon as the job is cancelled (``should_cancel``), by
  shutting its sockets down (:class:`~lipsync_runner.inputs.netguard.SocketWatch`), which ends
  a blocked read at once. Only DNS and a connect in progress are not broken off: each is bounded
  by ``url_connect_timeout_s``, and no connect waits past the deadline.
* **Files:** written under a temporary name and renamed when complete; a failed fetch leaves
  nothing behind. Like an upload, the file is recognised by its content afterwards; the URL's
  extension or the Content-Type only gives the stored name a hint for ffmpeg.

``s3://`` URLs are read through an ``s3_reader`` (the storage layer's streaming GET) with the
same counting; without object storage configured they are refused with a clear message.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from lipsync_runner import __version__
from lipsync_runner.inputs.files import human_size
from lipsync_runner.inputs.files import FileFieldSpec, sanitize_filename
from lipsync_runner.errors import InputTooLargeError, InvalidInputError, JobCancelledError
from lipsync_runner.inputs.netguard import (
    AddressPolicy,
    SocketWatch,
    URLRefusedError,
    default_policy,
    guarded_client,
    redact_url,
)
from lipsync_runner.config import FetchSettings

# What a server's Content-Type suggests, when the URL's path has no known extension (a hint only).
CONTENT_TYPE_EXTENSIONS = {
    "video/mp4": ".mp4", "video/quicktime": ".mov", "video/x-matroska": ".mkv", "video/webm": ".webm",
    "video/x-msvideo": ".avi", "video/avi": ".avi",
    "audio/mpeg": ".mp3", "audio/mp3": ".mp3", "audio/wav": ".wav", "audio/x-wav": ".wav", "audio/wave": ".wav",
    "audio/vnd.wave": ".wav", "audio/mp4": ".m4a", "audio/x-m4a": ".m4a", "audio/aac": ".aac", "audio/ogg": ".ogg",
}

S3Reader = Callable[[str], Iterable[bytes]]
"""``s3://bucket/key`` -> its bytes in chunks (the storage layer's streamed GET)."""

CANCEL_POLL_S = 0.25  # how often a fetch asks whether its job was cancelled (an Event in the worker: cheap)


@dataclass(frozen=True)
class FetchedInput:
    file_name: str  # the file's name inside the job's directory (input_video.mp4)
    display_name: str  # the URL's last path segment, sanitised: for display only
    size: int
    sha256: str
    content_type: str | None
    source: str  # the URL without query or credentials (redact_url)


def _extension(paths: Iterable[str], content_type: str | None, spec: FileFieldSpec) -> str:
    """A hint for ffmpeg, as for uploads: the URL's extension, else the Content-Type's, else none.

    Never a refusal: the file is recognised by its content afterwards (a bucket key without an
    extension, or a server that says application/octet-stream, is fine).
    """
    for path in paths:
        ext = posixpath.splitext(unquote(path))[1].lower()
        if ext in spec.hint_extensions:
            return ext
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    ext = CONTENT_TYPE_EXTENSIONS.get(mime, "")
    return ext if ext in spec.hint_extensions else ""


class _Sink:
    """Counts, hashes and writes the bytes to a temporary file; rename on success, delete otherwise.

    ``check`` raises once the fetch was stopped (cancel, deadline): called on every chunk, and
    before the rename, since a stopped body without a length reads as one that simply ended.
    """

    def __init__(self, dest_dir: Path, spec: FileFieldSpec, check: Callable[[], None]) -> None:
        self.spec, self.check = spec, check
        self.tmp = dest_dir / f".{spec.stem}.part"
        self.size = 0
        self.digest = hashlib.sha256()
        self.handle = open(self.tmp, "wb")

    def too_large(self) -> InputTooLargeError:
        return InputTooLargeError(f"{self.spec.field}_url: the {self.spec.kind} is larger than the limit of "
                                  f"{human_size(self.spec.max_bytes)}")

    def write(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            self.size += len(chunk)
            if self.size > self.spec.max_bytes:
                raise self.too_large()
            self.check()
            self.handle.write(chunk)
            self.digest.update(chunk)

    def commit(self, final: Path) -> None:
        self.check()
        self.handle.close()
        if self.size == 0:
            raise InvalidInputError(f"{self.spec.field}_url: the server sent an empty file")
        os.replace(self.tmp, final)

    def discard(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def _http_error(exc: httpx.HTTPError, what: str, settings: FetchSettings) -> InvalidInputError:
    if isinstance(exc, httpx.TooManyRedirects):
        return InvalidInputError(f"{what}: more than {settings.url_max_redirects} redirects")
    if isinstance(exc, httpx.ConnectTimeout):
        return InvalidInputError(f"{what}: timed out connecting ({settings.url_connect_timeout_s:g} s)")
    if isinstance(exc, httpx.ReadTimeout):
        return InvalidInputError(f"{what}: the server sent nothing for {settings.url_read_timeout_s:g} s")
    if isinstance(exc, httpx.UnsupportedProtocol):
        return InvalidInputError(f"{what}: redirected to a URL that is not http or https")
    if isinstance(exc, httpx.RemoteProtocolError):
        return InvalidInputError(f"{what}: the server broke off the transfer (the file arrived incomplete)")
    if isinstance(exc, httpx.ConnectError):
        return InvalidInputError(f"{what}: could not connect to the server")
    return InvalidInputError(f"{what}: the download failed ({type(exc).__name__})")


@contextmanager
def _watchdog(watch: SocketWatch, should_cancel: Callable[[], bool], late: Exception) -> Iterator[None]:
    """Stops ``watch`` when the job is cancelled or the deadline passes, from a thread of its own:
    the fetching thread may be blocked in a read that only a socket shutdown ends."""
    done = threading.Event()

    def run() -> None:
        while not should_cancel():
            left = watch.deadline - time.monotonic()
            if left <= 0:
                watch.stop(late)
                return
            if done.wait(min(CANCEL_POLL_S, left)):
                return
        watch.stop(JobCancelledError("cancelled"))

    thread = threading.Thread(target=run, name="fetch-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def fetch_input(url: str, dest_dir: Path, spec: FileFieldSpec, *, settings: FetchSettings | None = None,
                policy: AddressPolicy | None = None, s3_reader: S3Reader | None = None,
                should_cancel: Callable[[], bool] = lambda: False) -> FetchedInput:
    """Download ``url`` into ``dest_dir`` as ``<spec.stem><ext>``; InvalidInputError (400) or InputTooLargeError (413).

    ``policy`` defaults to the deployment's (allow-list from ``LIP_SYNC_URL_ALLOWLIST``, the
    system resolver); tests pass one with their own resolver. Past ``url_max_fetch_s`` the fetch
    fails (InvalidInputError); once ``should_cancel()`` says True it stops (JobCancelledError).
    """
    settings = settings or FetchSettings()
    policy = policy or default_policy(resolve_timeout_s=settings.url_connect_timeout_s)
    what = f"{spec.field}_url"
    watch = SocketWatch(deadline=time.monotonic() + settings.url_max_fetch_s)
    late = InvalidInputError(f"{what}: the download took longer than {settings.url_max_fetch_s:g} s")
    with _watchdog(watch, should_cancel, late):
        try:
            if isinstance(url, str) and urlsplit(url).scheme.lower() == "s3":
                return _fetch_s3(url, dest_dir, spec, s3_reader, watch)
            return _fetch_http(url, dest_dir, spec, settings, policy, watch)
        except BaseException:
            if time.monotonic() >= watch.deadline:  # e.g. a connect given only the time left, as the watchdog wakes
                watch.stop(late)
            if watch.error is not None:  # whatever the stop broke, the reason is the stop
                raise watch.error from None
            raise
        finally:
            watch.close()


def _fetch_s3(url: str, dest_dir: Path, spec: FileFieldSpec, s3_reader: S3Reader | None,
              watch: SocketWatch) -> FetchedInput:
    if s3_reader is None:
        raise URLRefusedError(f"{spec.field}_url: s3:// URLs need object storage to be configured on the server")
    parts = urlsplit(url)
    ext = _extension([parts.path], None, spec)
    sink = _Sink(dest_dir, spec, watch.check)
    try:
        chunks = s3_reader(url)
        try:
            sink.write(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
        sink.commit(dest_dir / f"{spec.stem}{ext}")
    except BaseException:
        sink.discard()
        raise
    return FetchedInput(f"{spec.stem}{ext}", sanitize_filename(posixpath.basename(parts.path), f"{spec.field}_url"),
                        sink.size, sink.digest.hexdigest(), None, f"s3://{parts.netloc}{parts.path}")


def _fetch_http(url: str, dest_dir: Path, spec: FileFieldSpec, settings: FetchSettings, policy: AddressPolicy,
                watch: SocketWatch) -> FetchedInput:
    what = f"{spec.field}_url"
    parsed = policy.check_url(url, what)
    timeout = httpx.Timeout(connect=settings.url_connect_timeout_s, read=settings.url_read_timeout_s,
                            write=settings.url_read_timeout_s, pool=settings.url_connect_timeout_s)
    headers = {"User-Agent": f"lipsync-runner/{__version__} (input fetch)", "Accept-Encoding": "identity"}
    sink: _Sink | None = None
    try:
        with guarded_client(policy, timeout=timeout, follow_redirects=True, max_redirects=settings.url_max_redirects,
                            headers=headers, watch=watch) as client:
            with client.stream("GET", parsed) as response:
                if response.status_code != 200:
                    raise InvalidInputError(f"{what}: the server answered HTTP {response.status_code}")
                declared = response.headers.get("content-length", "")
                content_type = response.headers.get("content-type")
                ext = _extension([parsed.path, response.url.path], content_type, spec)
                sink = _Sink(dest_dir, spec, watch.check)
                if declared.isdigit() and int(declared) > spec.max_bytes:
                    raise sink.too_large()
                sink.write(response.iter_raw())  # as the bytes arrive (a chunk size would buffer up to it)
                sink.commit(dest_dir / f"{spec.stem}{ext}")
    except httpx.HTTPError as e:
        if sink is not None:
            sink.discard()
        raise _http_error(e, what, settings) from None
    except BaseException:
        if sink is not None:
            sink.discard()
        raise
    name = posixpath.basename(unquote(response.url.path))
    return FetchedInput(f"{spec.stem}{ext}", sanitize_filename(name, what), sink.size,
                        sink.digest.hexdigest(), content_type, redact_url(str(response.url)))
