"""URL inputs from hostile origins (issue 24 item 2): a fetch ends by its deadline, or within a
fraction of a second of its job's cancel, however the origin trickles its bytes.

httpx's timeouts are per read, so an origin that sends one byte every quarter second never trips
them. Each test builds its own origin on 127.0.0.1 from a raw socket (it accepts, reads the
request, then sends its answer a byte at a time, for a bounded time), and sets the per-read
timeout well above the byte interval, so that only the total bound or the cancel can end the fetch.
"""

from __future__ import annotations

import asyncio
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from lipsync_runner.config import ApiLimits, FetchSettings, OutboundSettings, RunnerSettings, ServiceSettings, Settings
from lipsync_runner.errors import InvalidInputError, JobCancelledError
from lipsync_runner.inputs import netguard
from lipsync_runner.inputs.fetch import fetch_input
from lipsync_runner.inputs.files import media_specs
from lipsync_runner.inputs.netguard import AddressPolicy, parse_allowlist

from .loopback_http import LoopbackServer, Reply

SPEC = media_specs(max_video_bytes=1 << 20, max_audio_bytes=1 << 20)["video"]
LOOPBACK = AddressPolicy(allowlist=parse_allowlist("127.0.0.1"))
HEADERS = b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nX-Padding: " + b"a" * 200  # never finished
SLACK_S = 1.5  # a loaded machine's allowance on top of each bound


