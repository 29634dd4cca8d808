"""The seed-compatible REST API (``/api/lip-sync/...``) as a FastAPI app factory.

Routes are relative to the mount point: ``/health``, ``/generate``, ``/status/{id}``,
``/download/{id}``, ``/cleanup/{id}``, ``/cancel/{id}``, ``/jobs``. Every error body
is ``{"error": ...}`` (413 keeps the seed's ``{"error": "File too large", "message": ...}``),
and no response ever names a server-side path.

``POST /generate`` with ``wait=true`` (query or form field) blocks until the job
finishes and answers the seed's synchronous body with HTTP 200 -- ``success: false``
plus ``error`` when the job failed or was cancelled; if the wait times out it answers
202 like an asynchronous submit.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, Protocol

import anyio
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lipsync_runner.api.auth import request_owner
from lipsync_runner.errors import (
    InputTooLargeError,
    InvalidInputError,
    JobNotFoundError,
    LipSyncError,
    ModelsNotReadyError,
    QueueFullError,
)
from lipsync_runner.jobs.records import JobParams, JobRecord, JobStatus, is_job_id
from lipsync_runner.api.validation import validate_media
from lipsync_runner.storage import StoredObject, object_response

from .limits import ApiLimits, BodySizeLimitMiddleware, too_large_body
from .schemas import (
    CleanupResponse,
    ErrorResponse,
    GenerateAccepted,
    GenerateResult,
    HealthResponse,
    JobListResponse,
    JobStatusResponse,
    JobSummary,
    download_name,
)
from .uploads import SavedFile, is_multipart, media_specs, receive_multipart

log = logging.getLogger(__name__)

BBOX_SHIFT_MIN, BBOX_SHIFT_MAX = -100, 100
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


class Manager(Protocol):
    def new_upload(self) -> tuple[str, Path]: ...
    def discard_upload(self, job_id: str) -> None: ...
    def submit(
        self,
        job_id: str,
        *,
        video_file: str,
        audio_file: str,
        video_filename: str,
        audio_filename: str,
        params: JobParams,
        owner: str | None = None,
    ) -> JobRecord: ...
    def get(self, job_id: str, owner: str | None = None) -> JobRecord: ...
    def list(self, owner: str | None = None, limit: int = 100) -> list[JobRecord]: ...
    def output_path(self, job_id: str, owner: str | None = None) -> Path: ...
    def open_output(self, job_id: str, owner: str | None = None) -> StoredObject: ...
    def cancel(self, job_id: str, owner: str | None = None) -> JobRecord: ...
    def cleanup(self, job_id: str, owner: str | None = None) -> None: ...
    async def wait_async(self, job_id: str, timeout: float | None = None) -> JobRecord: ...
    def counts(self) -> dict[str, int]: ...


def get_owner(request: Request) -> str | None:
    """Who is asking: the token's owner id when jobs are scoped per token (see api/auth.py), else None."""
    return request_owner(request.scope)


def _parse_bool(value: str | None, name: str) -> bool:
    if value is None:
        return False
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise InvalidInputError(f"Invalid {name}: expected true or false, got {value[:20]!r}")


def _parse_bbox_shift(value: str | None, default: int = 0) -> int:
    if value is None or value.strip() == "":
        return default  # the deployment's LIP_SYNC_BBOX_SHIFT, as in the seed's settings
    try:
        shift = int(value.strip())
    except ValueError:
        raise InvalidInputError(f"Invalid bbox_shift: must be an integer, got {value[:20]!r}") from None
    if not BBOX_SHIFT_MIN <= shift <= BBOX_SHIFT_MAX:
        raise InvalidInputError(f"Invalid bbox_shift: must be between {BBOX_SHIFT_MIN} and {BBOX_SHIFT_MAX}")
    return shift


def _checked_id(job_id: str) -> str:
    if not is_job_id(job_id):
        raise JobNotFoundError("Job not found")
    return job_id


def _error_body(exc: LipSyncError) -> dict[str, Any]:
    if isinstance(exc, InputTooLargeError):
        return too_large_body(exc.message)
    if isinstance(exc, ModelsNotReadyError):
        return {"error": "Lip sync service not available", "details": exc.message}
    return {"error": exc.message}


def _scrub(exc: LipSyncError, job_dir: Path, files: dict[str, SavedFile]) -> None:
    """Name files as the user knows them and drop any server path from a message."""
    msg = exc.message
    for root in {str(job_dir), str(job_dir.resolve())}:
        msg = msg.replace(root + "/", "").replace(root, "")
    for saved in files.values():
        msg = msg.replace(saved.file_name, saved.display_name)
    exc.message = msg
    exc.args = (msg,)


