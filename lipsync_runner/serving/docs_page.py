"""The product's API reference: Swagger UI at ``/`` and the OpenAPI document at ``/docs.json``.

BentoML 1.4 serves both itself (``index_page`` and ``openapi_spec_view`` in
``_bentoml_impl/server/app.py``): a stock page titled "<Service>:dev", version "None", with
BentoML's badges loaded from the internet and Google Tag Manager, and a spec in which the REST
routes sit untagged under "default". ``DocsPage`` is an ASGI middleware that, on those two
public URLs only,

* answers ``GET /`` with our page (``docs_static/index.html``), which loads BentoML's own
  Swagger UI build from ``/static_content/`` (served locally by BentoML) and nothing from
  outside: a Content-Security-Policy keeps it that way;
* passes ``GET /docs.json`` on to BentoML and rewrites the JSON it answers with
  ``product_openapi``: our title, version and description, the REST routes documented with
  examples (under their own tags, listed first), the BentoML endpoints and the probes labelled
  as such, the token scheme.

Nothing inside BentoML is patched. ``tests/test_docs_page.py`` pins the parts of BentoML's
spec this rewrites, so a BentoML upgrade that changes them fails there first.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Awaitable, Callable, MutableMapping

from lipsync_runner import __version__
from lipsync_runner.api.auth import OPEN_PATHS, OPEN_PREFIXES

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

STATIC_DIR = Path(__file__).with_name("docs_static")
ASSETS_PREFIX = "/docs-assets/"  # our own small files; Swagger UI itself comes from /static_content/
ASSETS = {"docs.js": "text/javascript; charset=utf-8", "docs.css": "text/css; charset=utf-8"}
REST_PREFIX = "/api/lip-sync"

TITLE = "Lip sync API"
REST_TAG = "REST API"
BENTOML_TAG = "BentoML endpoints"
INFRA_TAG = "Probes and metrics"
BENTOML_STOCK_TAGS = {"Service APIs": BENTOML_TAG, "Infrastructure": INFRA_TAG}  # what BentoML 1.4 calls them
SECURITY_SCHEME = "bearerToken"

# Swagger UI's own inline styles need 'unsafe-inline'; everything else is same-origin or data:.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "font-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'self'; frame-ancestors 'none'")


def description(version: str = __version__, rest_prefix: str = REST_PREFIX) -> str:
    """The page's introduction (Markdown, rendered by Swagger UI): what it is, which surface to use."""
    return f"""\
MuseTalk lip sync, version {version}: upload a video of a speaking face and a speech track, get the
same video back with the mouth re-synced to the speech.

**[Open the web page (/ui/)](./ui/)** to run a job from the browser.

#### Which of the two surfaces to use

* **{REST_TAG}** (`{rest_prefix}/...`): for curl, browsers, any HTTP client, the `lipsync_client`
  Python SDK and the `lipsync` command. Plain GET/POST/DELETE routes, uploads streamed to disk,
  downloads with Range support. It is the seed guide's contract: **use this one** unless you
  already use BentoML's client.
* **{BENTOML_TAG}** (`/generate`, `/status`, ...): the same jobs with the same JSON bodies, for
  `bentoml.SyncHTTPClient` / `AsyncHTTPClient` and BentoCloud. Every route is a POST with a
  JSON body (multipart for `generate`).
* **{INFRA_TAG}**: `/livez`, `/readyz` and `/metrics`, for Kubernetes and Prometheus.

#### A job

`POST {rest_prefix}/generate` answers 202 with a `job_id`; poll `GET {rest_prefix}/status/{{job_id}}`
until `status` is `completed` (or `failed`, `cancelled`), then `GET {rest_prefix}/download/{{job_id}}`.
Statuses: `queued` → `processing` → `completed` | `failed` | `cancelled`.

```bash
JOB=$(curl -s -X POST http://localhost:3000{rest_prefix}/generate \\
        -F video=@demo/face.mp4 -F audio=@demo/speech.wav | jq -r .job_id)
curl -s http://localhost:3000{rest_prefix}/status/$JOB
curl -o lipsynced.mp4 http://localhost:3000{rest_prefix}/download/$JOB
```

#### Errors and tokens

Errors are JSON, `{{"error": "..."}}`, with the HTTP status that says what kind: 400 bad input,
401 missing or wrong token, 404 no such job, 409 not finished, 413 too large, 429 queue full
(with `Retry-After`), 503 models not loaded, 507 server disk full.

When the service has API tokens configured, every job route needs `Authorization: Bearer <token>`
(the **Authorize** button below; the lock marks those routes). Health, the parameter schema, the
probes and this page stay open; `/metrics` is open only with `LIP_SYNC_OPEN_METRICS=true`.
"""


