"""The one admission path of a lip-sync job, for both API surfaces.

    ready? (503) -> Idempotency-Key reserved (409 while another request holds it)
    -> upload slot for this client (429) -> (an avatar: room in the avatar cache, 507)
    -> job slot: queue and disk (429, 507)
    -> receive the inputs into the job's directory (streamed; 400, 408, 413, 507)
    -> job parameters from JobParams (400), URLs and webhook checked (400)
    -> each input an upload or a URL, not both (400) -> the uploads by content (400, 413)
    -> submit (queued) -> the key names the job -> optionally wait -> the response body

An input given by URL (``video_url``/``audio_url``) is not fetched here: a reference file
stands for it in the job's directory (inputs/reference.py) and the worker fetches it with
the upload limits. A request whose Idempotency-Key already names a job reads its body into
scratch space only to compare it with the original (200 and the original job, or 409).

An avatar (``POST /api/lip-sync/avatars``: api/avatars.py) is admitted on the same path with
``kind=avatar``: a video (upload or ``video_url``) and the preparation's parameters, no audio.
A generate by ``avatar_id`` takes the caller's ready avatar (404, 409) in place of a video.

The REST route `POST /api/lip-sync/generate` streams its multipart body through here, and
so does BentoML's `POST /generate` (serving/bentoml_compat.py routes it to the REST route
before BentoML would buffer the upload). A `generate` called in process hands over files
that are already on disk (`admit_files`). Everything after "receive" is the same code, so
the surfaces cannot drift: same checks, same errors, same bodies.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from starlette.concurrency import run_in_threadpool

from lipsync_runner.errors import InvalidInputError, JobNotFoundError, LipSyncError, QueueFullError
from lipsync_runner.integration.idempotency import (
    REPLAYED_HEADER,
    IdempotencyInProgressError,
    Reservation,
    file_digest,
    request_fingerprint,
)
from lipsync_runner.inputs.validation import media_summary
from lipsync_runner.inputs.reference import url_display_name, write_avatar_reference, write_reference
from lipsync_runner.jobs.front import Manager
from lipsync_runner.jobs.records import JobKind, JobRecord, JobStatus
from lipsync_runner.jobs.logs import log_job_event
from lipsync_runner.params import JobParams, parse_avatar_fields, parse_fields
from lipsync_runner.pipeline.scratch_disk import ScratchLedger
from lipsync_runner.jobs import avatars
from lipsync_runner.config import ApiLimits
from lipsync_runner.jobs.schemas import AvatarAccepted, GenerateAccepted, GenerateResult, download_name
from lipsync_runner.media.thumbnails import THUMBNAIL_NAME, THUMBNAIL_WIDTH, write_thumbnail
from lipsync_runner.api.uploads import (
    SavedFile,
    UploadGuard,
    is_json,
    is_multipart,
    is_urlencoded,
    receive_json,
    receive_multipart,
    receive_urlencoded,
)
from lipsync_runner.inputs.validation import validate_audio, validate_media, validate_video

if TYPE_CHECKING:
    from lipsync_runner.integration.services import Integration

log = logging.getLogger(__name__)
events_log = logging.getLogger("lipsync_runner.jobs.events")

VIDEO_FIELD, AUDIO_FIELD = "video", "audio"
INPUTS = (VIDEO_FIELD, AUDIO_FIELD)
NOT_AN_AVATAR_FORM = ("Expected a multipart/form-data request with a 'video' file, or a body with video_url "
                      "(application/json or a form)")
NOT_A_FORM = ("Expected a multipart/form-data request with 'video' and 'audio' files, or a body of job "
              "parameters with video_url and audio_url (application/json or a form)")


@dataclass
class Response:
    """A generate answer, the same for both surfaces."""

    status_code: int
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class PreviewRequest:
    """A preview's checked inputs (Admission.receive_preview)."""

    video: Path
    audio: Path
    params: JobParams
    at: float | None  # seconds of the output; None: where the dubbing starts
    video_name: str | None  # as the user sent them (for messages)
    audio_name: str | None