def create_rest_app(
    get_manager: Callable[[], Manager],
    get_health: Callable[[], Awaitable[dict]],
    settings: ApiLimits,
    *,
    ensure_ready: Callable[[], Awaitable[None]] | None = None,
) -> FastAPI:
    """The REST API, to be mounted at ``settings.url_prefix`` (default ``/api/lip-sync``).

    ``ensure_ready``, when given, is awaited first thing in ``POST /generate``; it raises
    (e.g. ModelsNotReadyError -> 503) to refuse uploads the service cannot process.
    """
    prefix = settings.url_prefix.rstrip("/")
    specs = media_specs(settings.max_video_bytes, settings.max_audio_bytes)

    app = FastAPI(
        title="Lip sync API",
        description="MuseTalk lip sync: upload a video and an audio track, poll the job, download the result.",
        version="1.0",
    )
    app.add_middleware(
        BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes, paths_prefixes=("/generate",)
    )

    def manager_dep() -> Manager:
        return get_manager()

    def status_url(job_id: str) -> str:
        return f"{prefix}/status/{job_id}"

    def download_url(job_id: str) -> str:
        return f"{prefix}/download/{job_id}"

    def job_status(record: JobRecord) -> JobStatusResponse:
        return JobStatusResponse.from_record(record, download_url(record.job_id))

    # ------------------------------------------------------------------ errors

    @app.exception_handler(LipSyncError)
    async def lipsync_error(request: Request, exc: LipSyncError) -> JSONResponse:
        headers = {}
        if isinstance(exc, QueueFullError):
            headers["Retry-After"] = str(max(1, int(exc.retry_after_s)))
        return JSONResponse(_error_body(exc), status_code=exc.http_status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body"))
            problems.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return JSONResponse({"error": "Invalid request: " + "; ".join(problems)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        return JSONResponse({"error": "Upload interrupted"}, status_code=400)

    @app.exception_handler(Exception)
    async def unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        body: dict[str, Any] = {"error": "Internal server error"}
        if settings.debug:
            body["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return JSONResponse(body, status_code=500)

    # ------------------------------------------------------------------ routes

    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 429, 500, 503, 507)
    }
    router = APIRouter(responses={400: errors[400], 500: errors[500]})

    @router.get(
        "/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}}, summary="Readiness"
    )
    async def health() -> JSONResponse:
        try:
            body = dict(await get_health())
        except Exception:
            log.exception("health check failed")
            body = {"status": "error", "models_loaded": False, "device": None, "error": "Health check failed"}
        body.setdefault("models_loaded", False)
        body.setdefault("device", None)
        body.setdefault("error", None)
        ready = body.get("status") == "ready"
        return JSONResponse(body, status_code=200 if ready else 503)

    @router.post(
        "/generate",
        status_code=202,
        response_model=GenerateAccepted,
        responses={
            200: {"model": GenerateResult, "description": "wait=true: the finished job (success true or false)"},
            **{code: errors[code] for code in (413, 429, 503, 507)},
        },
        summary="Queue a lip sync job",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["video", "audio"],
                            "properties": {
                                "video": {"type": "string", "format": "binary", "description": "mp4 avi mov mkv webm"},
                                "audio": {"type": "string", "format": "binary", "description": "mp3 wav m4a aac ogg"},
                                "bbox_shift": {"type": "integer", "minimum": -100, "maximum": 100, "default": 0},
                                "wait": {"type": "boolean", "default": False},
                            },
                        }
                    }
                },
            }
        },
    )
    async def generate(
        request: Request,
        wait: Optional[str] = Query(None, description="true: block until the job finishes (the seed's behaviour)"),
        manager: Manager = Depends(manager_dep),
        owner: Optional[str] = Depends(get_owner),
    ) -> JSONResponse:
        wait_flag = _parse_bool(wait, "wait") if wait is not None else None
        if not is_multipart(request.headers.get("content-type")):
            raise InvalidInputError("Expected a multipart/form-data request with 'video' and 'audio' files")
        if ensure_ready is not None:
            await ensure_ready()  # 503 before anything is stored or read

        job_id, job_dir = await run_in_threadpool(manager.new_upload)  # 429 / 507 before reading the body
        files: dict[str, SavedFile] = {}
        try:
            upload = await receive_multipart(
                request.stream(),
                request.headers.get("content-type"),
                Path(job_dir),
                specs,
                text_fields={"bbox_shift", "wait"},
            )
            files = upload.files
            params = JobParams(bbox_shift=_parse_bbox_shift(upload.fields.get("bbox_shift"), settings.bbox_shift))
            if wait_flag is None:
                wait_flag = _parse_bool(upload.fields.get("wait"), "wait")
            video, audio = files["video"], files["audio"]
            # ffmpeg subprocesses: off the event loop
            await anyio.to_thread.run_sync(validate_media, Path(job_dir) / video.file_name,
                                           Path(job_dir) / audio.file_name, settings)
            record = await run_in_threadpool(
                lambda: manager.submit(
                    job_id,
                    video_file=video.file_name,
                    audio_file=audio.file_name,
                    video_filename=video.display_name,
                    audio_filename=audio.display_name,
                    params=params,
                    owner=owner,
                )
            )
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                try:
                    await run_in_threadpool(manager.discard_upload, job_id)
                except Exception:
                    log.exception("discarding upload %s failed", job_id)
            if isinstance(exc, LipSyncError):
                _scrub(exc, Path(job_dir), files)
            raise

        if wait_flag:
            try:
                record = await manager.wait_async(job_id, timeout=settings.wait_timeout_s)
            except (asyncio.TimeoutError, TimeoutError):
                record = await run_in_threadpool(manager.get, job_id, owner)
            if record.status.finished:
                ok = record.status == JobStatus.completed
                error = None if ok else (record.error or f"Lip sync job {record.status.value}")
                result = GenerateResult(
                    success=ok,
                    job_id=job_id,
                    status=record.status,
                    message="Lip sync completed successfully" if ok else error,
                    output_path=download_name(job_id) if ok else None,
                    download_url=download_url(job_id) if ok else None,
                    status_url=status_url(job_id),
                    error=error,
                )
                return JSONResponse(result.model_dump(mode="json"), status_code=200)

        accepted = GenerateAccepted(
            job_id=job_id,
            status=record.status,
            message="Lip sync job queued" if record.status == JobStatus.queued else "Lip sync job running",
            status_url=status_url(job_id),
            download_url=download_url(job_id),
        )
        return JSONResponse(
            accepted.model_dump(mode="json"), status_code=202, headers={"Location": status_url(job_id)}
        )

    job_errors = {404: errors[404]}

    @router.get("/status/{job_id}", response_model=JobStatusResponse, responses=job_errors, summary="Job status")
    async def status(
        job_id: str, manager: Manager = Depends(manager_dep), owner: Optional[str] = Depends(get_owner)
    ) -> JobStatusResponse:
        record = await run_in_threadpool(manager.get, _checked_id(job_id), owner)
        return job_status(record)

    @router.get(
        "/download/{job_id}",
        response_class=FileResponse,
        responses={200: {"content": {"video/mp4": {}}}, 404: errors[404], 409: errors[409]},
        summary="Download the result video",
    )
    async def download(
        job_id: str, request: Request, manager: Manager = Depends(manager_dep),
        owner: Optional[str] = Depends(get_owner),
    ) -> Response:
        # a local file, a stream from the bucket (Range honoured either way), or a presigned redirect
        stored = await run_in_threadpool(manager.open_output, _checked_id(job_id), owner)
        return object_response(stored, download_name(job_id), range_header=request.headers.get("range"))

    @router.delete(
        "/cleanup/{job_id}",
        response_model=CleanupResponse,
        responses={404: errors[404], 409: errors[409]},
        summary="Remove a job and its files",
    )
    async def cleanup(
        job_id: str, manager: Manager = Depends(manager_dep), owner: Optional[str] = Depends(get_owner)
    ) -> CleanupResponse:
        await run_in_threadpool(manager.cleanup, _checked_id(job_id), owner)
        return CleanupResponse(job_id=job_id)

    @router.post(
        "/cancel/{job_id}",
        response_model=JobStatusResponse,
        responses={404: errors[404], 409: errors[409]},
        summary="Cancel a queued or running job",
    )
    async def cancel(
        job_id: str, manager: Manager = Depends(manager_dep), owner: Optional[str] = Depends(get_owner)
    ) -> JobStatusResponse:
        record = await run_in_threadpool(manager.cancel, _checked_id(job_id), owner)
        return job_status(record)

    @router.get("/jobs", response_model=JobListResponse, summary="List jobs, newest first")
    async def jobs(
        limit: int = Query(100, ge=1, le=1000, description="At most this many jobs"),
        manager: Manager = Depends(manager_dep),
        owner: Optional[str] = Depends(get_owner),
    ) -> JobListResponse:
        records = await run_in_threadpool(lambda: manager.list(owner=owner, limit=limit))
        return JobListResponse(total=len(records), jobs=[JobSummary.from_record(r) for r in records])

    app.include_router(router)
    return app
