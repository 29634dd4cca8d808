"""BentoML services: `LipSync` (API, CPU) in front of `MuseTalkRunner` (models, GPU).

    bentoml serve service:LipSync

Thin on purpose: the work lives in `lipsync_runner` (serving/ for the glue). Heavy
imports happen inside `__init__`, so `bentoml build` can import this file cheaply.
"""

from __future__ import annotations

import asyncio
from datetime import date
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from lipsync_runner.api.auth import BearerAuthMiddleware, is_authenticated, request_owner
from lipsync_runner.api.body_guard import BodyGuard, BodySlots
from lipsync_runner.api.rest import create_rest_app
from lipsync_runner.config import Settings
from lipsync_runner.errors import InvalidInputError
from lipsync_runner.integration.idempotency import IDEMPOTENCY_HEADER, parse_key
from lipsync_runner.serving.bentoml_compat import BentoMLSurface, RunningCore
from lipsync_runner.serving.docs_page import DocsPage
from lipsync_runner.serving.errors import bentoml_errors
from lipsync_runner.serving.signature import job_params_signature
from lipsync_runner.ui import create_ui_app

SETTINGS = Settings()  # every setting, read from the environment once (lipsync_runner/config.py)
REST_PATH = "/api/lip-sync"  # where the REST app is mounted (LIP_SYNC_URL_PREFIX: where clients see it)
# Weights: a models directory when MUSETALK_MODELS_DIR is set (development, a mounted volume),
# else the BentoML model store, which `bentoml build` packs into the Bento (import-models).
MODELS_FROM_STORE = SETTINGS.models_from_store
SERVICE = SETTINGS.service
BATCHING = {"batchable": True, "batch_dim": 0, "max_batch_size": SERVICE.max_batch_size,
            "max_latency_ms": SERVICE.max_latency_ms}


@bentoml.service(
    name="MuseTalkRunner",
    resources={"gpu": 1, "memory": "16Gi"},
    workers=1,  # one model copy per GPU; concurrency comes from batching
    traffic={"timeout": SERVICE.runner_timeout_s, "max_concurrency": 1024},
)
class MuseTalkRunner:
    """Owns MuseTalk's UNet, VAE and Whisper encoder; serves them in merged batches (numpy in/out)."""

    if MODELS_FROM_STORE:
        musetalk_model = bentoml.models.BentoModel(SETTINGS.bento.bento_model)

    def __init__(self) -> None:
        from lipsync_runner.integration import metrics
        from lipsync_runner.serving.runner import RunnerCore

        settings = SETTINGS.runner
        if MODELS_FROM_STORE:
            settings = settings.model_copy(update={"models_dir": Path(self.musetalk_model.path)})
        self.core = RunnerCore(settings)  # loads on a background thread: health answers meanwhile
        self.core.add_observer(metrics.batch_served)

    def __is_ready__(self) -> bool:
        return self.core.ready

    # async: answered on the event loop, never queued behind a running batch
    @bentoml.api
    async def health(self) -> dict[str, Any]:
        return self.core.health()

    @bentoml.api
    async def stats(self) -> dict[str, Any]:
        return self.core.stats.as_dict()

    @bentoml.api(**BATCHING)
    @bentoml_errors
    def prepare(self, crops: np.ndarray) -> np.ndarray:
        """[B, 256, 256, 3] uint8 RGB face crops -> [B, 8, 32, 32] float32 latents."""
        return self.core.prepare(crops)

    @bentoml.api(**BATCHING)
    @bentoml_errors
    def generate(self, packed: np.ndarray) -> np.ndarray:
        """[B, 1 + 8*32*32 + 50*384] float32 (job tag, latents, audio window) -> [B, 256, 256, 3] uint8."""
        return self.core.generate(packed)

    @bentoml.api(**BATCHING)
    @bentoml_errors
    def prepare_generate(self, packed: np.ndarray) -> np.ndarray:
        """[B, 8 + 256*256*3 + 50*384*4] uint8 (job tag, face crop, audio window's float32 bytes) ->
        [B, 256, 256, 3] uint8: prepare and generate in one round trip (serving/packing.py)."""
        return self.core.prepare_generate(packed)

    @bentoml.api(**BATCHING)
    @bentoml_errors
    def prepare_generate_latents(self, packed: np.ndarray) -> np.ndarray:
        """prepare_generate's rows -> [B, 256*256*3 + 8*32*32*4] uint8: each face and its float32 latents'
        bytes (the avatar cache keeps the latents)."""
        return self.core.prepare_generate_latents(packed)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=8, max_latency_ms=SERVICE.max_latency_ms)
    @bentoml_errors
    def audio_pieces(self, pieces: np.ndarray) -> np.ndarray:
        """[P, 480000] 30 s pieces of 16 kHz audio -> [P, 1500, 5, 384] Whisper encoder states."""
        return self.core.audio_pieces(pieces)


# The REST routes, mounted when the class is defined; they reach the running instance's core
# (built in one pass in LipSync.__init__) as BentoML's own class views do.
RUNNING = RunningCore()
# Request bodies being received (api/body_guard.py); readiness fails while every slot is taken.
BODY_SLOTS = BodySlots(SETTINGS.limits.max_bodies_per_client, SETTINGS.limits.max_concurrent_bodies)
rest_app = create_rest_app(RUNNING.operations, RUNNING.health, SETTINGS.limits, debug=SERVICE.debug, live=RUNNING.live)


