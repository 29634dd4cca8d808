"""Live sessions (``WS /api/lip-sync/live``): send speech as it is produced, receive the talking avatar.

    with LipSyncClient(url, token) as c, c.live(avatar_id) as session:
        print(session.ready)                  # {"type": "ready", "fps": 25.0, "width": ..., "mime": ...}
        session.send(pcm_chunk)               # 16 kHz mono s16le bytes, any size, as often as you like
        session.end()                         # no more speech: the server flushes and ends
        for message in session:               # bytes: the fMP4 init segment, then media fragments;
            ...                               # dict: events ({"type": "dropped"|"end", ...})

``session.save(path)`` writes what comes back as an MP4 (init segment + fragments play as a file).
The async twin (``AsyncLipSyncClient.live``) has the same methods, awaited. A session the server
closes with a code other than 1000 raises :class:`~lipsync_client.errors.LiveSessionClosed`
(``.code``: 4401 token, 4404 avatar, 4409 avatar not ready, 4429 too many sessions, 4408 idle, ...).
"""

from __future__ import annotations

import json
import threading
import time
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlencode

import httpx_ws
from wsproto.events import BytesMessage, TextMessage

from .errors import BadRequest, LiveSessionClosed

SAMPLE_RATE = 16_000
SUBPROTOCOL = "lipsync.live"
MAX_MESSAGE_BYTES = 64 * 2**20  # a keyframe's fragment of a large avatar is well over httpx-ws's 64 KB default
Message = Union[bytes, dict]


def live_url(api_root: str, avatar_id: str) -> str:
    root = api_root.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    return f"{root}/live?{urlencode({'avatar_id': avatar_id})}"


def _message(event: Any) -> Optional[Message]:
    if isinstance(event, BytesMessage):
        return bytes(event.data)
    if isinstance(event, TextMessage):
        return json.loads(event.data)
    return None


def _closed(exc: httpx_ws.WebSocketDisconnect) -> Optional[LiveSessionClosed]:
    """None for a normal close, else the error that says why."""
    if exc.code in (1000, None):
        return None
    return LiveSessionClosed(exc.reason or f"the session was closed ({exc.code})", exc.code)


class LiveSession:
    """A session opened by ``LipSyncClient.live``; sending and receiving may happen on two threads."""

    def __init__(self, ws: httpx_ws.WebSocketSession) -> None:
        self._ws = ws
        self.ready: dict = {}
        self.end_message: Optional[dict] = None
        self._done = False

    def _open(self) -> None:
        first = self._next()
        if not isinstance(first, dict) or first.get("type") != "ready":
            raise LiveSessionClosed(f"expected the ready message, got {first!r:.100}", None)
        self.ready = first

    def send(self, pcm: bytes) -> None:
        """Speech: 16 kHz mono PCM, signed 16-bit little-endian."""
        self._ws.send_bytes(bytes(pcm))

    def end(self) -> None:
        self._ws.send_text(json.dumps({"type": "end"}))

    def stream(self, pcm: bytes, *, realtime: bool = True, chunk_ms: int = 100) -> None:
        """Send ``pcm`` in chunks (at the pace of speech when ``realtime``), then end the input."""
        chunk = SAMPLE_RATE * chunk_ms // 1000 * 2
        start = time.monotonic()
        for i, offset in enumerate(range(0, len(pcm), chunk)):
            if realtime:
                time.sleep(max(0.0, start + i * chunk_ms / 1000 - time.monotonic()))
            self.send(pcm[offset: offset + chunk])
        self.end()

    def _next(self) -> Optional[Message]:
        while True:
            try:
                message = _message(self._ws.receive())
            except httpx_ws.WebSocketDisconnect as exc:
                self._done = True
                error = _closed(exc)
                if error is not None:
                    raise error from None
                return None
            if message is not None:
                return message

    def __iter__(self) -> Iterator[Message]:
        while not self._done:
            message = self._next()
            if message is None:
                return
            if isinstance(message, dict) and message.get("type") == "end":
                self.end_message = message
            yield message

    def save(self, path: Union[str, Path]) -> dict:
        """Everything that comes back (until the end) into an MP4 file; returns the end message."""
        with open(path, "wb") as out:
            for message in self:
                if isinstance(message, bytes):
                    out.write(message)
        return self.end_message or {}

    def close(self) -> None:
        self._done = True
        self._ws.close()


