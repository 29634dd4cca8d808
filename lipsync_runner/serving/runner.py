"""The GPU side: MuseTalk loaded once, its calls served in merged batches.

The BentoML runner service (service.py) is a thin shell over `RunnerCore`. Models load
on a background thread so the process answers health checks meanwhile (readyz 503,
health says "loading", or "error" with the reason when loading failed).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lipsync_runner.errors import LipSyncError, ModelsNotReadyError
from lipsync_runner.models.musetalk import MuseTalk
from lipsync_runner.config import RunnerSettings
from lipsync_runner.serving.packing import pack_faces_latents, unpack_generate, unpack_render

log = logging.getLogger(__name__)

GPU_BUCKETS = (8, 16, 32, 64)  # batch_buckets=auto on a GPU: few shapes, each with its cuDNN plans (and graphs)
C_COMPILERS = ("cc", "gcc", "clang")


@dataclass
class BatchStats:
    """What the batcher did: the proof that concurrent jobs share GPU batches."""

    batches: Counter = field(default_factory=Counter)  # endpoint -> batches served
    rows: Counter = field(default_factory=Counter)  # endpoint -> frames (or pieces) served
    max_rows: Counter = field(default_factory=Counter)  # endpoint -> largest batch
    max_jobs_per_batch: int = 0  # generate: most distinct jobs seen in one batch
    multi_job_batches: int = 0  # generate: batches holding frames of 2+ jobs
    oom_splits: int = 0  # batches split in half after running out of GPU memory
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
            "oom_splits": self.oom_splits,
        }


class RunnerCore:
    def __init__(self, settings: RunnerSettings | None = None, *, load: bool = True) -> None:
        self.settings = settings or RunnerSettings()
        self.model: MuseTalk | None = None
        self.state = "loading"
        self.error: str | None = None
        self.stats = BatchStats()
        self._observers: list = []
        self._row_cap: dict[str, int] = {}  # endpoint -> rows per call that fit, learnt from OOMs
        self._lock = threading.Lock()
        self.loaded_at: float | None = None
        if load:
            threading.Thread(target=self._load, name="musetalk-load", daemon=True).start()

    def _load(self) -> None:
        if self.settings.runner_model == "timed":  # no GPU work: an H100's latency (models/timed.py)
            from lipsync_runner.models.timed import LatencyModel, TimedMuseTalk

            self.model = TimedMuseTalk(LatencyModel(efficiency=self.settings.timed_efficiency))
            self.state, self.loaded_at = "ready", time.time()
            return
        start = time.perf_counter()
        try:
            if self.settings.compile:
                require_c_compiler()
            self.model = MuseTalk.from_pretrained(self.settings.models_dir, device=self.settings.device,
                                                  version=self.settings.model_version, compile=self.settings.compile)
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
            "weights_id": self.model.weights_id if self.model else None,
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
        out = self._fit_in_memory("prepare", model.prepare, crops)
        self._served("prepare", len(crops), start)
        return out

    def generate(self, packed: np.ndarray) -> np.ndarray:
        model = self.require()
        start = time.perf_counter()
        tags, latents, windows = unpack_generate(packed, int(model.unet.config.cross_attention_dim))
        out = self._fit_in_memory("generate", model.generate, latents, windows)
        self._served("generate", len(packed), start, jobs=len(np.unique(tags)))
        return out

    def prepare_generate(self, packed: np.ndarray) -> np.ndarray:
        """Prepare and generate in one round trip (packing.pack_render rows): the latents stay here.
        Counted as a prepare batch and a generate batch, as if sent apart."""
        return self._prepare_generate(packed)[0]

    def prepare_generate_latents(self, packed: np.ndarray) -> np.ndarray:
        """prepare_generate that also returns each frame's latents, for the avatar cache
        (packing.pack_faces_latents rows)."""
        return pack_faces_latents(*self._prepare_generate(packed))

    def _prepare_generate(self, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        model = self.require()
        tags, crops, windows = unpack_render(packed, int(model.unet.config.cross_attention_dim))
        start = time.perf_counter()
        latents = self._fit_in_memory("prepare", model.prepare, crops)
        self._served("prepare", len(crops), start)
        start = time.perf_counter()
        faces = self._fit_in_memory("generate", model.generate, latents, windows)
        self._served("generate", len(packed), start, jobs=len(np.unique(tags)))
        return faces, latents

    def audio_pieces(self, pieces: np.ndarray) -> np.ndarray:
        model = self.require()
        start = time.perf_counter()
        out = self._fit_in_memory("audio_pieces", model.encode_pieces, pieces, bucketed=False)
        self._served("audio_pieces", len(pieces), start)
        return out

    @property
    def buckets(self) -> tuple[int, ...]:
        """The batch sizes the model sees (() for any): the setting, else GPU_BUCKETS on a GPU only
        (on the CPU no plan is cached, and padding would only cost)."""
        asked = self.settings.buckets
        if asked is not None:
            return asked
        device = getattr(getattr(self.model, "info", None), "device", None) or self.settings.device
        return GPU_BUCKETS if str(device).startswith("cuda") else ()

    def _bucketed(self, endpoint: str, fn, arrays: tuple[np.ndarray, ...]) -> np.ndarray:
        """fn on the rows, padded with zero rows to the next bucket (the padding's results dropped), or
        split into the largest bucket; buckets above the size that fits in memory are not used."""
        cap = self._row_cap.get(endpoint)
        buckets = [b for b in self.buckets if cap is None or b <= cap]
        n = len(arrays[0])
        if not buckets or n == 0:
            return fn(*arrays)
        top = buckets[-1]
        if n > top:
            return np.concatenate([self._bucketed(endpoint, fn, tuple(a[i : i + top] for a in arrays))
                                   for i in range(0, n, top)])
        size = next(b for b in buckets if b >= n)
        if size == n:
            return fn(*arrays)
        padded = (np.concatenate([a, np.zeros((size - n, *a.shape[1:]), a.dtype)]) for a in arrays)
        return fn(*padded)[:n]

    def _fit_in_memory(self, endpoint: str, fn, *arrays: np.ndarray, bucketed: bool = True) -> np.ndarray:
        """Run fn on the rows; on out-of-memory, retry in halves (and remember the smaller size).

        The batcher may merge more frames than the GPU holds next to another tenant's work.
        Each call's rows are independent, so halves give the same result; only a single row
        that does not fit fails the request (and with it, cleanly, the jobs it came from).
        """
        n = len(arrays[0])
        cap = self._row_cap.get(endpoint)
        if cap is not None and n > cap:
            return np.concatenate([self._fit_in_memory(endpoint, fn, *(a[i : i + cap] for a in arrays),
                                                       bucketed=bucketed) for i in range(0, n, cap)])
        try:
            return self._bucketed(endpoint, fn, arrays) if bucketed else fn(*arrays)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            _release_cached_memory()
            if n <= 1:
                raise LipSyncError(f"the GPU ran out of memory on a single frame ({endpoint})") from None
            half = (n + 1) // 2
            with self._lock:
                self.stats.oom_splits += 1
                self._row_cap[endpoint] = min(self._row_cap.get(endpoint, n), half)
            log.warning("%s: out of memory on %d rows, retrying in batches of %d", endpoint, n, half)
            return np.concatenate([self._fit_in_memory(endpoint, fn, *(a[:half] for a in arrays), bucketed=bucketed),
                                   self._fit_in_memory(endpoint, fn, *(a[half:] for a in arrays), bucketed=bucketed)])


def require_c_compiler() -> None:
    """torch.compile (LIP_SYNC_COMPILE) builds kernels with a C compiler: refuse at load, with the reason,
    rather than fail inside the first batch of the first job."""
    if not any(shutil.which(name) for name in C_COMPILERS):
        raise LipSyncError(
            "LIP_SYNC_COMPILE=true needs a C compiler (torch.compile builds its kernels with one) and none is on "
            f"PATH ({', '.join(C_COMPILERS)}): install one (the Bento's image has gcc) or set LIP_SYNC_COMPILE=false")


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _release_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