# ------------------------------------------------------------------ REST operations


def _examples(rest_prefix: str) -> dict[str, Any]:
    """Response examples, made by the code that makes the real responses, so they cannot drift."""
    from datetime import datetime, timedelta, timezone

    from lipsync_runner.jobs.schemas import CleanupResponse, GenerateAccepted, job_summary, status_body
    from lipsync_runner.jobs.records import JobRecord, JobStatus

    job_id = "3f2c1a9e-8b7d-4c6e-9f01-2a3b4c5d6e7f"
    created = datetime(2026, 2, 10, 12, 0, 0, tzinfo=timezone.utc)
    base = dict(job_id=job_id, video_filename="face.mp4", audio_filename="speech.wav",
                video_file="input_video.mp4", audio_file="input_audio.wav", created_at=created,
                media={"video": {"duration_s": 4.0, "width": 640, "height": 360, "fps": "25/1"},
                       "audio": {"duration_s": 5.0}})
    completed = JobRecord(**base, status=JobStatus.completed, stage="done", progress=1.0, output_file="output.mp4",
                          frames=125, attempts=1, started_at=created + timedelta(seconds=1),
                          completed_at=created + timedelta(seconds=41), expires_at=created + timedelta(hours=24),
                          timings={"queue": 1.0, "faces": 6.1, "generate": 28.4, "encode": 3.2, "total": 40.0})
    running = JobRecord(**base, status=JobStatus.processing, stage="generate", progress=0.4, attempts=1,
                        started_at=created + timedelta(seconds=1))
    accepted = GenerateAccepted(job_id=job_id, status=JobStatus.queued, message="Lip sync job queued",
                                status_url=f"{rest_prefix}/status/{job_id}",
                                download_url=f"{rest_prefix}/download/{job_id}")
    return {
        "accepted": accepted.model_dump(mode="json"),
        "completed": status_body(completed, rest_prefix),
        "running": status_body(running, rest_prefix),
        "jobs": {"total": 2, "jobs": [job_summary(running, rest_prefix), job_summary(completed, rest_prefix)]},
        "cleanup": CleanupResponse(job_id=job_id).model_dump(mode="json"),
        "health": {"status": "ready", "models_loaded": True, "device": "cuda", "model_version": "v15",
                   "error": None, "version": __version__, "auth": False, "ui": "/ui/"},
        "loading": {"status": "loading", "models_loaded": False, "device": None, "model_version": None,
                    "error": None},
    }


