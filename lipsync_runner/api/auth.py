"""Optional bearer-token authentication for both API surfaces.

Off unless tokens are configured (`LIP_SYNC_API_TOKENS`, comma-separated, and/or
`LIP_SYNC_API_TOKENS_FILE`, one per line: a mounted Kubernetes Secret, re-read when it
changes). Probes, health, the API schema, the docs page and the web page stay open;
everything else needs `Authorization: Bearer <token>`, websockets included (a browser, which
cannot set that header on a WebSocket, offers the subprotocol `bearer.<token>`; refused: close 4401). With
`LIP_SYNC_SCOPE_JOBS_TO_TOKEN=true` each job belongs to the token that created it: other
tokens get 404 for it, as if it did not exist.

A tokens file that cannot be read (a Secret being replaced, a permission slip) keeps the
last good set and logs, rather than locking every client out; a file that is readable but
empty means what it says: no tokens. Settings that would silently turn auth off (a
token list of only separators) refuse to start.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from pathlib import Path


from lipsync_runner.api.errors import UNAUTHORIZED
from lipsync_runner.config import AuthSettings, split_list

log = logging.getLogger(__name__)

# Always reachable: liveness/readiness probes, health (seed contract), schema, docs page.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/health", "/api/lip-sync/health", "/schema.json",
                        "/docs.json", "/", "/api/lip-sync/openapi.json", "/api/lip-sync/params", "/ui"})
# Path prefixes whose subtree is open (each ends with "/": "/ui" must not open "/uiX").
OPEN_PREFIXES = ("/static_content/", "/ui/")
TOKENS_RECHECK_S = 5.0  # the file is re-read at least this often, whatever its mtime says
WEBSOCKET_BEARER = "bearer."  # browsers: the token as the WebSocket subprotocol "bearer.<token>"


def owner_of(token: str) -> str:
    """A stable, non-reversible job owner id for a token (the token itself is never stored)."""
    return hashlib.sha256(token.encode()).hexdigest()[:24]


class TokenSet:
    """The accepted tokens, from the environment and a file that may be rotated underneath us."""

    def __init__(self, settings: AuthSettings, clock=time.monotonic) -> None:
        self.settings = settings
        self._static = set(split_list(settings.api_tokens))
        self._file_tokens: set[str] = set()
        self._file_state: tuple | None = None
        self._checked_at = float("-inf")
        self._clock = clock
        self._lock = threading.Lock()
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        path = self.settings.api_tokens_file
        if path is None:
            return
        now = self._clock()
        try:
            st = os.stat(path)
            # mtime alone misses a rewrite within the clock's granularity and an atomic swap of a
            # Kubernetes Secret's ..data link; the inode and size catch those, the timer the rest
            state = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
            if not force and state == self._file_state and now - self._checked_at < TOKENS_RECHECK_S:
                return
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            if self._file_state is None and force:
                log.error("API tokens file %s cannot be read (%s): no file tokens until it can", path,
                          exc.strerror or type(exc).__name__)
            else:
                log.error("API tokens file %s cannot be read (%s): keeping the last good set", path,
                          exc.strerror or type(exc).__name__)
            self._checked_at = now
            return
        self._file_tokens = {ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")}
        self._file_state = state
        self._checked_at = now

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def match(self, presented: str) -> bool:
        with self._lock:
            self._refresh()
            tokens = self._static | self._file_tokens
        # compare against every token in constant time: no early exit that leaks which one
        return any([hmac.compare_digest(presented.encode(), t.encode()) for t in tokens]) if presented else False


def request_owner(scope: dict) -> str | None:
    """The owner set by the middleware for this request (None: auth off or jobs not scoped)."""
    return (scope.get("state") or {}).get("lipsync_owner")


def request_client(scope: dict) -> str:
    """Who is asking, for fairness between clients: the token's fingerprint, else the peer address."""
    state = scope.get("state") or {}
    if state.get("lipsync_token_id"):
        return "token:" + state["lipsync_token_id"]
    client = scope.get("client")
    return "addr:" + (client[0] if client else "unknown")


def is_authenticated(scope: dict) -> bool:
    """True when auth is off or the request carried a valid token (open paths included)."""
    return bool((scope.get("state") or {}).get("lipsync_authenticated"))


class BearerAuthMiddleware:
    """ASGI middleware: 401 without a valid `Authorization: Bearer <token>` (open paths excepted)."""

    def __init__(self, app, settings: AuthSettings | None = None) -> None:
        self.app = app
        self.settings = settings or AuthSettings()
        self.tokens = TokenSet(self.settings)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if not self.tokens.enabled:
            state["lipsync_authenticated"] = True
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        valid = self.tokens.match(token)
        if valid:
            state["lipsync_authenticated"] = True
            state["lipsync_token_id"] = owner_of(token)
            if self.settings.scope_jobs_to_token:
                state["lipsync_owner"] = owner_of(token)
        if not valid and not self._is_open(scope):
            if scope["type"] == "websocket":
                await _refuse_websocket(scope, receive, send)
            else:
                await _unauthorized(send)
            return
        await self.app(scope, receive, send)

    def _is_open(self, scope) -> bool:
        path = scope.get("path", "")
        if scope["type"] == "http" and path == "/metrics":
            return self.settings.open_metrics
        return scope["type"] == "http" and (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES))


def _bearer(scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    if scope["type"] == "websocket":  # browsers cannot set headers on a WebSocket: "bearer.<token>" subprotocol
        for protocol in scope.get("subprotocols") or ():
            if protocol.startswith(WEBSOCKET_BEARER):
                return protocol[len(WEBSOCKET_BEARER):]
    return ""


async def _refuse_websocket(scope, receive, send) -> None:
    """Accept, then close with 4401: a close before the handshake reaches the client as a bare HTTP 403,
    which says nothing about why (browsers do not even show it)."""
    if (await receive())["type"] != "websocket.connect":
        return
    offered = scope.get("subprotocols") or []
    accept = {"type": "websocket.accept"}
    if offered:  # a browser that offered subprotocols fails the handshake unless one comes back
        accept["subprotocol"] = "lipsync.live" if "lipsync.live" in offered else offered[0]
    await send(accept)
    await send({"type": "websocket.close", "code": 4401, "reason": UNAUTHORIZED[:120]})


async def _unauthorized(send) -> None:
    body = json.dumps({"error": UNAUTHORIZED}).encode()
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b'Bearer realm="lip-sync"')]})
    await send({"type": "http.response.body", "body": body})
