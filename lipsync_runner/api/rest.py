"""The seed-compatible REST API (``/api/lip-sync/...``) as a FastAPI app factory.

Routes are relative to the mount point: ``/health``, ``/params``, ``/generate``,
``/status/{id}``, ``/download/{id}``, ``/cleanup/{id}``, ``/cancel/{id}``, ``/jobs``, a
job's inputs (``/jobs/{id}/inputs/video|audio``, ``/jobs/{id}/thumbnail.jpg``), the
caller's ``/usage`` and avatars (``/avatars``, ``/avatars/{id}``: api/avatars.py). Each route
only reads its request and calls `JobOperations` (operations.py), the code BentoML's
endpoints call too. Every error body is ``{"error": ...}`` (errors.py), and no response
ever names a server-side path.

``POST /generate`` with ``wait=true`` (query or form field) blocks until the job finishes
and answers the seed's synchronous body with HTTP 200 -- ``success: false`` plus ``error``
when the job failed or was cancelled; if the wait times out it answers 202 like an
asynchronous submit.
"""

from __future__ import annotations

import logging
import traceback
from datetime import date
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lipsync_runner import __version__
from lipsync_runner.api.auth import is_authenticated, request_client, request_owner
from lipsync_runner.errors import InvalidInputError, LipSyncError
from lipsync_runner.integration.idempotency import IDEMPOTENCY_HEADER, REPLAYED_HEADER, parse_key
from lipsync_runner.integration.usage import UsageSummary

from lipsync_runner.jobs.records import JobKind
from lipsync_runner.api.admission import parse_wait
from lipsync_runner.api.preview import FACES_HEADER, JPEG, MP4, RANGE_HEADER
from lipsync_runner.api.errors import INTERNAL, error_body, error_headers, generic_error
from lipsync_runner.config import ApiLimits, RunnerSettings
from lipsync_runner.api.limits import BodySizeLimitMiddleware
from lipsync_runner.api.live import LiveGateway, add_live_route
from lipsync_runner.api.operations import JobOperations, Manager
from lipsync_runner.jobs.schemas import (
    AvatarAccepted,
    AvatarDeleted,
    AvatarListResponse,
    AvatarStatusResponse,
    CleanupResponse,
    ErrorResponse,
    GenerateAccepted,
    GenerateResult,
    HealthResponse,
    JobListResponse,
    JobStatusResponse,
)
from lipsync_runner.params import avatar_request_fields, form_properties

if TYPE_CHECKING:
    from lipsync_runner.integration.services import Integration

log = logging.getLogger(__name__)
DAY_PATTERN = r"^\d{4}-\d{2}-\d{2}$"


def _day(value: str | None, name: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidInputError(f"Invalid {name}: expected a UTC day as YYYY-MM-DD") from None

TAG_JOBS = "Jobs (REST)"
TAG_SERVICE = "Service (REST)"
TAG_AVATARS = "Avatars (REST)"


def get_owner(request: Request) -> str | None:
    """Who is asking: the token's owner id when jobs are scoped per token (see api/auth.py), else None."""
    return request_owner(request.scope)


def generate_request_body() -> dict[str, Any]:
    """The bodies of POST /generate, from JobParams (documented once, in params.py): a multipart form
    (files and/or URL fields), or a JSON object of the parameters (inputs by URL)."""
    wait = {"type": "boolean", "default": False,
            "description": "Block until the job finishes (the seed's synchronous style)."}
    return {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "description": "Each input is a file (video, audio) or a URL (video_url, audio_url), not both; the "
                           "video may be a prepared avatar instead (avatar_id).",
            "properties": {
                "video": {"type": "string", "format": "binary",
                          "description": "The video with the face: mp4, mov, mkv, webm or avi (checked by content)"},
                "audio": {"type": "string", "format": "binary",
                          "description": "The new speech: wav, mp3, m4a, aac or ogg, or any video whose sound track "
                                         "should be used (checked by content)"},
                **form_properties(),
                "wait": wait,
            },
        }}, "application/json": {"schema": {
            "type": "object",
            "description": "Inputs by URL: video_url (or avatar_id) and audio_url, plus any job parameter.",
            "required": ["audio_url"],
            "properties": {**form_properties(), "wait": wait},
        }}},
    }