# (method, path below the REST prefix) -> description (unless the route has its own), and examples by status code
REST_OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("get", "/health"): {
        "description": "Open even when tokens are required. 200 when jobs can run; 503 while the models "
                       "load or when loading failed (`error` says why). `model_version` names the loaded "
                       "MuseTalk (`v15` ignores `bbox_shift`).",
        "examples": {"200": "health", "503": "loading"},
    },
    ("post", "/generate"): {
        "description": "Multipart form: `video` (a face), `audio` (speech, or any video whose sound track "
                       "should be used), and the job parameters. Files are checked by content, not by name. "
                       "Answers 202 with the `job_id` at once; with `wait=true` it blocks until the job has "
                       "finished and answers 200 (the seed guide's synchronous style). An input may be given "
                       "as `video_url` / `audio_url` instead (the worker fetches it; with URLs only, a JSON "
                       "body works too), and the video as `avatar_id` (a video prepared once: `POST /avatars`); "
                       "`Idempotency-Key` makes a retried POST return the first job (200).\n\n"
                       "`curl -X POST http://localhost:3000/api/lip-sync/generate "
                       "-F video=@demo/face.mp4 -F audio=@demo/speech.wav`",
        "examples": {"202": "accepted"},
    },
    ("get", "/status/{job_id}"): {
        "description": "Poll this until `status` is `completed`, `failed` or `cancelled`; `stage` and "
                       "`progress` (0 to 1) follow the job while it runs.",
        "examples": {"200": "completed"},
    },
    ("get", "/download/{job_id}"): {
        "description": "The lip-synced MP4 (H.264 and AAC), as `lip_sync_<job_id>.mp4`. 409 until the job "
                       "has completed. Range requests work.",
        "examples": {},
    },
    ("delete", "/cleanup/{job_id}"): {
        "description": "Cancels the job if it is still running, then deletes its files and its record.",
        "examples": {"200": "cleanup"},
    },
    ("post", "/cancel/{job_id}"): {
        "description": "Stops a queued or running job; a finished job is left as it is.",
        "examples": {"200": "running"},
    },
    ("get", "/jobs"): {
        "description": "The jobs this caller may see, newest first, with their inputs' names and durations.",
        "examples": {"200": "jobs"},
    },
    ("get", "/params"): {
        "description": "The job parameters as a JSON schema: name, type, range, default and description of each; "
                       "`x-model-versions` lists the MuseTalk versions that use a parameter. `generate` takes "
                       "them as form fields; the web page builds its form from this.",
        "examples": {},
    },
    ("get", "/jobs/{job_id}/inputs/{kind}"): {
        "description": "`kind` is `video` or `audio`: the file as it was uploaded, for playback. Range requests work.",
        "examples": {},
    },
    ("get", "/jobs/{job_id}/thumbnail.jpg"): {
        "description": "A JPEG of the job's video (its first frame), for job lists.",
        "examples": {},
    },
}

# BentoML endpoint -> what it is (BentoML takes the descriptions from docstrings, which most lack)
BENTOML_OPERATIONS: dict[str, str] = {
    "generate": "Queue a job: multipart `video`, `audio` and the job parameters; `wait=true` blocks until "
                "it has finished. Same body as `POST {rest}/generate`.",
    "status": "A job's status, as `GET {rest}/status/{{job_id}}`.",
    "download": "The result MP4, as `GET {rest}/download/{{job_id}}`.",
    "cancel": "Stop a job, as `POST {rest}/cancel/{{job_id}}`.",
    "cleanup": "Delete a job and its files, as `DELETE {rest}/cleanup/{{job_id}}`.",
    "jobs": "List jobs, newest first, as `GET {rest}/jobs`.",
    "health": "Readiness, as `GET {rest}/health` (open when tokens are required).",
    "usage": "The caller's own usage by UTC day, as `GET {rest}/usage`.",
}

ERROR_SCHEMA_REF = "#/components/schemas/ErrorResponse"
UNUSED_SCHEMAS = ("HTTPValidationError", "ValidationError")  # FastAPI's 422, which the REST app never sends
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def _tag_of(path: str, op: dict[str, Any], rest_prefix: str) -> str:
    if path == rest_prefix or path.startswith(rest_prefix + "/"):
        own = op.get("tags") or []  # the REST app's own grouping (api/rest.py), when it has one
        return own[0] if own else REST_TAG
    if "x-bentoml-name" in op:
        return BENTOML_TAG
    stock = [BENTOML_STOCK_TAGS[t] for t in op.get("tags", []) if t in BENTOML_STOCK_TAGS]
    return stock[0] if stock else INFRA_TAG