class UploadSlots:
    """Uploads in progress, bounded per client and in all (429 beyond).

    A slow upload holds its slot only as long as the upload guard lets it (idle timeout,
    minimum rate), and one client's uploads can never take every slot: a hundred slow
    connections from one client get 429s for that client, everyone else still gets in.
    """

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = total
        self._by_client: Counter[str] = Counter()

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        # one event loop: no await between the check and the increment, so no lock is needed
        if self._by_client[client] >= self.per_client:
            raise QueueFullError(f"too many uploads in progress from this client (at most {self.per_client} at "
                                 "once); wait for one to finish", retry_after_s=10)
        if sum(self._by_client.values()) >= self.total:
            raise QueueFullError(f"the server is receiving {self.total} uploads already; try again shortly",
                                 retry_after_s=10)
        self._by_client[client] += 1
        try:
            yield
        finally:
            self._by_client[client] -= 1
            if self._by_client[client] <= 0:
                del self._by_client[client]


class Admission:
    def __init__(self, manager: Manager, limits: ApiLimits, *, defaults: dict[str, Any] | None = None,
                 ensure_ready: Callable[[], Awaitable[None]] | None = None,
                 status_url: Callable[[str], str], download_url: Callable[[str], str],
                 integration: Integration | None = None, scratch: ScratchLedger | None = None,
                 avatar_url: Callable[[str], str] | None = None, avatars_enabled: bool = True,
                 avatar_room: Callable[[str | None], None] | None = None) -> None:
        self.manager = manager
        self.avatar_url = avatar_url or (lambda avatar_id: f"{limits.url_prefix.rstrip('/')}/avatars/{avatar_id}")
        self.avatars_enabled = avatars_enabled  # False without an avatar cache (where avatars are stored)
        self.avatar_room = avatar_room  # raises InsufficientStorageError (507) when no avatar of this owner fits
        self.scratch = scratch  # the data directory's scratch reservations (507 when a job cannot fit)
        self.limits = limits
        self.ensure_ready = ensure_ready
        self.status_url = status_url
        self.download_url = download_url
        self.integration = integration  # None: no webhooks, no Idempotency-Key (refused with 400)
        self.slots = UploadSlots(limits.max_uploads_per_client, limits.max_concurrent_uploads)
        self.defaults = dict(defaults or {})  # the deployment's own defaults (LIP_SYNC_BBOX_SHIFT)

    # ------------------------------------------------------------------ the two entries

    async def admit_stream(self, stream: AsyncIterator[bytes], content_type: str | None, *, owner: str | None,
                           client: str, wait: bool | None = None, idempotency_key: str | None = None,
                           kind: JobKind = JobKind.job) -> Response:
        """A multipart/form-data body (`video`, `audio` files or URL fields, and the job parameters as
        fields), or job parameters alone (inputs by URL): a JSON object, or a urlencoded form.
        ``kind=avatar``: an avatar's body (POST /avatars): the video and the preparation's parameters."""
        if kind is JobKind.avatar and not self.avatars_enabled:
            raise InvalidInputError(avatars.DISABLED)
        if is_json(content_type) or is_urlencoded(content_type):  # no files: inputs by URL
            if self.ensure_ready is not None:
                await self.ensure_ready()
            receive_body = receive_json if is_json(content_type) else receive_urlencoded
            fields = _no_files(await receive_body(stream, idle_timeout_s=self.limits.upload_idle_timeout_s))

            async def receive_fields(job_dir: Path, guard: UploadGuard) -> tuple[dict[str, SavedFile], dict[str, Any]]:
                return {}, fields

            return await self._admit(receive_fields, owner=owner, client=client, wait=wait,
                                     idempotency_key=idempotency_key, ready=True, kind=kind)
        if not is_multipart(content_type):  # before any slot is taken or byte read
            raise InvalidInputError(NOT_A_FORM if kind is JobKind.job else NOT_AN_AVATAR_FORM)

        async def receive(job_dir: Path, guard: UploadGuard) -> tuple[dict[str, SavedFile], dict[str, str]]:
            upload = await receive_multipart(stream, content_type, job_dir, guard=guard,
                                             text_fields=_TEXT_FIELDS, required_files=())
            return upload.files, upload.fields

        return await self._admit(receive, owner=owner, client=client, wait=wait, idempotency_key=idempotency_key,
                                 kind=kind)

    async def admit_files(self, video: Path | None, audio: Path | None, fields: Mapping[str, Any], *,
                          owner: str | None, video_name: str | None = None, audio_name: str | None = None,
                          wait: bool | None = None, idempotency_key: str | None = None) -> Response:
        """Files already on disk (a `generate` called in process); an input left out comes from its URL field."""
        async def receive(job_dir: Path, guard: UploadGuard) -> tuple[dict[str, SavedFile], dict[str, Any]]:
            saved = {}
            for field, path, name in ((VIDEO_FIELD, video, video_name), (AUDIO_FIELD, audio, audio_name)):
                if path is None:
                    continue
                file = guard.saved_file(field, name or path.name)
                size = path.stat().st_size
                guard.check_size(field, size)
                await run_in_threadpool(shutil.copyfile, path, job_dir / file.file_name)
                file.size = size
                saved[field] = file
            return saved, dict(fields)

        return await self._admit(receive, owner=owner, client=owner or "local", wait=wait,
                                 idempotency_key=idempotency_key)

    async def receive_preview(self, stream: AsyncIterator[bytes], content_type: str | None, job_dir: Path, *,
                              owner: str | None, client: str) -> PreviewRequest:
        """A preview's request (POST /preview): generate's multipart body plus ``at``, received into
        ``job_dir`` and checked exactly as generate's (503, 429, 400, 408, 413, 507; the caller's ready
        avatar by avatar_id, 404/409), but nothing is submitted: the caller renders it at once."""
        if self.ensure_ready is not None:
            await self.ensure_ready()
        if not is_multipart(content_type):
            raise InvalidInputError("Expected a multipart/form-data request with 'video' and 'audio' files "
                                    "(or avatar_id for the video)")
        files: dict[str, SavedFile] = {}
        try:
            with self.slots.hold(client):
                guard = UploadGuard(self.limits, check_space=self.manager.check_free_space)
                upload = await receive_multipart(stream, content_type, job_dir, guard=guard,
                                                 text_fields=_TEXT_FIELDS | {"at"}, required_files=())
            files, fields = upload.files, dict(upload.fields)
            at = _parse_at(fields.pop("at", None))
            _, _, avatar, params = await self._request(self.manager, files, fields, None, JobKind.job, owner)
            inputs = _inputs(files, params, avatar, JobKind.job)
            urls = [f"{field}_url" for field, given in inputs.items() if isinstance(given, str)]
            if urls:  # a preview answers at once: no fetching of URLs on the request's time
                raise InvalidInputError(f"{urls[0]}: a preview takes uploaded files (and avatar_id), not URLs")
            avatar_video = None
            if avatar is not None:
                avatar_video = await run_in_threadpool(avatars.stored_video, self.manager, avatar, owner)
            await anyio.to_thread.run_sync(self._check_uploads, job_dir, files, params, avatar_video, None)
        except LipSyncError as exc:
            _scrub(exc, job_dir, files)
            raise
        video = job_dir / files[VIDEO_FIELD].file_name if VIDEO_FIELD in files else avatar_video
        return PreviewRequest(video=video, audio=job_dir / files[AUDIO_FIELD].file_name, params=params, at=at,
                              video_name=files[VIDEO_FIELD].display_name if VIDEO_FIELD in files else None,
                              audio_name=files[AUDIO_FIELD].display_name)

    # ------------------------------------------------------------------ the path

    async def _admit(self, receive, *, owner: str | None, client: str, wait: bool | None,
                     idempotency_key: str | None = None, ready: bool = False,
                     kind: JobKind = JobKind.job) -> Response:
        if self.ensure_ready is not None and not ready:
            await self.ensure_ready()  # 503 before anything is stored or read
        manager = self.manager
        reservation = None
        if idempotency_key is not None:
            if self.integration is None:
                raise InvalidInputError("Idempotency-Key is not supported by this server")
            # before any slot is taken or byte read: a second request with the key is answered at once
            reservation = await run_in_threadpool(self.integration.keys.reserve, owner, idempotency_key)
        try:
            with self.slots.hold(client):
                if reservation is not None and not reservation.owned:
                    return await self._replay(manager, receive, reservation, owner, wait, kind)
                record, wait_flag = await self._receive_and_submit(manager, receive, owner, reservation, wait, kind)
        except BaseException:
            if reservation is not None:
                with anyio.CancelScope(shield=True):
                    await run_in_threadpool(self.integration.keys.release, reservation)
            raise
        if wait_flag:
            return await self._wait(manager, record, owner)
        return self.accepted(record)

    async def _receive_and_submit(self, manager: Manager, receive, owner: str | None,
                                  reservation: Reservation | None, wait: bool | None,
                                  kind: JobKind = JobKind.job) -> tuple[JobRecord, bool]:
        if kind is JobKind.avatar and self.avatar_room is not None:
            await run_in_threadpool(self.avatar_room, owner)  # 507 before anything is stored or read
        # 429 / 507 before the body; an owner (a scoped token) meets its own share of the queue too,
        # while an unscoped deployment (owner None: one tenant) meets only the global limit
        job_id, job_dir = await run_in_threadpool(manager.new_upload, *(() if owner is None else (owner,)))
        job_dir = Path(job_dir)
        files: dict[str, SavedFile] = {}
        try:
            guard = UploadGuard(self.limits, check_space=manager.check_free_space)
            files, fields = await receive(job_dir, guard)
            wait_flag, asked, avatar, params = await self._request(manager, files, fields, wait, kind, owner)
            inputs = _inputs(files, params, avatar, kind)
            names: dict[str, str | None] = {AUDIO_FIELD: None}
            shown: dict[str, str | None] = {AUDIO_FIELD: None}
            for field, given in inputs.items():
                if isinstance(given, SavedFile):
                    names[field], shown[field] = given.file_name, given.display_name
                elif isinstance(given, JobRecord):  # an avatar: the worker uses its stored video
                    names[field], shown[field] = write_avatar_reference(job_dir, given.job_id), given.video_filename
                else:  # a URL: the worker fetches it
                    names[field] = write_reference(job_dir, field, given)
                    shown[field] = url_display_name(given, field)
            avatar_video = avatar_thumbnail = None
            if avatar is not None:  # its files, from wherever they are stored
                avatar_video = await run_in_threadpool(avatars.stored_video, manager, avatar, owner)
                avatar_thumbnail = await run_in_threadpool(avatars.stored_thumbnail, manager, avatar, owner)
            media = await anyio.to_thread.run_sync(self._check_uploads, job_dir, files, params,
                                                   avatar_video, avatar_thumbnail)  # ffmpeg: off the loop
            fingerprint = (await anyio.to_thread.run_sync(_fingerprint, asked, job_dir, files, kind)
                           if reservation is not None else None)
            extra = {"kind": kind} if kind is not JobKind.job else {}
            record = await run_in_threadpool(lambda: manager.submit(
                job_id, video_file=names[VIDEO_FIELD], audio_file=names[AUDIO_FIELD],
                video_filename=shown[VIDEO_FIELD], audio_filename=shown[AUDIO_FIELD],
                params=params, owner=owner, media=media, **extra))
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                try:
                    await run_in_threadpool(manager.discard_upload, job_id)
                except Exception:
                    log.exception("discarding upload %s failed", job_id)
            if isinstance(exc, LipSyncError):
                _scrub(exc, job_dir, files)
            raise
        if reservation is not None:
            assert self.integration is not None and fingerprint is not None
            await run_in_threadpool(self.integration.keys.complete, reservation, fingerprint, job_id)
        if avatar is not None:  # each use keeps the avatar for another retention period
            try:
                await run_in_threadpool(manager.extend_expiry, avatar.job_id)
            except Exception:
                log.warning("avatar %s: could not extend its expiry", avatar.job_id, exc_info=True)
        log_job_event(events_log, record, "queued")
        return record, wait_flag

    async def _request(self, manager: Manager, files: Mapping[str, SavedFile], fields: Mapping[str, Any],
                       wait: bool | None, kind: JobKind,
                       owner: str | None) -> tuple[bool, JobParams, JobRecord | None, JobParams]:
        """``(wait, the parameters as asked, the avatar named by avatar_id, the job's parameters)``."""
        if kind is JobKind.avatar:
            params = self._avatar_params(fields)
            return False, params, None, params
        wait_flag, asked = self._params(fields, wait)
        if asked.avatar_id is None:
            return wait_flag, asked, None, asked
        if not self.avatars_enabled:
            raise InvalidInputError(avatars.DISABLED)
        _inputs(files, asked, None, kind, check_avatar=False)  # the request's own shape first (400)
        avatar = await run_in_threadpool(avatars.ready_avatar, manager, asked.avatar_id, owner)  # 404 / 409
        given = {name for name, value in fields.items() if value not in (None, "", "null")}
        return wait_flag, asked, avatar, avatars.inherit(asked, avatar, given)

    def _params(self, fields: Mapping[str, Any], wait: bool | None) -> tuple[bool, JobParams]:
        """``wait`` (the query's, if given, else the field's) and the job parameters, checked."""
        wait_flag = wait if wait is not None else _parse_bool(fields.get("wait"), "wait")
        params = parse_fields({k: v for k, v in fields.items() if k != "wait"}, self.defaults)
        if self.integration is not None:
            self.integration.check_params(params)
        elif params.webhook_url is not None:
            raise InvalidInputError("webhook_url: this server does not send webhooks")
        return wait_flag, params

    def _avatar_params(self, fields: Mapping[str, Any]) -> JobParams:
        params = parse_avatar_fields(fields, self.defaults)
        if self.integration is not None:
            self.integration.check_params(params)  # video_url: shape and the allow-list, as for a job
        return params

    def _check_uploads(self, job_dir: Path, files: dict[str, SavedFile], params: JobParams,
                       avatar_video: Path | None = None,
                       avatar_thumbnail: Path | None = None) -> dict[str, Any] | None:
        """The uploaded inputs (and an avatar's stored video) by content and limits; with both at hand,
        the job's scratch need too (413/507). A URL input, and then the pair, is checked by the worker
        once fetched."""
        video = files.get(VIDEO_FIELD)
        audio = files.get(AUDIO_FIELD)
        video_path = job_dir / video.file_name if video is not None else avatar_video
        if video_path is not None and audio is not None:
            video_info, audio_info = validate_media(video_path, job_dir / audio.file_name,
                                                    self.limits, self.scratch, params=params)
        else:
            video_info = validate_video(video_path, self.limits) if video_path is not None else None
            audio_info = validate_audio(job_dir / audio.file_name, self.limits) if audio else None
        if video is not None and video_info is not None:
            write_thumbnail(job_dir / video.file_name, job_dir / THUMBNAIL_NAME, THUMBNAIL_WIDTH, video_info.demuxer,
                            max_pixels=self.limits.max_video_pixels)
        elif avatar_thumbnail is not None:  # a job by avatar_id shows the avatar's picture
            shutil.copyfile(avatar_thumbnail, job_dir / THUMBNAIL_NAME)
        return media_summary(video_info, audio_info) if video_info or audio_info else None

    async def _replay(self, manager: Manager, receive, reservation: Reservation, owner: str | None,
                      wait: bool | None, kind: JobKind = JobKind.job) -> Response:
        """The key already names a job: the original job (200) if this request is the same one, else 409."""
        assert self.integration is not None
        scratch = Path(await run_in_threadpool(
            lambda: tempfile.mkdtemp(prefix="replay-", dir=self.integration.scratch_dir)))
        files: dict[str, SavedFile] = {}
        try:
            guard = UploadGuard(self.limits, check_space=manager.check_free_space)
            files, fields = await receive(scratch, guard)
            if kind is JobKind.avatar:
                wait_flag, params = False, self._avatar_params(fields)
            else:
                wait_flag, params = self._params(fields, wait)
            _inputs(files, params, None, kind, check_avatar=False)
            fingerprint = await anyio.to_thread.run_sync(_fingerprint, params, scratch, files, kind)
        except LipSyncError as exc:
            _scrub(exc, scratch, files)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(shutil.rmtree, scratch, True)
        job_id = self.integration.keys.replayed_job(reservation, fingerprint)  # 409 for another request
        try:
            record = await run_in_threadpool(manager.get, job_id, owner)
        except JobNotFoundError:
            # removed while the key still named it (cleanup forgets keys; this is the race in between)
            await run_in_threadpool(self.integration.key_store.forget_job, job_id)
            raise IdempotencyInProgressError(
                "The job this Idempotency-Key created no longer exists; retry to create a new one",
                retry_after_s=1) from None
        answer = await self._wait(manager, record, owner) if wait_flag else self.accepted(record)
        answer.status_code = 200
        answer.headers[REPLAYED_HEADER] = "true"
        return answer

    async def _wait(self, manager: Manager, record: JobRecord, owner: str | None) -> Response:
        try:
            record = await manager.wait_async(record.job_id, timeout=self.limits.wait_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            record = await run_in_threadpool(manager.get, record.job_id, owner)
        if not record.status.finished:
            return self.accepted(record)  # the wait ran out first: like an asynchronous submit
        job_id = record.job_id
        ok = record.status == JobStatus.completed
        error = None if ok else (record.error or f"Lip sync job {record.status.value}")
        result = GenerateResult(
            success=ok, job_id=job_id, status=record.status,
            message="Lip sync completed successfully" if ok else error,
            output_path=download_name(job_id, record.params.output_format) if ok else None,
            download_url=self.download_url(job_id) if ok else None,
            status_url=self.status_url(job_id), error=error)
        return Response(200, result.model_dump(mode="json"), {})

    def accepted(self, record: JobRecord) -> Response:
        job_id = record.job_id
        if record.kind is JobKind.avatar:
            body = AvatarAccepted(avatar_id=job_id, status=record.status, status_url=self.avatar_url(job_id),
                                  message="Avatar queued: its face track and latents are prepared once; "
                                          "generate with avatar_id once its status is completed")
            return Response(202, body.model_dump(mode="json"), {"Location": self.avatar_url(job_id)})
        accepted = GenerateAccepted(
            job_id=job_id, status=record.status,
            message="Lip sync job queued" if record.status == JobStatus.queued else "Lip sync job running",
            status_url=self.status_url(job_id), download_url=self.download_url(job_id))
        return Response(202, accepted.model_dump(mode="json"), {"Location": self.status_url(job_id)})


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}
#: Form fields collected as text: the job parameters, and the request's own options.
_TEXT_FIELDS = frozenset({*JobParams.model_fields, "wait"})