class TrickleOrigin:
    """Accepts, reads the request, sends ``prefix`` at once and then ``trickle`` one byte per ``interval``.

    Bounded: the trickle is finite and stops when the client hangs up or the origin closes.
    ``hung_up`` is set when the client's side of a connection is seen closed.
    """

    def __init__(self, trickle: bytes, *, prefix: bytes = b"", interval: float = 0.25,
                 tls: ssl.SSLContext | None = None) -> None:
        self.prefix, self.trickle, self.interval, self.tls = prefix, trickle, interval, tls
        self.accepted = threading.Event()
        self.hung_up = threading.Event()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]

    def url(self, path: str = "/face.mp4") -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:  # timeout (poll the stop) or the listener closed
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _closed_by_client(conn: socket.socket) -> bool:
        if not select.select([conn], [], [], 0)[0]:  # nothing to read: still open (the client sends nothing more)
            return False
        try:
            return conn.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            self.accepted.set()
            conn.sendall(self.prefix)
            for i in range(len(self.trickle)):
                if self._stop.wait(self.interval) or (not self.tls and self._closed_by_client(conn)):
                    break
                conn.sendall(self.trickle[i:i + 1])
        except OSError:
            pass
        finally:
            self.hung_up.set()
            conn.close()

    def __enter__(self) -> "TrickleOrigin":
        self._threads[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()
        for thread in list(self._threads):
            thread.join(5)


def fetch(url: str, dest: Path, *, max_fetch_s: float = 30, should_cancel=None, **kw):
    settings = FetchSettings(**{"url_connect_timeout_s": 10, "url_read_timeout_s": 5, "url_max_fetch_s": max_fetch_s,
                                **kw})
    cancel = {} if should_cancel is None else {"should_cancel": should_cancel}
    return fetch_input(url, dest, SPEC, settings=settings, policy=LOOPBACK, **cancel)


def cancel_after(seconds: float):
    at = time.monotonic() + seconds
    return lambda: time.monotonic() >= at


def timed(call) -> tuple[BaseException, float]:
    start = time.monotonic()
    with pytest.raises((InvalidInputError, JobCancelledError)) as e:
        call()
    return e.value, time.monotonic() - start


# ------------------------------------------------------------------ one fetch


def test_an_origin_that_trickles_its_headers_fails_at_the_deadline(tmp_path):
    with TrickleOrigin(HEADERS) as origin:
        error, took = timed(lambda: fetch(origin.url(), tmp_path, max_fetch_s=1.5))
        assert isinstance(error, InvalidInputError) and not isinstance(error, JobCancelledError)
        assert error.message == "video_url: the download took longer than 1.5 s"
        assert 1.4 <= took < 1.5 + SLACK_S
        assert origin.hung_up.wait(2)  # the connection is gone, not just abandoned
    assert list(tmp_path.iterdir()) == []


def test_a_cancel_stops_a_fetch_whose_headers_trickle(tmp_path):
    with TrickleOrigin(HEADERS) as origin:
        error, took = timed(lambda: fetch(origin.url(), tmp_path, should_cancel=cancel_after(0.5)))
        assert isinstance(error, JobCancelledError) and took < 2
        assert origin.hung_up.wait(2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("length", [b"Content-Length: 100000\r\n", b"Connection: close\r\n"],
                         ids=["with-length", "to-end-of-connection"])
def test_an_origin_that_trickles_its_body_fails_at_the_deadline_and_keeps_no_part(length, tmp_path):
    """A byte every 2 s: under the read timeout, over the deadline. Without a length, a stopped body
    reads like one that ended: the file must still not be kept."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\n" + length + b"\r\n"
    with TrickleOrigin(b"\x00" * 30, prefix=head + b"\x00" * 10, interval=2) as origin:
        error, took = timed(lambda: fetch(origin.url(), tmp_path, max_fetch_s=1))
        assert error.message == "video_url: the download took longer than 1 s" and took < 1.8
    assert list(tmp_path.iterdir()) == []


def test_a_cancel_stops_a_fetch_whose_body_trickles(tmp_path):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nContent-Length: 100000\r\n\r\n"
    with TrickleOrigin(b"\x00" * 120, prefix=head) as origin:
        error, took = timed(lambda: fetch(origin.url(), tmp_path, should_cancel=cancel_after(0.5)))
        assert isinstance(error, JobCancelledError) and took < 2
    assert list(tmp_path.iterdir()) == []


def test_a_tls_origin_that_trickles_its_headers_is_stopped_too(tmp_path, monkeypatch):
    """TLS wraps (and detaches) the socket the connection layer registered: the stop must still reach it."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    monkeypatch.setattr(netguard, "_ssl_context", lambda: ssl.create_default_context(cafile=str(cert)))
    dest = tmp_path / "job"
    dest.mkdir()
    with TrickleOrigin(HEADERS, tls=server_tls) as origin:
        error, took = timed(lambda: fetch(origin.url(), dest, should_cancel=cancel_after(0.5)))
        assert isinstance(error, JobCancelledError) and took < 2
        assert origin.accepted.is_set()  # the handshake was done: the stop ended a read inside TLS
    assert list(dest.iterdir()) == []


def test_a_connect_that_hangs_is_bounded_by_the_deadline_not_the_connect_timeout(tmp_path):
    """A listener whose accept queue is full drops new connections' SYNs: connect() waits."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # bounded: enough to fill a backlog of 0 or 1
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.2)
        error, took = timed(lambda: fetch(f"http://127.0.0.1:{port}/face.mp4", tmp_path, max_fetch_s=1,
                                          url_connect_timeout_s=10))
        assert error.message == "video_url: the download took longer than 1 s" and took < 1 + SLACK_S
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


# ------------------------------------------------------------------ through the service


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def service(tmp_path):
    from lipsync_runner.api import create_rest_app
    from lipsync_runner.serving.core import ServiceCore
    from lipsync_runner.serving.runner import RunnerCore

    # no models, though admission is told they are ready: every job here ends while fetching its inputs
    runner = RunnerCore(RunnerSettings(device="cpu"), load=False)
    runner.state = "ready"
    core = ServiceCore(runner, Settings(
        service=ServiceSettings(data_dir=tmp_path / "data", job_workers=1, free_space_floor_mb=0, avatar_cache=False),
        runner=RunnerSettings(device="cpu"), outbound=OutboundSettings(url_allowlist="127.0.0.1"),
        fetch=FetchSettings(url_read_timeout_s=5, url_max_fetch_s=120)))
    core.start(None)
    rest = create_rest_app(None, None, ApiLimits())
    rest.state.operations, rest.state.health = core.operations, core.health
    yield rest
    core.stop()


async def status_when(c: httpx.AsyncClient, job_id: str, statuses: set[str], within_s: float) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        body = (await c.get(f"status/{job_id}")).json()
        if body["status"] in statuses or loop.time() > deadline:
            return body
        await asyncio.sleep(0.1)


@pytest.mark.anyio
@pytest.mark.parametrize("stop", ["cancel", "cleanup"])
async def test_cancelling_a_job_whose_origin_trickles_frees_the_only_worker(service, stop):
    """One worker, held by a fetch from an origin that trickles its headers: a cancel (or a cleanup)
    ends the job within seconds, and the next job gets the worker."""
    with TrickleOrigin(HEADERS * 4) as origin, LoopbackServer() as files:
        files.routes["/speech.wav"] = lambda req: Reply(200, {"Content-Type": "audio/wav"}, b"RIFF" + b"\x00" * 100)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=service), base_url="http://t/",
                                     timeout=30) as c:
            held = await c.post("generate", json={"video_url": origin.url(),
                                                                "audio_url": files.url("/speech.wav")})
            assert held.status_code == 202, held.text
            job_id = held.json()["job_id"]
            for _ in range(100):  # bounded: the worker reaches the origin within 10 s
                if origin.accepted.is_set():
                    break
                await asyncio.sleep(0.1)
            assert origin.accepted.is_set()
            start = time.monotonic()
            if stop == "cancel":
                assert (await c.post(f"cancel/{job_id}")).status_code == 200
                body = await status_when(c, job_id, {"cancelled", "failed", "completed"}, within_s=5)
                assert body["status"] == "cancelled", body
            else:
                assert (await c.delete(f"cleanup/{job_id}")).status_code == 200
            assert origin.hung_up.wait(5)
            nxt = await c.post("generate", json={"video_url": files.url("/missing.mp4"),
                                                               "audio_url": files.url("/speech.wav")})
            assert nxt.status_code == 202, nxt.text
            body = await status_when(c, nxt.json()["job_id"], {"cancelled", "failed", "completed"}, within_s=10)
            assert body["status"] == "failed" and "answered HTTP 404" in body["error"], body
            assert time.monotonic() - start < 6
