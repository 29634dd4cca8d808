"""The GPU side: MuseTalk loaded once, its calls served in merged batches.

The BentoML runner service (service.py) is a thin shell over `RunnerCore`. Models load
on a background thread so the process answers health checks meanwhile (readyz 503,
health says "loading", or "error" with the reason when loading failed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import LipSyncError, ModelsNotReadyError
from ..musetalk import MuseTalk
from ..settings import RunnerSettings
from .packing import unpack_generate

log = logging.getLogger(__name__)


@dataclass
class BatchStats:
    """What the batcher did: the proof that concurrent jobs share GPU batches."""

    batches: Counter = field(default_factory=Counter)  # endpoint -> batches served
    rows: Counter = field(default_factory=Counter)  # endpoint -> frames (or pieces) served
    max_rows: Counter = field(default_factory=Counter)  # endpoint -> largest batch
    max_jobs_per_batch: int = 0  # generate: most distinct jobs seen in one batch
    multi_job_batches: int = 0  # generate: batches holding frames of 2+ jobs
    seconds: Counter = field(default_factory=Counter)

    def record(self, endpoint: str, rows: int, seconds: float, jobs: int = 1) -> None:
        self.batches[endpoint] += 1
        self.rows[endpoint] += rows
        self.max_rows[endpoint] = max(self.max_rows[endpoint], rows)
        self.seconds[endpoint] += seconds
        if endpoint == "generate":
            self.max_jobs_per_batch = max(self.max_jobs_per_batch, jobs)
            self.multi_job_batches += jobs > 1

    def as_dict(self) -> dict[str, Any]:
        endpoints = sorted(self.batches)
        return {
            "batches": dict(self.batches), "rows": dict(self.rows), "max_rows": dict(self.max_rows),
            "mean_batch_size": {e: round(self.rows[e] / self.batches[e], 2) for e in endpoints},
            "busy_seconds": {e: round(self.seconds[e], 3) for e in endpoints},
            "max_jobs_per_batch": self.max_jobs_per_batch, "multi_job_batches": self.multi_job_batches,
        }


class RunnerCore:
    def __init__(self, settings: RunnerSettings | None = None, *, load: bool = True) -> None:
        self.settings = settings or RunnerSettings()
        self.model: MuseTalk | None = None
        self.state = "loading"
        self.error: str | None = None
        self.stats = BatchStats()
        self._observers: list = []
        self._lock = threading.Lock()
        self.loaded_at: float | None = None
        if load:
            threading.Thread(target=self._load, name="musetalk-load", daemon=True).start()

    def _load(self) -> None:
        start = time.perf_counter()
        try:
            self.model = MuseTalk.from_pretrained(self.settings.models_dir, device=self.settings.device,
                                                  version=self.settings.model_version)
            self.state = "ready"
            self.loaded_at = time.time()
            log.info("MuseTalk loaded in %.1f s: %s", time.perf_counter() - start, self.model.info)
        except LipSyncError as exc:
            self.state, self.error = "error", exc.message
            log.error("MuseTalk failed to load: %s", exc.message)
        except Exception as exc:  # noqa: BLE001 - any load failure must show in health, not kill the process
            self.state, self.error = "error", f"{type(exc).__name__}: {exc}"
            log.exception("MuseTalk failed to load")

    def add_observer(self, callback) -> None:
        """callback(endpoint, rows, jobs) after each batch: metrics hook."""
        self._observers.append(callback)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def require(self) -> MuseTalk:
        if self.model is None:
            raise ModelsNotReadyError(
                "Models not loaded: " + (self.error or "still loading, retry in a few seconds"))
        return self.model

    def health(self) -> dict[str, Any]:
        info = self.model.info if self.model is not None else None
        return {
            "status": {"ready": "ready", "loading": "loading", "error": "error"}[self.state],
            "models_loaded": self.ready,
            "device": info.device if info else self.settings.device,
            "dtype": info.dtype if info else None,
            "model_version": info.version if info else None,
            "tokens_per_frame": self.model.tokens_per_frame if self.model else None,
            "d_model": int(self.model.unet.config.cross_attention_dim) if self.model else None,
            "error": self.error,
        }

    def _served(self, endpoint: str, rows: int, start: float, jobs: int = 1) -> None:
        with self._lock:
            self.stats.record(endpoint, rows, time.perf_counter() - start, jobs)
        for callback in self._observers:
            callback(endpoint, rows, jobs)

    def prepare(self, crops: np.ndarray) -> np.ndarray:
        model = self.require()
        start = time.perf_counter()
        out = model.prepare(crops)
        self._served("prepare", len(crops), start)
        return out

    def generate(self, packed: np.ndarray) -> np.ndarray:
        model = self.require()
        start = time.perf_counter()
        tags, latents, windows = unpack_generate(packed, int(model.unet.config.cross_attention_dim))
        out = model.generate(latents, windows)
        self._served("generate", len(packed), start, jobs=len(np.unique(tags)))
        return out

    def audio_pieces(self, pieces: np.ndarray) -> np.ndarray:
        model = self.require()
        start = time.perf_counter()
        out = model.encode_pieces(pieces)
        self._served("audio_pieces", len(pieces), start)
        return out
