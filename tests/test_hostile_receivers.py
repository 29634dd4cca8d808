"""Webhook receivers that try to stall delivery for everyone (issue 24, item 3).

The hostile receiver is a raw socket server on 127.0.0.1 that reads the request, then sends its
response headers one byte a second: every read gets a byte well within httpx's per-read time-out,
so only an overall deadline ends the attempt. Each test also has a normal fast receiver, and runs
against both outbox stores (the fixtures of tests/test_webhooks.py).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import pytest

from lipsync_runner.inputs.netguard import AddressPolicy, parse_allowlist
from lipsync_runner.integration.webhooks import RetryPolicy, WebhookDispatcher, WebhookNotifier
from lipsync_runner.params import WebhookEvent
from tests import test_webhooks
from tests.loopback_http import LoopbackServer, Reply
from tests.test_webhooks import job, settings, wait_for

open_outbox, outbox = test_webhooks.open_outbox, test_webhooks.outbox  # the same stores, both of them

LOOPBACK = AddressPolicy(allowlist=parse_allowlist("127.0.0.1,localhost"))
NO_RETRY_SOON = RetryPolicy(first_delay_s=60, jitter=0)  # a failed attempt is not retried within a test


@dataclass
class Connection:
    accepted_at: float
    event_id: str = ""
    closed_at: float | None = None  # when the client hung up (or the server stopped)


def _hung_up(sock: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and not sock.recv(1, socket.MSG_PEEK)
    except (OSError, ValueError):
        return True  # closed here already


class TrickleReceiver:
    """Accepts, reads the request, then answers ``200 OK`` one byte per ``every_s`` (38 bytes: 38 s)."""

    ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self.connections: list[Connection] = []
        self.open = self.max_open = 0
        self._socks: list[tuple[Connection, socket.socket]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port = self._server.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            record = Connection(time.monotonic())
            with self._lock:
                # counted by the client's side: a connection it has hung up on is not open, even if
                # its thread here has not noticed yet
                live = sum(1 for c, s in self._socks if c.closed_at is None and not _hung_up(s))
                self.max_open = max(self.max_open, live + 1)
                self.connections.append(record)
                self._socks.append((record, conn))
                self.open += 1
            thread = threading.Thread(target=self._trickle, args=(conn, record), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _trickle(self, conn: socket.socket, record: Connection) -> None:
        with conn:
            try:
                conn.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        raise ConnectionResetError
                    head += chunk
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.decode().partition(":") for line in head.split(b"\r\n\r\n")[0].split(b"\r\n")[1:])}
                record.event_id = headers.get("lipsync-event-id", "")
                body = len(head.split(b"\r\n\r\n", 1)[1])
                while body < int(headers.get("content-length", 0)):
                    body += len(conn.recv(4096))
                for byte in self.ANSWER:
                    conn.sendall(bytes([byte]))
                    # wait the byte's second, noticing at once when the client hangs up
                    readable, _, _ = select.select([conn], [], [], self.every_s)
                    if self._stop.is_set() or (readable and not conn.recv(4096)):
                        break
            except OSError:
                pass  # the client shut the connection mid-send
            finally:
                with self._lock:
                    record.closed_at = time.monotonic()
                    self.open -= 1

    def __enter__(self) -> "TrickleReceiver":
        self._threads[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.close()
        for thread in list(self._threads):
            thread.join(5)


@pytest.fixture
def trickle() -> Iterator[TrickleReceiver]:
    with TrickleReceiver() as srv:
        yield srv


@pytest.fixture
def fast() -> Iterator[LoopbackServer]:
    with LoopbackServer() as srv:
        srv.routes["/hook"] = lambda req: Reply(204)
        yield srv


@contextmanager
def dispatching(outbox, slow: TrickleReceiver, **kw) -> Iterator[tuple[WebhookDispatcher, WebhookNotifier]]:
    """A running dispatcher; on the way out the trickling receiver hangs up first, so that a
    dispatcher without deadlines (the code before the fix) is not kept waiting for 38 s."""
    dispatcher = WebhookDispatcher(outbox, settings(**kw), policy=LOOPBACK, retry=NO_RETRY_SOON, poll_s=0.05)
    try:
        yield dispatcher.start(), WebhookNotifier(outbox, wake=dispatcher.wake)
    finally:
        slow.__exit__()
        dispatcher.stop()


def delivered(outbox, rec) -> bool:
    return outbox.for_job(rec.job_id)[0].state == "delivered"


def test_a_trickling_receiver_does_not_hold_up_another_tenants_delivery(outbox, trickle, fast):
    with dispatching(outbox, trickle, timeout=8.0) as (_, notifier):
        a = job(trickle.url(), owner="tenant-a")
        notifier.job_event(a, WebhookEvent.completed)
        wait_for(lambda: trickle.connections, timeout=10)  # A's attempt is under way, and hangs
        started = time.monotonic()
        b = job(fast.url("/hook"), owner="tenant-b")
        notifier.job_event(b, WebhookEvent.completed)
        wait_for(lambda: delivered(outbox, b), timeout=6)
        assert time.monotonic() - started < 2.0
        # ... while A's attempt is still hanging: open, unrecorded
        assert trickle.open == 1 and outbox.for_job(a.job_id)[0].attempts == 0


def test_a_trickling_attempt_ends_at_its_deadline_and_is_retried(outbox, trickle):
    deadline_s = 2.0
    with dispatching(outbox, trickle, timeout=deadline_s) as (_, notifier):
        rec = job(trickle.url(), owner="tenant-a")
        notifier.job_event(rec, WebhookEvent.completed)
        row = wait_for(lambda: next((r for r in outbox.for_job(rec.job_id) if r.attempts), None),
                       timeout=deadline_s + 4)
        recorded = time.monotonic()
        (conn,) = trickle.connections
        assert deadline_s - 0.2 <= recorded - conn.accepted_at <= deadline_s + 1.5
        wait_for(lambda: conn.closed_at, timeout=2)  # the dispatcher hung up: its socket was closed
        assert conn.closed_at - conn.accepted_at <= deadline_s + 1.5
    assert (row.state, row.last_status, row.last_error) == ("pending", None, "no answer within 2 s")
    # scheduled for the retry the policy chose (60 s, no jitter), on the store's clock
    assert timedelta(seconds=58) < row.next_attempt_at - row.last_attempt_at < timedelta(seconds=62)


def flood_then_another_tenant(outbox, trickle, fast, *, rows: int, **settings_kw) -> float:
    """``rows`` deliveries of tenant A to the trickling host, then one of tenant B to the fast one:
    the seconds B's took to go out, once A's first attempts hang."""
    with dispatching(outbox, trickle, timeout=8.0, webhook_concurrency=4, **settings_kw) as (_, notifier):
        for _ in range(rows):
            notifier.job_event(job(trickle.url(), owner="tenant-a"), WebhookEvent.completed)
        wait_for(lambda: len(trickle.connections) >= 2, timeout=10)
        time.sleep(0.3)  # time enough to open more, were they allowed
        started = time.monotonic()
        other = job(fast.url("/hook", host="localhost"), owner="tenant-b")
        notifier.job_event(other, WebhookEvent.completed)
        wait_for(lambda: delivered(outbox, other), timeout=10)
        return time.monotonic() - started


def test_a_slow_host_gets_at_most_its_share_of_the_slots(outbox, trickle, fast):
    """Eight deliveries to one trickling host, four slots, two per host: the slow host has two
    attempts in flight, and a delivery to another host goes out at once."""
    assert flood_then_another_tenant(outbox, trickle, fast, rows=8, webhook_per_host=2) < 2.0
    assert trickle.max_open == 2


def test_deliveries_waiting_for_their_host_are_attempted_once_each(outbox, trickle):
    """Six rows for one host, two at a time: each waits its turn in the dispatcher (claimed once,
    never claimed again meanwhile) and gets exactly one attempt, cut at the deadline."""
    deadline_s = 1.0
    with dispatching(outbox, trickle, timeout=deadline_s, webhook_concurrency=4, webhook_per_host=2) as (_, notifier):
        recs = [job(trickle.url(), owner="tenant-a") for _ in range(6)]
        for rec in recs:
            notifier.job_event(rec, WebhookEvent.completed)
        def all_attempted():
            rows = [outbox.for_job(rec.job_id)[0] for rec in recs]
            return all(r.attempts for r in rows) and rows
        rows = wait_for(all_attempted, timeout=3 * deadline_s + 8)
        time.sleep(0.3)
    ids = [c.event_id for c in trickle.connections]
    assert sorted(ids) == sorted(r.delivery_id for r in rows)  # one connection per row, none twice
    assert [r.attempts for r in rows] == [1] * 6 and {r.state for r in rows} == {"pending"}
    assert trickle.max_open == 2


def test_one_hosts_long_backlog_does_not_delay_another_tenants_delivery(outbox, trickle, fast):
    """1,100 rows for one trickling host (more than the dispatcher would ever hold back): the rows it
    cannot start are let go, not held, so claiming goes on and another tenant's delivery goes out."""
    assert flood_then_another_tenant(outbox, trickle, fast, rows=1100, webhook_per_host=2) < 2.0
    assert trickle.max_open == 2


def test_one_tenant_gets_at_most_half_the_slots_whatever_its_host_names(outbox, trickle, fast):
    """A tenant's receivers can have any number of host names (wildcard DNS): its attempts are bounded
    per owner too, so another tenant still gets a slot at once."""
    assert flood_then_another_tenant(outbox, trickle, fast, rows=8, webhook_per_host=4) < 2.0
    assert trickle.max_open == 2  # half of the four slots


def test_stop_is_prompt_while_attempts_hang(outbox, trickle):
    with dispatching(outbox, trickle, timeout=8.0) as (dispatcher, notifier):
        recs = [job(trickle.url(), owner="tenant-a") for _ in range(2)]
        for rec in recs:
            notifier.job_event(rec, WebhookEvent.completed)
        wait_for(lambda: trickle.open == 2, timeout=6)
        started = time.monotonic()
        dispatcher.stop()
        assert time.monotonic() - started < 2.0  # not the 8 s deadline
        # the cut attempts are recorded, to be retried by whoever runs next
        for rec in recs:
            (row,) = outbox.for_job(rec.job_id)
            assert (row.attempts, row.state) == (1, "pending") and "stopped" in row.last_error