@bentoml.service(
    name="LipSync",
    workers=1,  # the job manager lives in this process; scale out with replicas and a shared store
    traffic={"timeout": SETTINGS.limits.wait_timeout_s + 60},
)
@bentoml.asgi_app(rest_app, path=REST_PATH)
@bentoml.asgi_app(create_ui_app(), path="/ui")  # the browser page (lipsync_runner/ui)
class LipSync:
    """Lip-sync jobs: upload, status, download, cleanup; REST under /api/lip-sync and BentoML APIs."""

    runner = bentoml.depends(MuseTalkRunner)

    def __init__(self) -> None:
        from lipsync_runner.jobs.logs import configure_service_logging
        from lipsync_runner.serving.core import ServiceCore

        configure_service_logging(SETTINGS)  # LIP_SYNC_LOG_FORMAT=json: one JSON object per line
        self.core = ServiceCore(self.runner, SETTINGS)

    @bentoml.on_startup
    async def _start_jobs(self) -> None:
        self.core.start(asyncio.get_running_loop())

    @bentoml.on_shutdown
    def _stop_jobs(self) -> None:
        self.core.stop()

    async def __is_ready__(self) -> bool:
        if BODY_SLOTS.saturated:  # no request with a body can be read now
            return False
        return bool((await self.core.runner_health()).get("models_loaded"))

    async def __metrics__(self, content: str) -> str:
        from lipsync_runner.integration.metrics import job_counts_text

        return content + job_counts_text(self.core.manager.counts())

    @bentoml.api
    @bentoml_errors
    @job_params_signature(bentoml.Context, defaults={"bbox_shift": SETTINGS.runner.bbox_shift})
    async def generate(self, *, video: Path | None = None, audio: Path | None = None, wait: bool = False,
                       ctx: bentoml.Context = None, **params: Any) -> dict[str, Any]:
        """Queue a lip-sync job (202 with its id); with wait=true, return when it has finished.

        Over HTTP this endpoint is served by the REST route (the upload streams through the one
        admission path: serving/bentoml_compat.py; the Idempotency-Key header travels with it);
        this body runs for calls in process.
        """
        key = parse_key(ctx.request.headers.get(IDEMPOTENCY_HEADER)) if ctx is not None else None
        answer = await self.core.operations.admission.admit_files(video, audio, params, owner=_owner(ctx), wait=wait,
                                                                  idempotency_key=key)
        if ctx is not None:
            ctx.response.status_code = answer.status_code
            for name, value in answer.headers.items():
                ctx.response.headers[name] = value
        return answer.body

    @bentoml.api
    @bentoml_errors
    async def status(self, job_id: str, ctx: bentoml.Context = None) -> dict[str, Any]:
        return await self.core.operations.status(job_id, _owner(ctx))

    @bentoml.api
    @bentoml_errors
    async def download(self, job_id: str, ctx: bentoml.Context = None) -> Path:
        # the REST route's own response: a file, a stream from the bucket (Range too), or a presigned redirect
        return await self.core.operations.download(job_id, _owner(ctx),
                                                   range_header=ctx.request.headers.get("range") if ctx else None)

    @bentoml.api
    @bentoml_errors
    async def cancel(self, job_id: str, ctx: bentoml.Context = None) -> dict[str, Any]:
        return await self.core.operations.cancel(job_id, _owner(ctx))

    @bentoml.api
    @bentoml_errors
    async def cleanup(self, job_id: str, ctx: bentoml.Context = None) -> dict[str, Any]:
        return await self.core.operations.cleanup(job_id, _owner(ctx))

    @bentoml.api
    @bentoml_errors
    async def jobs(self, limit: int = 100, ctx: bentoml.Context = None) -> dict[str, Any]:
        return await self.core.operations.jobs(_owner(ctx), limit)

    @bentoml.api
    @bentoml_errors
    async def usage(self, since: str | None = None, until: str | None = None,
                    ctx: bentoml.Context = None) -> dict[str, Any]:
        """The caller's own usage by UTC day (YYYY-MM-DD bounds; the last 30 days by default)."""
        return await self.core.operations.usage(_owner(ctx), _day(since, "since"), _day(until, "until"))

    @bentoml.api
    async def health(self, ctx: bentoml.Context = None) -> dict[str, Any]:
        return await self.core.health(authenticated=ctx is None or is_authenticated(ctx.request.scope))


def _owner(ctx: bentoml.Context | None) -> str | None:
    return request_owner(ctx.request.scope) if ctx is not None else None


def _day(value: str | None, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidInputError(f"Invalid {name}: expected a UTC day as YYYY-MM-DD") from None


# Outermost: the product's API reference at / and /docs.json (public, like BentoML's stock page it replaces).
LipSync.add_asgi_middleware(DocsPage, rest_prefix=REST_PATH, auth=SETTINGS.auth.enabled)
# Then: requests without a valid token are refused before anything else runs.
LipSync.add_asgi_middleware(BearerAuthMiddleware)
# Then: every small body (JSON, forms) is read whole, promptly, in a bounded per-client slot.
LipSync.add_asgi_middleware(BodyGuard, limits=SETTINGS.limits, slots=BODY_SLOTS)
# BentoML's side answers like the REST API: its generate streams through the REST route (one
# admission path, no buffered uploads), errors are JSON in one vocabulary, probes say what they mean.
LipSync.add_asgi_middleware(BentoMLSurface, rest_generate_path=f"{REST_PATH}/generate",
                            input_models={f"/{name}": api.input_spec for name, api in LipSync.apis.items()})