def product_openapi(spec: dict[str, Any], *, version: str = __version__,
                    rest_prefix: str = REST_PREFIX, auth: bool = True) -> dict[str, Any]:
    """BentoML's OpenAPI document of the LipSync service, made the product's (a new dict).

    ``auth``: the service checks tokens; without them no operation is marked as needing one."""
    spec = copy.deepcopy(spec)
    spec.pop("servers", None)  # BentoML's [{"url": "."}]: the page's own origin, without a server picker
    spec["info"] = {"title": TITLE, "version": version, "description": description(version, rest_prefix)}
    components = spec.setdefault("components", {})
    components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
        "type": "http", "scheme": "bearer",
        "description": "Only when the service has API tokens configured (LIP_SYNC_API_TOKENS).",
    }
    examples = _examples(rest_prefix)
    rest_tags: list[str] = []  # in order of appearance: Swagger UI lists the sections in spec["tags"] order
    for path, item in spec.get("paths", {}).items():
        for method in METHODS:
            op = item.get(method)
            if not isinstance(op, dict):
                continue
            rest = path.startswith(rest_prefix + "/")
            tag = _tag_of(path, op, rest_prefix)
            op["tags"] = [tag]
            if rest:
                rest_tags += [tag] if tag not in rest_tags else []
                _document_rest(op, method, path[len(rest_prefix):], examples)
            elif tag == BENTOML_TAG:
                _document_bentoml(op, rest_prefix)
            if auth and not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)):  # api/auth.py's rule
                op["security"] = [{SECURITY_SCHEME: []}]
    spec["tags"] = [
        *({"name": t, "description": f"The REST API under `{rest_prefix}` (the seed guide's contract): use this one."}
          for t in rest_tags),
        {"name": BENTOML_TAG, "description": "BentoML's own endpoints, for `bentoml.SyncHTTPClient` and "
                                             "BentoCloud: every route is a POST; same bodies as the REST API."},
        {"name": INFRA_TAG, "description": "Kubernetes probes and Prometheus metrics."},
    ]
    schemas = components.get("schemas", {})
    text = json.dumps(spec["paths"])
    for name in UNUSED_SCHEMAS:
        if f"#/components/schemas/{name}\"" not in text:
            schemas.pop(name, None)
    return spec


def _document_rest(op: dict[str, Any], method: str, sub_path: str, examples: dict[str, Any]) -> None:
    op["responses"] = {code: r for code, r in op.get("responses", {}).items() if code != "422"}
    docs = REST_OPERATIONS.get((method, sub_path))
    if docs is None:  # a route added since: tagged, with its own summary
        return
    op.setdefault("description", docs["description"])  # the route's own words win, as its tags do
    for code, name in docs["examples"].items():
        content = op["responses"].get(code, {}).get("content", {}).get("application/json")
        if content is not None:
            content["example"] = examples[name]


def _document_bentoml(op: dict[str, Any], rest_prefix: str) -> None:
    name = op.get("x-bentoml-name", "")
    op["summary"] = f"BentoML: {name}"
    if not op.get("description") and name in BENTOML_OPERATIONS:
        op["description"] = BENTOML_OPERATIONS[name].format(rest=rest_prefix)
    # BentoMLErrorBodies (serving/bentoml_compat.py) answers these like the REST routes: {"error": ...}
    for code, response in op.get("responses", {}).items():
        if code.startswith(("4", "5")):
            response["content"] = {"application/json": {"schema": {"$ref": ERROR_SCHEMA_REF}}}


# ------------------------------------------------------------------ the ASGI middleware


def _page(version: str) -> bytes:
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    return html.replace("{{title}}", f"{TITLE} {version}").encode()


class DocsPage:
    """Serve our API reference at ``/`` and rewrite BentoML's ``/docs.json``; pass everything else on."""

    def __init__(self, app: ASGIApp, version: str = __version__, rest_prefix: str = REST_PREFIX,
                 auth: bool = True) -> None:
        self.app = app
        self.auth = auth
        self.version = version
        self.rest_prefix = rest_prefix
        self.page = _page(version)
        self.assets = {name: (STATIC_DIR / name).read_bytes() for name in ASSETS}

    async def __call__(self, scope: Scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
        elif path == "/":
            await _respond(scope, send, self.page, "text/html; charset=utf-8", csp=True)
        elif path.startswith(ASSETS_PREFIX) and path[len(ASSETS_PREFIX):] in self.assets:
            name = path[len(ASSETS_PREFIX):]
            await _respond(scope, send, self.assets[name], ASSETS[name])
        elif path == "/docs.json":
            await self._rewrite_spec(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _rewrite_spec(self, scope: Scope, receive, send) -> None:
        start: Message = {}
        body = bytearray()

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))

        await self.app(scope, receive, capture)
        status = start.get("status", 500)
        payload = bytes(body)
        if status == 200:
            payload = json.dumps(product_openapi(json.loads(payload), version=self.version,
                                                 rest_prefix=self.rest_prefix, auth=self.auth)).encode()
        await _respond(scope, send, payload, "application/json", status=status)


async def _respond(scope: Scope, send, body: bytes, content_type: str, *, status: int = 200,
                   csp: bool = False) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-cache"), (b"x-content-type-options", b"nosniff")]
    if csp:
        headers.append((b"content-security-policy", CSP.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else body})
