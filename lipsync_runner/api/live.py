"""``WS /api/lip-sync/live?avatar_id=<id>``: a real-time session on a prepared avatar.

Protocol (docs/api.md, "Live sessions"):

* client -> server: binary messages of 16 kHz mono PCM s16le (any size), as the speech is produced;
  a text message ``{"type": "end"}`` ends the input.
* server -> client: ``{"type": "ready", "fps", "width", "height", "mime", ...}``, then binary
  messages: the fragmented-MP4 init segment, then media fragments (video and the received audio),
  for Media Source Extensions, paced at the avatar's frame rate; ``{"type": "dropped", "frames": n}``
  when a slow reader lost frames; after the input ends and the last frame is out, ``{"type": "end",
  "frames": N, ...}`` and a normal close (1000).
* close codes: 4400 bad request or message, 4401 no valid token (api/auth.py), 4404 no such avatar
  (or another owner's), 4409 avatar not ready, 4429 too many sessions, 4408 idle timeout, 4503 models
  not loaded, 4507 not enough disk for the session's frames (as a job's 507), 1011 server error.

Auth: ``Authorization: Bearer <token>``, or, from a browser (which cannot set headers on a
WebSocket), the subprotocols ``["lipsync.live", "bearer.<token>"]``; the server answers with
``lipsync.live``. Never in the URL (URLs end up in logs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from starlette.websockets import WebSocket

from lipsync_runner.api.auth import request_client, request_owner
from lipsync_runner.config import LiveSettings
from lipsync_runner.integration import metrics
from lipsync_runner.errors import (AvatarNotFoundError, AvatarNotReadyError, InsufficientStorageError,
                                   JobCancelledError, LipSyncError, ModelsNotReadyError)
from lipsync_runner.models.musetalk import LipSyncModel
from lipsync_runner.pipeline.live import LiveSession, LiveSource, ready_message

log = logging.getLogger(__name__)

SUBPROTOCOL = "lipsync.live"
BEARER_PREFIX = "bearer."
CLOSE_NORMAL, CLOSE_ERROR = 1000, 1011
CLOSE_BAD, CLOSE_NOT_FOUND, CLOSE_NOT_READY = 4400, 4404, 4409
CLOSE_IDLE, CLOSE_BUSY, CLOSE_NO_MODELS, CLOSE_NO_SPACE = 4408, 4429, 4503, 4507
MAX_TEXT_BYTES = 4096


class LiveGateway(Protocol):
    """What the endpoint needs of the service (serving/live.py builds it)."""

    settings: LiveSettings

    def open(self, avatar_id: str, owner: str | None,
             session_id: str) -> AbstractContextManager[tuple[LiveSource, LipSyncModel]]: ...


class SessionSlots:
    """Sessions per client and in all, on one event loop (no lock needed)."""

    def __init__(self) -> None:
        self.by_client: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_client.values())

    def refusal(self, client: str, settings: LiveSettings) -> str | None:
        if self.by_client[client] >= settings.sessions_per_client:
            return f"too many live sessions from this client (at most {settings.sessions_per_client})"
        if self.total >= settings.max_sessions:
            return "the server holds as many live sessions as it can; try again later"
        return None

    def take(self, client: str) -> None:
        self.by_client[client] += 1

    def release(self, client: str) -> None:
        self.by_client[client] -= 1
        if self.by_client[client] <= 0:
            del self.by_client[client]


def chosen_subprotocol(websocket: WebSocket) -> str | None:
    """Browsers that offered subprotocols need one back: ours if offered, else the one they sent."""
    offered = websocket.scope.get("subprotocols") or []
    if SUBPROTOCOL in offered:
        return SUBPROTOCOL
    return offered[0] if offered else None


class _Outbox:
    """Messages waiting for the client, and their bytes (the engine's drop signal)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self._bytes = 0
        self.peak = 0
        self._lock = threading.Lock()

    def put(self, message: dict[str, Any]) -> None:
        """From any thread."""
        size = len(message.get("bytes") or b"")
        with self._lock:
            self._bytes += size
            self.peak = max(self.peak, self._bytes)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, message)

    def sent(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._bytes -= len(message.get("bytes") or b"")

    def backlog(self) -> int:
        with self._lock:
            return self._bytes


async def live_session(websocket: WebSocket, gateway: LiveGateway, slots: SessionSlots) -> None:
    settings = gateway.settings
    avatar_id = websocket.query_params.get("avatar_id") or ""
    client = request_client(websocket.scope)
    owner = request_owner(websocket.scope)
    await websocket.accept(subprotocol=chosen_subprotocol(websocket))
    if not avatar_id:
        await _close(websocket, CLOSE_BAD, "avatar_id is required (?avatar_id=<id>)")
        return
    refusal = slots.refusal(client, settings)
    if refusal is not None:
        await _close(websocket, CLOSE_BUSY, refusal)
        return
    slots.take(client)
    try:
        await _serve(websocket, gateway, settings, avatar_id, owner)
    finally:
        slots.release(client)


async def _serve(websocket: WebSocket, gateway: LiveGateway, settings: LiveSettings, avatar_id: str,
                 owner: str | None) -> None:
    loop = asyncio.get_running_loop()
    outbox = _Outbox(loop)
    session_id = uuid.uuid4().hex
    holder: dict[str, LiveSession] = {}
    opened = threading.Event()
    closing = threading.Event()  # the client left or timed out: the engine stops

    def on_segment(kind: str, data: bytes) -> None:
        outbox.put({"type": "websocket.send", "bytes": data})

    def on_event(event: dict) -> None:
        outbox.put({"type": "websocket.send", "text": json.dumps(event)})

    def work() -> tuple[int, str, dict | None]:
        """The session, on its own thread: (close code, reason, the end message)."""
        try:
            with gateway.open(avatar_id, owner, session_id) as (source, model):
                session = LiveSession(model, source, settings, on_segment=on_segment, on_event=on_event,
                                      backlog=outbox.backlog)
                holder["session"] = session
                opened.set()
                if closing.is_set():
                    return CLOSE_NORMAL, "", None
                on_event(ready_message(source))
                stats = session.run()
            end = {"type": "end", "frames": stats.frames, "speech_frames": stats.speech_frames,
                   "silent_frames": stats.silent_frames, "idle_frames": stats.idle_frames, "dropped": stats.dropped,
                   "latency_ms": stats.latency_ms(),
                   "send_buffer_peak": outbox.peak}
            return CLOSE_NORMAL, "", end
        except JobCancelledError:
            return CLOSE_NORMAL, "", None
        except AvatarNotFoundError:
            return CLOSE_NOT_FOUND, "avatar not found", None
        except AvatarNotReadyError as exc:
            return CLOSE_NOT_READY, str(exc), None
        except ModelsNotReadyError as exc:
            return CLOSE_NO_MODELS, str(exc), None
        except InsufficientStorageError as exc:
            return CLOSE_NO_SPACE, str(exc), None
        except LipSyncError as exc:
            log.warning("live session %s failed: %s", session_id, exc)
            return CLOSE_ERROR, str(exc), None
        except Exception:
            log.exception("live session %s failed", session_id)
            return CLOSE_ERROR, "internal error", None
        finally:
            opened.set()

    engine_task: asyncio.Future = loop.create_future()

    def engine() -> None:  # a thread of its own: a session lasts minutes, the loop's default pool is shared
        result = work()
        loop.call_soon_threadsafe(lambda: engine_task.done() or engine_task.set_result(result))

    threading.Thread(target=engine, name=f"live-{session_id[:8]}", daemon=True).start()
    sender = asyncio.create_task(_send(websocket, outbox))
    receiver = asyncio.create_task(_receive(websocket, settings, holder, opened))
    reason_code: tuple[int, str] | None = None
    try:
        done, _ = await asyncio.wait({engine_task, receiver}, timeout=settings.max_session_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:  # the longest session: its input ends now, what was received is flushed
            _session_call(holder, "finish")
            await asyncio.wait({engine_task, receiver}, return_when=asyncio.FIRST_COMPLETED)
        if receiver.done() and not engine_task.done():
            reason_code = receiver.result()
            if reason_code is not None:  # the client left, sent something invalid or went idle
                closing.set()
                while not opened.is_set():
                    await asyncio.sleep(0.01)
                _session_call(holder, "cancel")
        code, reason, end = await engine_task
        if reason_code is not None:
            code, reason = reason_code
        session = holder.get("session")
        if session is not None:
            stats = session.stats
            metrics.live_session_ended(code, {"speech": stats.speech_frames, "silent": stats.silent_frames,
                                              "idle": stats.idle_frames, "dropped": stats.dropped})
        if end is not None:
            outbox.put({"type": "websocket.send", "text": json.dumps(end)})
        outbox.put({"type": "close", "code": code, "reason": reason[:120]})
        await sender
    finally:
        receiver.cancel()
        if not sender.done():
            sender.cancel()
        _session_call(holder, "cancel")


def _session_call(holder: dict[str, LiveSession], name: str) -> None:
    session = holder.get("session")
    if session is not None:
        getattr(session, name)()


async def _send(websocket: WebSocket, outbox: _Outbox) -> None:
    while True:
        message = await outbox.queue.get()
        try:
            if message["type"] == "close":
                await _close(websocket, message["code"], message["reason"])
                return
            await websocket.send(message)
        except Exception:  # noqa: BLE001 - the client is gone: the receiver notices and stops the session
            return
        finally:
            outbox.sent(message)


async def _receive(websocket: WebSocket, settings: LiveSettings, holder: dict[str, LiveSession],
                   opened: threading.Event) -> tuple[int, str] | None:
    """Feeds the session until the client ends its input (None) or must be closed ((code, reason))."""
    ended = False
    while True:
        session = holder.get("session")
        # back-pressure on a client that sends faster than real time: stop reading the socket
        while session is not None and not ended and session.buffered_s > settings.max_buffered_audio_s:
            await asyncio.sleep(0.05)
        try:
            message = await asyncio.wait_for(websocket.receive(), None if ended else settings.idle_timeout_s)
        except asyncio.TimeoutError:
            return CLOSE_IDLE, f"no message for {settings.idle_timeout_s:g} s"
        if message["type"] == "websocket.disconnect":
            return CLOSE_NORMAL, "client disconnected"
        if ended:
            continue
        data, text = message.get("bytes"), message.get("text")
        if data is not None:
            while holder.get("session") is None and not opened.is_set():
                await asyncio.sleep(0.01)  # speech sent before "ready" waits for the session
            if holder.get("session") is not None:
                holder["session"].feed(data)
            continue
        problem = _end_message(text)
        if problem is not None:
            return CLOSE_BAD, problem
        ended = True
        while holder.get("session") is None and not opened.is_set():
            await asyncio.sleep(0.01)
        _session_call(holder, "finish")


def _end_message(text: str | None) -> str | None:
    """None for ``{"type": "end"}``, else why the text message is refused."""
    if text is None or len(text) > MAX_TEXT_BYTES:
        return "text messages are JSON objects of at most 4 KB"
    try:
        body = json.loads(text)
    except ValueError:
        return "text messages must be JSON"
    if not isinstance(body, dict) or body.get("type") != "end":
        return 'the only text message is {"type": "end"}; speech goes in binary messages'
    return None


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    try:
        await websocket.close(code=code, reason=reason[:120])
    except Exception:  # noqa: BLE001 - already closed
        pass


def add_live_route(app, gateway: Callable[[], LiveGateway | None]) -> None:
    """``WS /live`` on the REST app; ``gateway()`` is resolved per session (the running service's)."""
    slots = SessionSlots()

    @app.websocket("/live")
    async def live(websocket: WebSocket) -> None:
        target = gateway()
        if target is None:
            await websocket.accept(subprotocol=chosen_subprotocol(websocket))
            await _close(websocket, CLOSE_ERROR, "live sessions are not available on this server")
            return
        await live_session(websocket, target, slots)

    app.state.live_slots = slots