def preview_request_body() -> dict[str, Any]:
    """The body of POST /preview: generate's form (uploads or avatar_id) plus `at`."""
    schema = generate_request_body()["content"]["multipart/form-data"]["schema"]
    properties = {k: v for k, v in schema["properties"].items() if k not in ("wait", "video_url", "audio_url")}
    properties["at"] = {"type": "number", "minimum": 0,
                        "description": "Where the stretch starts, in seconds of the output. Default: where the "
                                       "dubbing starts (the first speech)."}
    return {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "description": "The video as a file or avatar_id, the audio as a file.",
        "properties": properties}}}}


def avatar_request_body() -> dict[str, Any]:
    """The bodies of POST /avatars: a video (upload or video_url) and the parameters that shape its
    preparation (params.avatar_fields), from JobParams."""
    properties = {name: prop for name, prop in form_properties().items() if name in avatar_request_fields()}
    return {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "description": "The video as a file or as video_url, not both.",
            "properties": {"video": {"type": "string", "format": "binary",
                                     "description": "The video with the face (checked by content)"}, **properties},
        }}, "application/json": {"schema": {
            "type": "object", "description": "The video by URL.", "required": ["video_url"],
            "properties": properties,
        }}},
    }


def create_rest_app(
    jobs: Manager | JobOperations,
    get_health: Callable[[], Awaitable[dict]],
    settings: ApiLimits,
    *,
    ensure_ready: Callable[[], Awaitable[None]] | None = None,
    integration: Integration | None = None,
    defaults: dict[str, Any] | None = None,
    debug: bool = False,
    live: Callable[[], LiveGateway | None] | None = None,
) -> FastAPI:
    """The REST API, to be mounted at ``settings.url_prefix`` (default ``/api/lip-sync``).

    ``jobs`` is the service's :class:`JobOperations` (the service core builds it), or a job manager
    to build them over, with ``defaults`` for what a job does not give (default: the deployment's
    ``LIP_SYNC_BBOX_SHIFT``). ``get_health`` answers the health body. ``ensure_ready``, when
    given, is awaited first thing in ``POST /generate``; it raises (e.g. ModelsNotReadyError ->
    503) to refuse uploads the service cannot process. ``debug`` adds tracebacks to 500 answers.
    ``live()`` gives the real-time sessions' gateway (api/live.py; default: ``app.state.live``).
    """
    app = FastAPI(
        title="Lip sync REST API",
        description="MuseTalk lip sync: upload a video and an audio track, poll the job, download the result.",
        version=__version__,
    )
    app.state.operations = (jobs if isinstance(jobs, JobOperations)
                            else JobOperations(jobs, settings, ensure_ready=ensure_ready, integration=integration,
                                               defaults=defaults or {"bbox_shift": RunnerSettings().bbox_shift}))
    app.state.health = get_health
    app.add_middleware(
        BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes, paths_prefixes=("/generate", "/avatars", "/preview")
    )

    # ------------------------------------------------------------------ errors

    @app.exception_handler(LipSyncError)
    async def lipsync_error(request: Request, exc: LipSyncError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=exc.http_status, headers=error_headers(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body"))
            problems.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return JSONResponse({"error": "Invalid request: " + "; ".join(problems)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(generic_error(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        return JSONResponse({"error": "Upload interrupted"}, status_code=400)

    @app.exception_handler(Exception)
    async def unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        body: dict[str, Any] = {"error": INTERNAL}
        if debug:
            body["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return JSONResponse(body, status_code=500)

    # ------------------------------------------------------------------ routes

    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 404, 408, 409, 413, 429, 500, 503, 507)
    }
    router = APIRouter(responses={400: errors[400], 500: errors[500]})
    job_errors = {404: errors[404]}

    def ops(request: Request) -> JobOperations:
        return request.app.state.operations

    @router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}},
                summary="Readiness", tags=[TAG_SERVICE])
    async def health(request: Request) -> JSONResponse:
        try:
            body = dict(await request.app.state.health())
            if not is_authenticated(request.scope):
                body.pop("jobs", None)  # every tenant's counts: only for callers with a token
        except Exception:
            log.exception("health check failed")
            body = {"status": "error", "models_loaded": False, "device": None, "error": "Health check failed"}
        body.setdefault("models_loaded", False)
        body.setdefault("device", None)
        body.setdefault("error", None)
        ready = body.get("status") == "ready"
        return JSONResponse(body, status_code=200 if ready else 503)

    @router.get("/params", summary="The job parameters (JSON schema)", tags=[TAG_SERVICE],
                description="Every parameter `POST /generate` accepts, with its type, range, default and "
                            "description. The web page renders its controls from it.")
    async def params() -> dict[str, Any]:
        return JobOperations.params_schema()

    @router.post(
        "/generate",
        status_code=202,
        response_model=GenerateAccepted,
        responses={
            200: {"model": GenerateResult, "description": "wait=true: the finished job (success true or false); "
                  "a replayed Idempotency-Key: the original job's body"},
            **{code: errors[code] for code in (408, 409, 413, 429, 503, 507)},
        },
        summary="Queue a lip sync job",
        tags=[TAG_JOBS],
        openapi_extra={"requestBody": generate_request_body()},
    )
    async def generate(
        request: Request,
        wait: Optional[str] = Query(None, description="true: block until the job finishes (the seed's behaviour)"),
        idempotency_key: Optional[str] = Header(
            None, alias=IDEMPOTENCY_HEADER,
            description="Any unique string (a UUID): a retry with the same key and the same request returns the "
                        f"original job (200, {REPLAYED_HEADER}: true) for 24 h; another request with the key is 409, "
                        "and 409 with Retry-After while the first is still being received."),
        owner: Optional[str] = Depends(get_owner),
    ) -> JSONResponse:
        answer = await ops(request).admission.admit_stream(
            request.stream(), request.headers.get("content-type"), owner=owner,
            client=request_client(request.scope), wait=parse_wait(wait), idempotency_key=parse_key(idempotency_key))
        return JSONResponse(answer.body, status_code=answer.status_code, headers=answer.headers)

    @router.post(
        "/preview",
        response_class=Response,
        responses={
            200: {"content": {MP4: {}, JPEG: {}},
                  "description": f"The stretch: an MP4 with its sound, or with `Accept: {JPEG}` a JPEG strip of its "
                                 f"frames side by side. `{FACES_HEADER}`: the face-track summary (compact JSON, as "
                                 f"a job status' `faces`); `{RANGE_HEADER}`: `start=<s>;end=<s>` of the output."},
            **{code: errors[code] for code in (404, 408, 409, 413, 429, 503, 507)},
        },
        summary="Render a short stretch now (a preview)", tags=[TAG_JOBS],
        description="Takes what `POST /generate` takes (uploads or avatar_id, every parameter), plus `at`; renders "
                    "about a second and a half of the output synchronously. The face tracking goes through the "
                    "avatar cache: a generate that follows does not track again.",
        openapi_extra={"requestBody": preview_request_body()},
    )
    async def preview(request: Request, owner: Optional[str] = Depends(get_owner)) -> Response:
        answer = await ops(request).preview(request.stream(), request.headers.get("content-type"), owner=owner,
                                            client=request_client(request.scope),
                                            accept=request.headers.get("accept"))
        return Response(answer.body, media_type=answer.media_type, headers=answer.headers())

    @router.get("/status/{job_id}", response_model=JobStatusResponse, responses=job_errors, summary="Job status",
                tags=[TAG_JOBS])
    async def status(request: Request, job_id: str, owner: Optional[str] = Depends(get_owner)) -> dict[str, Any]:
        return await ops(request).status(job_id, owner)

    @router.head("/download/{job_id}", include_in_schema=False)
    @router.get(
        "/download/{job_id}",
        response_class=FileResponse,
        responses={200: {"content": {"video/mp4": {}, "video/webm": {}}}, 206: {"description": "a byte range (Range header)"},
                   404: errors[404], 409: errors[409]},
        summary="Download the result video", tags=[TAG_JOBS],
    )
    async def download(request: Request, job_id: str, owner: Optional[str] = Depends(get_owner)) -> Response:
        # a local file, a stream from the bucket (Range honoured either way), or a presigned redirect
        return await ops(request).download(job_id, owner, range_header=request.headers.get("range"))

    @router.delete("/cleanup/{job_id}", response_model=CleanupResponse, responses={404: errors[404], 409: errors[409]},
                   summary="Remove a job and its files", tags=[TAG_JOBS])
    async def cleanup(request: Request, job_id: str, owner: Optional[str] = Depends(get_owner)) -> dict[str, Any]:
        return await ops(request).cleanup(job_id, owner)

    @router.post("/cancel/{job_id}", response_model=JobStatusResponse, responses={404: errors[404], 409: errors[409]},
                 summary="Cancel a queued or running job", tags=[TAG_JOBS])
    async def cancel(request: Request, job_id: str, owner: Optional[str] = Depends(get_owner)) -> dict[str, Any]:
        return await ops(request).cancel(job_id, owner)

    @router.get("/usage", response_model=UsageSummary, summary="Your usage by UTC day", tags=[TAG_SERVICE],
                responses={404: {"model": ErrorResponse, "description": "this server records no usage"}},
                description="Jobs (by final status), output seconds and frames of the caller's own jobs (its "
                            "token's, with jobs scoped per token), between two UTC days; the last 30 by default.")
    async def usage(
        request: Request,
        since: Optional[str] = Query(None, pattern=DAY_PATTERN, description="First UTC day, YYYY-MM-DD"),
        until: Optional[str] = Query(None, pattern=DAY_PATTERN, description="Last UTC day, YYYY-MM-DD (default today)"),
        owner: Optional[str] = Depends(get_owner),
    ) -> dict[str, Any]:
        # strings, not dates: FastAPI would read `until=0` as a Unix time (1970-01-01)
        return await ops(request).usage(owner, _day(since, "since"), _day(until, "until"))

    @router.post(
        "/avatars", status_code=202, response_model=AvatarAccepted,
        responses={200: {"model": AvatarAccepted, "description": "a replayed Idempotency-Key: the original avatar"},
                   **{code: errors[code] for code in (408, 409, 413, 429, 503, 507)}},
        summary="Prepare a video once (an avatar)", tags=[TAG_AVATARS],
        description="Tracks the face and encodes its latents once; then `POST /generate` with `avatar_id` and an "
                    "audio skips both (a dubbing platform uploads the video once, then only each language's audio). "
                    "Poll `GET /avatars/{avatar_id}` until `ready`. Avatars are the caller's own and are removed "
                    "after the retention time unless used (each generate by avatar_id keeps one longer).",
        openapi_extra={"requestBody": avatar_request_body()},
    )
    async def create_avatar(
        request: Request,
        idempotency_key: Optional[str] = Header(
            None, alias=IDEMPOTENCY_HEADER, description="As for POST /generate: a retry returns the original avatar."),
        owner: Optional[str] = Depends(get_owner),
    ) -> JSONResponse:
        answer = await ops(request).admission.admit_stream(
            request.stream(), request.headers.get("content-type"), owner=owner,
            client=request_client(request.scope), wait=False, idempotency_key=parse_key(idempotency_key),
            kind=JobKind.avatar)
        return JSONResponse(answer.body, status_code=answer.status_code, headers=answer.headers)

    @router.get("/avatars", response_model=AvatarListResponse, summary="List your avatars, newest first",
                tags=[TAG_AVATARS])
    async def list_avatars(
        request: Request,
        limit: int = Query(100, ge=1, le=1000, description="At most this many avatars"),
        owner: Optional[str] = Depends(get_owner),
    ) -> dict[str, Any]:
        return await ops(request).avatars(owner, limit)

    @router.get("/avatars/{avatar_id}", response_model=AvatarStatusResponse, responses=job_errors,
                summary="An avatar's status (ready once completed)", tags=[TAG_AVATARS])
    async def avatar_status(request: Request, avatar_id: str,
                            owner: Optional[str] = Depends(get_owner)) -> dict[str, Any]:
        return await ops(request).avatar(avatar_id, owner)

    @router.delete("/avatars/{avatar_id}", response_model=AvatarDeleted, responses=job_errors,
                   summary="Delete an avatar and its prepared data", tags=[TAG_AVATARS],
                   description="A preparation still running is cancelled. Jobs already queued by this avatar_id "
                               "fail; finished jobs keep their results.")
    async def delete_avatar(request: Request, avatar_id: str,
                            owner: Optional[str] = Depends(get_owner)) -> dict[str, Any]:
        return await ops(request).delete_avatar(avatar_id, owner)

    @router.get("/jobs", response_model=JobListResponse, summary="List jobs, newest first", tags=[TAG_JOBS])
    async def jobs(
        request: Request,
        limit: int = Query(100, ge=1, le=1000, description="At most this many jobs"),
        owner: Optional[str] = Depends(get_owner),
    ) -> dict[str, Any]:
        return await ops(request).jobs(owner, limit)

    @router.head("/jobs/{job_id}/inputs/{kind}", include_in_schema=False)
    @router.get("/jobs/{job_id}/inputs/{kind}", response_class=FileResponse,
                      responses=job_errors, summary="A job's uploaded video or audio", tags=[TAG_JOBS],
                      description="`kind` is `video` or `audio`. Range requests work (for playback).")
    async def job_input(request: Request, job_id: str, kind: str,
                        owner: Optional[str] = Depends(get_owner)) -> Response:
        return await ops(request).input_file(job_id, kind, owner, range_header=request.headers.get("range"))

    @router.head("/jobs/{job_id}/thumbnail.jpg", include_in_schema=False)
    @router.get("/jobs/{job_id}/thumbnail.jpg", response_class=FileResponse,
                      responses=job_errors, summary="A JPEG of the job's video", tags=[TAG_JOBS])
    async def thumbnail(request: Request, job_id: str, owner: Optional[str] = Depends(get_owner)) -> Response:
        return await ops(request).thumbnail(job_id, owner)

    @router.get("/jobs/{job_id}/credentials", responses={404: errors[404], 409: errors[409]},
                summary="The result's content credentials (C2PA manifest)", tags=[TAG_JOBS],
                description="The signed C2PA manifest store embedded in the result, as c2pa reads it back: "
                            "`active_manifest`, `manifests` (actions, ingredients, the job's assertion "
                            "`org.lipsync.job`, `signature_info`) and `validation_state`. 404 when the result "
                            "carries none (credentials off, or a webm output); 409 until the job completes.")
    async def credentials(request: Request, job_id: str, owner: Optional[str] = Depends(get_owner)) -> dict[str, Any]:
        return await ops(request).credentials(job_id, owner)
    @router.get("/jobs/{job_id}/live.m3u8", response_class=FileResponse, responses=job_errors, tags=[TAG_JOBS],
                summary="The video rendered so far, as HLS (while the job runs)",
                description="An HLS event playlist of fMP4 segments that grows as the job renders (the same "
                            "encode as the MP4) and ends with `#EXT-X-ENDLIST` when the job ends. 404 until the "
                            "first segment is ready; the status's `progressive` says how far it goes.")
    async def live_playlist(request: Request, job_id: str, owner: Optional[str] = Depends(get_owner)) -> Response:
        return await ops(request).live_file(job_id, "live.m3u8", owner)

    @router.get("/jobs/{job_id}/live/{name}", response_class=FileResponse, responses=job_errors, tags=[TAG_JOBS],
                summary="A segment of the progressive output",
                description="`init.mp4` or a `segNNNNN.m4s` the playlist lists; final once listed.")
    async def live_segment(request: Request, job_id: str, name: str,
                           owner: Optional[str] = Depends(get_owner)) -> Response:
        return await ops(request).live_file(job_id, name, owner, range_header=request.headers.get("range"))

    app.include_router(router)
    add_live_route(app, live or (lambda: getattr(app.state, "live", None)))
    return app