def _parse_bool(value: Any, name: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    v = str(value).strip().strip('"').lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise InvalidInputError(f"Invalid {name}: expected true or false, got {str(value)[:20]!r}")


MAX_AT_SECONDS = 86_400.0


def _parse_at(value: Any) -> float | None:
    """A preview's ``at`` field: seconds of the output, >= 0 (None: not given)."""
    if value in (None, "", "null"):
        return None
    try:
        at = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"Invalid parameters: at: {str(value)[:20]!r} is not a number of seconds") from None
    if not 0 <= at <= MAX_AT_SECONDS:  # NaN fails both
        raise InvalidInputError(f"Invalid parameters: at: {at:g} must be between 0 and {MAX_AT_SECONDS:g} seconds")
    return at


def parse_wait(value: str | None) -> bool | None:
    """The `wait` query parameter (None: not given, the form field may say)."""
    return None if value is None else _parse_bool(value, "wait")


def _inputs(files: Mapping[str, SavedFile], params: JobParams, avatar: JobRecord | None = None,
            kind: JobKind = JobKind.job, *, check_avatar: bool = True) -> dict[str, SavedFile | str | JobRecord]:
    """Each input is an upload or a URL (or, for a job's video, an avatar): exactly one (400 otherwise).
    An avatar has a video and no audio. ``check_avatar=False``: ``avatar_id`` is not looked up (a replay
    only compares the request)."""
    if kind is JobKind.avatar and AUDIO_FIELD in files:
        raise InvalidInputError("An avatar is a video only: leave the audio out (give it to each generate)")
    inputs: dict[str, SavedFile | str | JobRecord] = {}
    missing = []
    for field in INPUTS if kind is JobKind.job else (VIDEO_FIELD,):
        url = getattr(params, f"{field}_url")
        by_avatar = field == VIDEO_FIELD and params.avatar_id is not None
        if field in files and url is not None:
            raise InvalidInputError(f"Give the {field} as a '{field}' file or as {field}_url, not both")
        if by_avatar and field in files:
            raise InvalidInputError("Give avatar_id or a 'video' file, not both (the avatar is the video)")
        if field in files:
            inputs[field] = files[field]
        elif url is not None:
            inputs[field] = url
        elif by_avatar:
            if check_avatar:
                assert avatar is not None
                inputs[field] = avatar
        else:
            missing.append(field)
    if missing:
        names = ", ".join(repr(m) for m in missing)
        urls = " / ".join(f"{m}_url" for m in missing)
        also = " or avatar_id" if VIDEO_FIELD in missing and kind is JobKind.job else ""
        raise InvalidInputError(f"Missing required file field(s): {names} (or give {urls}{also} instead)")
    empty = [f for f in files.values() if f.size == 0]
    if empty:
        raise InvalidInputError(f"The uploaded {empty[0].field} file is empty")
    return inputs