class AsyncLiveSession:
    """The async twin of :class:`LiveSession`."""

    def __init__(self, ws: httpx_ws.AsyncWebSocketSession) -> None:
        self._ws = ws
        self.ready: dict = {}
        self.end_message: Optional[dict] = None
        self._done = False

    async def _open(self) -> None:
        first = await self._next()
        if not isinstance(first, dict) or first.get("type") != "ready":
            raise LiveSessionClosed(f"expected the ready message, got {first!r:.100}", None)
        self.ready = first

    async def send(self, pcm: bytes) -> None:
        await self._ws.send_bytes(bytes(pcm))

    async def end(self) -> None:
        await self._ws.send_text(json.dumps({"type": "end"}))

    async def stream(self, pcm: bytes, *, realtime: bool = True, chunk_ms: int = 100) -> None:
        import asyncio

        chunk = SAMPLE_RATE * chunk_ms // 1000 * 2
        start = time.monotonic()
        for i, offset in enumerate(range(0, len(pcm), chunk)):
            if realtime:
                await asyncio.sleep(max(0.0, start + i * chunk_ms / 1000 - time.monotonic()))
            await self.send(pcm[offset: offset + chunk])
        await self.end()

    async def _next(self) -> Optional[Message]:
        while True:
            try:
                message = _message(await self._ws.receive())
            except httpx_ws.WebSocketDisconnect as exc:
                self._done = True
                error = _closed(exc)
                if error is not None:
                    raise error from None
                return None
            if message is not None:
                return message

    async def __aiter__(self) -> AsyncIterator[Message]:
        while not self._done:
            message = await self._next()
            if message is None:
                return
            if isinstance(message, dict) and message.get("type") == "end":
                self.end_message = message
            yield message

    async def save(self, path: Union[str, Path]) -> dict:
        with open(path, "wb") as out:
            async for message in self:
                if isinstance(message, bytes):
                    out.write(message)
        return self.end_message or {}

    async def close(self) -> None:
        self._done = True
        await self._ws.close()


def read_pcm(path: Union[str, Path]) -> bytes:
    """A WAV file's samples as 16 kHz mono s16le (what a live session takes); other formats: convert first,
    e.g. ``ffmpeg -i speech.mp3 -ar 16000 -ac 1 speech.wav``."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise BadRequest(f"{Path(path).name}: not a PCM WAV file ({exc}); convert it with "
                         "ffmpeg -i IN -ar 16000 -ac 1 OUT.wav") from None
    if (rate, channels, width) != (SAMPLE_RATE, 1, 2):
        raise BadRequest(f"{Path(path).name}: {rate} Hz, {channels} channel(s), {8 * width}-bit; a live session takes "
                         "16 kHz mono 16-bit: convert it with ffmpeg -i IN -ar 16000 -ac 1 -sample_fmt s16 OUT.wav")
    return frames


def sender_thread(session: LiveSession, pcm: bytes, *, realtime: bool = True) -> threading.Thread:
    """``session.stream(pcm)`` on a thread of its own (while this one reads what comes back)."""
    thread = threading.Thread(target=session.stream, args=(pcm,), kwargs={"realtime": realtime},
                              name="lipsync-live-send", daemon=True)
    thread.start()
    return thread


def connect_options(subprotocols: Optional[list[str]] = None) -> dict:
    return {"subprotocols": subprotocols or [SUBPROTOCOL], "max_message_size_bytes": MAX_MESSAGE_BYTES,
            "queue_size": 64}

