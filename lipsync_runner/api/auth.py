"""Optional bearer-token authentication for both API surfaces.

Off unless tokens are configured (`LIP_SYNC_API_TOKENS`, comma-separated, and/or
`LIP_SYNC_API_TOKENS_FILE`, one per line: a mounted Kubernetes Secret, re-read when it
changes). Health, probes, metrics and the API schema stay open. With
`LIP_SYNC_SCOPE_JOBS_TO_TOKEN=true` each job belongs to the token that created it:
other tokens get 404 for it, as if it did not exist.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

# Always reachable: liveness/readiness probes, health (seed contract), metrics, schema, docs page.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics", "/health", "/api/lip-sync/health",
                        "/schema.json", "/docs.json", "/"})
OPEN_PREFIXES = ("/static_content/", "/ui")


class AuthSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_", extra="ignore")

    api_tokens: str = Field(default="", description="Comma-separated bearer tokens; empty: auth off.")
    api_tokens_file: Path | None = Field(default=None, description="File with one token per line.")
    scope_jobs_to_token: bool = Field(default=False, description="Jobs are visible only to their creator's token.")


def owner_of(token: str) -> str:
    """A stable, non-reversible job owner id for a token (the token itself is never stored)."""
    return hashlib.sha256(token.encode()).hexdigest()[:24]


class TokenSet:
    """The accepted tokens, from the environment and a file that may be rotated underneath us."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self._static = {t.strip() for t in settings.api_tokens.split(",") if t.strip()}
        self._file_tokens: set[str] = set()
        self._file_mtime: float | None = None
        self._lock = threading.Lock()
        self._refresh()

    def _refresh(self) -> None:
        path = self.settings.api_tokens_file
        if path is None:
            return
        try:
            mtime = path.stat().st_mtime
        except OSError:
            log.error("API tokens file %s is unreadable: refusing all requests that need a token", path)
            self._file_tokens, self._file_mtime = set(), None
            return
        if mtime != self._file_mtime:
            lines = path.read_text().splitlines()
            self._file_tokens = {ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")}
            self._file_mtime = mtime

    @property
    def enabled(self) -> bool:
        return bool(self._static) or self.settings.api_tokens_file is not None

    def match(self, presented: str) -> bool:
        with self._lock:
            self._refresh()
            tokens = self._static | self._file_tokens
        # compare against every token in constant time: no early exit that leaks which one
        return any([hmac.compare_digest(presented.encode(), t.encode()) for t in tokens]) if presented else False


def request_owner(scope: dict) -> str | None:
    """The owner set by the middleware for this request (None: auth off or jobs not scoped)."""
    return (scope.get("state") or {}).get("lipsync_owner")


class BearerAuthMiddleware:
    """ASGI middleware: 401 without a valid `Authorization: Bearer <token>` (open paths excepted)."""

    def __init__(self, app, settings: AuthSettings | None = None) -> None:
        self.app = app
        self.settings = settings or AuthSettings()
        self.tokens = TokenSet(self.settings)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.tokens.enabled or _is_open(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        if not self.tokens.match(token):
            await _unauthorized(send)
            return
        if self.settings.scope_jobs_to_token:
            scope.setdefault("state", {})["lipsync_owner"] = owner_of(token)
        await self.app(scope, receive, send)


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _bearer(scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


async def _unauthorized(send) -> None:
    body = json.dumps({"error": "Missing or invalid API token"}).encode()
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b'Bearer realm="lip-sync"')]})
    await send({"type": "http.response.body", "body": body})