def _fingerprint(params: JobParams, job_dir: Path, files: Mapping[str, SavedFile],
                 kind: JobKind = JobKind.job) -> str:
    """What makes a retried request the same one: every parameter as asked (URLs, avatar_id included),
    the uploads' bytes, and (an avatar) what is created."""
    digests = {field: file_digest(job_dir / f.file_name) for field, f in files.items()}
    if kind is not JobKind.job:
        digests["kind"] = kind.value
    return request_fingerprint(params, digests)


def _no_files(body: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a body without file parts (JSON, urlencoded); ``"video": null`` means not given."""
    sent = [f for f in INPUTS if body.get(f) not in (None, "", "null")]
    if sent:
        raise InvalidInputError(f"This body cannot carry files ({', '.join(sent)}): upload them as "
                                "multipart/form-data, or give video_url and audio_url")
    return {k: v for k, v in body.items() if k not in INPUTS}


def _scrub(exc: LipSyncError, job_dir: Path, files: dict[str, SavedFile]) -> None:
    """Name files as the user knows them and drop any server path from a message."""
    msg = exc.message
    for root in {str(job_dir), str(job_dir.resolve())}:
        msg = msg.replace(root + "/", "").replace(root, "")
    for saved in files.values():
        msg = msg.replace(saved.file_name, saved.display_name)
    exc.message = msg
    exc.args = (msg,)
