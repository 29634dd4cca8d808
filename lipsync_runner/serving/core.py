"""The CPU side of the service, built once: job store and storage, integration, the executor,
the job manager, the operations both API surfaces call, and the REST app over them.

`ServiceCore` is what the BentoML `LipSync` service owns (service.py). Everything is built here,
in one pass, each part handed what it needs; nothing is filled in afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from lipsync_runner import __version__
from lipsync_runner.api.operations import JobOperations
from lipsync_runner.api.rest import create_rest_app
from lipsync_runner.config import Settings
from lipsync_runner.errors import ModelsNotReadyError
from lipsync_runner.integration.services import Integration
from lipsync_runner.jobs.manager import JobManager, default_replica_id
from lipsync_runner.jobs.store import JobStore
from lipsync_runner.jobs.store_factory import open_store
from lipsync_runner.pipeline.avatar_cache import AvatarCache
from lipsync_runner.pipeline.job import configure_opencv
from lipsync_runner.pipeline.scratch_disk import ScratchLedger
from lipsync_runner.media.credentials import ContentSigner
from lipsync_runner.serving.executor import JobExecutor
from lipsync_runner.serving.live import LiveSources
from lipsync_runner.serving.preview import Previewer
from lipsync_runner.serving.remote import RunnerLink
from lipsync_runner.storage.factory import open_storage
from lipsync_runner.storage.job_files import JobFiles

log = logging.getLogger(__name__)


class ServiceCore:
    def __init__(self, runner: Any, settings: Settings | None = None, *,
                 integration: Integration | None = None) -> None:
        self.settings = settings = settings or Settings()
        s = settings.service
        configure_opencv(settings.runner)  # this process runs the pipeline around the runner
        data_dir = Path(s.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.runner = runner
        self.link = RunnerLink(runner)  # its health, and how jobs submit arrays to it
        self.files = JobFiles(data_dir)  # uploads in progress and the workers' scratch (always local)
        self.store = open_store(s.database_url.get_secret_value() if s.database_url else None, data_dir,
                                pool_size=s.job_workers + 8)
        self.storage = open_storage(s.storage_url, self.files, endpoint_url=s.s3_endpoint_url,
                                    presigned_downloads=s.presigned_downloads, presign_expiry_s=s.presigned_expiry_s)
        self.avatars = (AvatarCache(s.avatar_cache_dir or data_dir / "avatars",
                                    max_bytes=int(s.avatar_cache_gb * 2**30),
                                    max_owner_bytes=s.avatar_cache_bytes_per_owner)
                        if s.avatar_cache else None)
        replica_id = default_replica_id()
        # webhooks, Idempotency-Key, URL inputs' policy, queue ETA, usage: their own tables, in the
        # job database when it is shared (SQLite in the data directory otherwise)
        self.integration = integration or Integration(
            data_dir, records=self.store, download_url=download_url(settings.limits.url_prefix),
            workers=s.job_workers, settings=settings.integration, webhooks=settings.webhooks, fetch=settings.fetch,
            outbound=settings.outbound,
            **_integration_stores(self.store, replica_id, s.lease_s))
        # Disk held for running jobs' scratch (frame store, output): admission and job start check it.
        # Always the local data directory: with a bucket too, jobs run in local scratch.
        self.scratch = ScratchLedger(data_dir, floor_bytes=s.free_space_floor_mb * 2**20)
        self.executor = JobExecutor(settings, runner=self.link, files=self.files, scratch=self.scratch,
                                    integration=self.integration, avatars=self.avatars,
                                    credentials=ContentSigner.from_settings(settings.credentials, data_dir))
        self.manager = JobManager(
            self.store, self.files, self.executor, storage=self.storage, workers=s.job_workers,
            retention_s=s.retention_s, max_attempts=s.max_attempts, sweep_interval_s=s.sweep_interval_s,
            max_queued=s.max_queued_jobs, max_queued_per_owner=s.queued_jobs_per_owner,
            max_running_per_owner=s.max_running_jobs_per_owner,
            free_space_floor_bytes=s.free_space_floor_mb * 2**20, debug=s.debug,
            lease_s=s.lease_s, poll_s=s.queue_poll_s, replica_id=replica_id,
            on_removed=self.avatars.release_job if self.avatars is not None else None,
            on_event=self.integration.on_job_event)
        avatar_room = None if self.avatars is None else self.avatars.check_room_for_avatar
        self.previewer = Previewer(settings, self.executor)  # POST /preview: beside the workers, bounded
        self.operations = JobOperations(self.manager, settings.limits, ensure_ready=self.ensure_ready,
                                        integration=self.integration, scratch=self.scratch,
                                        avatars_enabled=self.avatars is not None, avatar_room=avatar_room,
                                        defaults={"bbox_shift": settings.runner.bbox_shift},
                                        previewer=self.previewer)
        self.live = LiveSources(settings, executor=self.executor, manager=self.manager, scratch_dir=data_dir / "live")
        self.rest_app: FastAPI = create_rest_app(self.operations, self.health, settings.limits, debug=s.debug,
                                                 live=lambda: self.live)
        self.auth_enabled = settings.auth.enabled
        self._stop = threading.Event()
        self._started = time.time()

    # ------------------------------------------------------------------ lifecycle

    def start(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.link.loop = loop
        self.integration.start()  # before the manager: recovered jobs' events find it ready
        self.manager.start()
        if self.avatars is not None:  # every replica's own cache: expired here, not by the shared sweeper
            threading.Thread(target=self._expire_avatars, name="avatar-expiry", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.manager.close()
        self.integration.stop()

    def _expire_avatars(self) -> None:
        s = self.settings.service
        while True:
            try:  # avatars' entries go with their records; a pin left by a crash is dropped here
                self.avatars.expire(s.retention_s, live=lambda avatar_id: self.store.get(avatar_id) is not None)
                if self.store.shared:  # jobs cleaned up through another replica: their entries here go too
                    self.avatars.release_missing(lambda job_id: self.store.get(job_id) is not None)
            except Exception:
                log.exception("avatar cache expiry failed")
            if self._stop.wait(s.sweep_interval_s):
                return

    # ------------------------------------------------------------------ health

    async def runner_health(self) -> dict[str, Any]:
        return await self.link.health()

    async def health(self, *, authenticated: bool = True) -> dict[str, Any]:
        """The health body; job counts (all tenants') only for a caller with a token, or with auth off."""
        runner = await self.link.health()
        body = {
            "status": "ready" if runner.get("models_loaded") else runner.get("status", "unavailable"),
            "models_loaded": bool(runner.get("models_loaded")),
            "device": runner.get("device"),
            "model_version": runner.get("model_version"),
            "error": runner.get("error"),
            "version": __version__,
            "uptime_s": round(time.time() - self._started, 1),
            "auth": self.auth_enabled,
            "ui": "/ui/",
        }
        if authenticated:
            body["jobs"] = await asyncio.to_thread(self.manager.counts)
        return body

    async def ensure_ready(self) -> None:
        """503 (seed: 'Lip sync service not available') unless the models are loaded."""
        runner = await self.link.health()
        if not runner.get("models_loaded"):
            reason = runner.get("error") or f"models are {runner.get('status', 'unavailable')}"
            raise ModelsNotReadyError(f"Models not loaded: {reason}")


def download_url(url_prefix: str):
    """A job's download URL as clients see it (status bodies, webhooks)."""
    prefix = url_prefix.rstrip("/")
    return lambda job_id: f"{prefix}/download/{job_id}"


def _integration_stores(store: JobStore, replica_id: str, lease_s: float) -> dict[str, Any]:
    """The PostgreSQL outbox, key store and ledger on the job store's pool, when it is PostgreSQL."""
    if not store.shared:
        return {}
    from lipsync_runner.integration.postgres import PostgresIdempotencyStore, PostgresUsageLedger, PostgresWebhookOutbox

    return {"outbox": PostgresWebhookOutbox(store),
            "key_store": PostgresIdempotencyStore(store, holder=replica_id, lease_s=lease_s),
            "ledger": PostgresUsageLedger(store)}
