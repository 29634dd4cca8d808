"""Can the API side feed one H100? N concurrent jobs through the real REST API against the timed runner.

    python bench/bench_feed.py --jobs 4 --height 720 --seconds 10 --cold
    python bench/bench_feed.py --jobs 4 --height 720 --seconds 10 --warm
    python bench/bench_feed.py --jobs 2 --height 1080 --seconds 10 --cold --json feed.json
    python bench/bench_feed.py --jobs 1 --height 720 --seconds 2 --cold      # a quick smoke run

What runs, in this one process: the service's CPU side as `bentoml serve` builds it (`ServiceCore`:
job store, admission, job workers, avatar cache, the executor and `pipeline.run`), its REST app
under uvicorn on a loopback port, and N clients (threads named ``bench-client-*``) that each upload
a clip and a speech track (``POST /generate?wait=true``, multipart) and download the result. The
model is the runner's ``LIP_SYNC_RUNNER_MODEL=timed`` (`lipsync_runner/models/timed.py`): every
call sleeps what one H100 would take and returns arrays of the right shapes, so decoding, face
tracking, crops, blending and encoding all run for real. The runner is called in process, as
when both services share a process, but every call's arrays go through BentoML's own
serialization between services (`_bentoml_impl.serde.PickleSerde`: pickle protocol 5 with
out-of-band buffers, joined into one body as the socket would) both ways, so the transport's
CPU is counted; the HTTP framing and the adaptive batcher between the processes are not.

Media: N distinct synthetic talking heads (the astronaut of `media/samples.py`, a different noise
seed per job so no two share an avatar cache entry), 16:9 at the given height, 25 fps, with
speech-like audio of the same length; made once and kept in ``--media-dir``.
- ``--cold``: a fresh avatar cache; every job tracks faces and VAE-encodes its crops.
- ``--warm``: every clip runs once first (not measured), then the measured round runs the same
  clips again: face tracks and latents come from the avatar cache (checked: every job says hit).

CPU time by stage (process CPU, not wall time). A sampler thread wakes every ``--interval-ms``,
reads each thread's CPU clock (``pthread_getcpuclockid``) and charges the CPU the thread used
since the last wake to the stage its Python stack is in now (the innermost frame that belongs to
a stage; a statistical profile over thousands of wakes). ffmpeg children are charged whole by
what they are (their command line): the decoder to ``decode``, x264 to ``encode``, the audio
decoder to ``audio``, probes to ``probe``; a child's CPU is read exactly from ``wait4`` when it is
reaped, else from its last sample. Both sums are reconciled with ``getrusage`` (self and
children): what the samples missed (threads that ended between two wakes, children reaped
without ``wait``) is shown as ``unsampled``. The clients' threads and the sampler are left out
of the node's CPU (a client is not on the node) and shown apart.

Stages: decode (the ffmpeg decoder and the pipe read), spool (the frame store: decoded frames kept
for the render), faces (detector and tracking), crop, transport (packing, serialization both
ways, the runner's bookkeeping), blend, encode (the pipe write and x264), audio (PCM decode,
Whisper's log-mel on the runner, audio windows), cache (avatar cache reads), api (HTTP, uploads,
downloads, job store, workers), probe (ffprobe-like runs, thumbnails), other (the rest of the
pipeline's Python).

Every other setting comes from the environment as the service reads it (``LIP_SYNC_X264_THREADS``,
``LIP_SYNC_MAX_SPOOL_GB``, ``LIP_SYNC_DETECT_EVERY``, ``LIP_SYNC_CHUNK_FRAMES``, ...), so a ceiling
removed or a setting changed is measured by running this again.

The projection for a node: ``cores * 1000 / (CPU ms per output frame)`` frames/s if the CPU
bounds it, against the GPU's modelled frames/s at ``--gpu-batch`` (warm: generate only; cold:
prepare + generate per frame); the lower of the two is the projection, and the line says which
bounds it. The arithmetic is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FPS = 25
# The clips' x264 quality: about 5 Mbit/s at 720p, a phone's upload, with the frames' sensor-like
# noise kept. (At crf 18 the noise is dropped: 0.17 Mbit/s, far cheaper to decode and to re-encode
# than real video; at crf 12, 13 Mbit/s.)
SOURCE_CRF = 14
STAGES = ("decode", "spool", "faces", "crop", "transport", "blend", "encode", "audio", "cache", "api", "probe",
          "other", "unsampled")
CLIENT_PREFIX = "bench-client"
SAMPLER_NAME = "bench-sampler"


# ------------------------------------------------------------------ ffmpeg children, exactly


class _Children:
    """Every child process this process starts: what it is and the CPU it used."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: dict[int, tuple[str, Any]] = {}  # pid -> (kind, psutil.Process)
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds: exact once reaped)
        self.exact: set[int] = set()

    def started(self, pid: int, args: Any) -> None:
        import psutil

        kind = _child_kind(args if isinstance(args, (list, tuple)) else [str(args)])
        with self.lock:
            try:
                self.live[pid] = (kind, psutil.Process(pid))
            except psutil.Error:
                pass
            self.cpu[pid] = (kind, 0.0)

    def reaped(self, pid: int, usage: resource.struct_rusage) -> None:
        with self.lock:
            kind = self.cpu.get(pid, ("other", 0.0))[0]
            self.cpu[pid] = (kind, usage.ru_utime + usage.ru_stime)
            self.exact.add(pid)
            self.live.pop(pid, None)

    def sample(self) -> None:
        with self.lock:
            items = list(self.live.items())
        for pid, (kind, proc) in items:
            try:
                t = proc.cpu_times()
                seconds = t.user + t.system
            except Exception:  # noqa: BLE001 - gone: its last sample stands (or wait4's figure)
                with self.lock:
                    self.live.pop(pid, None)
                continue
            with self.lock:
                if pid not in self.exact:
                    self.cpu[pid] = (kind, seconds)

    def by_kind(self) -> Counter:
        out: Counter = Counter()
        with self.lock:
            for kind, seconds in self.cpu.values():
                out[kind] += seconds
        return out


CHILDREN = _Children()


def _child_kind(args: list[str]) -> str:
    args = [str(a) for a in args]
    if "pipe:0" in args and ("libx264" in args or "h264_nvenc" in args):
        return "encode"
    if "rgb24" in args and "pipe:1" in args:
        return "decode"
    if "pcm_f32le" in args:
        return "audio"
    return "probe"  # ffprobe-like runs: the demuxer check, packet scans, the 8x8 frame, thumbnails


def _record_children() -> None:
    """Every `subprocess.Popen` (ffmpeg.py's and subprocess.run's) registers its child, and its
    `wait` reaps with `wait4`, whose rusage is the child's exact CPU."""

    class RecordingPopen(subprocess.Popen):
        def __init__(self, args, *a, **kw) -> None:
            super().__init__(args, *a, **kw)
            CHILDREN.started(self.pid, args)

        def _try_wait(self, wait_flags):  # subprocess's own hook for waitpid (CPython 3.8-3.13)
            try:
                pid, sts, usage = os.wait4(self.pid, wait_flags)
            except ChildProcessError:
                return self.pid, 0
            if pid == self.pid:
                CHILDREN.reaped(pid, usage)
            return pid, sts

    subprocess.Popen = RecordingPopen  # type: ignore[misc]


# ------------------------------------------------------------------ threads, by their stacks


_FRAMEWORK = ("/starlette/", "/fastapi/", "/uvicorn/", "/h11/", "/anyio/", "/multipart/", "/python_multipart/",
              "/pydantic/", "/sqlite3/", "/json/", "/email/", "/shutil.py", "/asyncio/")
_API = ("lipsync_runner/api/", "lipsync_runner/inputs/", "lipsync_runner/storage/", "lipsync_runner/jobs/",
        "lipsync_runner/integration/", "lipsync_runner/serving/core.py", "lipsync_runner/serving/executor.py",
        "lipsync_runner/serving/job_inputs.py", "lipsync_runner/media/thumbnails.py")
_TRANSPORT = ("lipsync_runner/serving/remote.py", "lipsync_runner/serving/packing.py",
              "lipsync_runner/serving/runner.py", "lipsync_runner/models/timed.py", "/_bentoml_impl/", "/pickle.py")


def stage_of(frame) -> str | None:
    """The stage of a stack: its innermost frame that belongs to one (None: nothing of ours)."""
    while frame is not None:
        code = frame.f_code
        path = code.co_filename.replace(os.sep, "/")
        name = code.co_qualname
        stage = _stage_of_code(path, name)
        if stage is not None:
            return stage
        frame = frame.f_back
    return None


def _stage_of_code(path: str, name: str) -> str | None:
    if path.endswith("bench/bench_feed.py"):
        return "transport" if name.startswith("Wire") else None
    if "/transformers/" in path:
        return "audio"  # Whisper's log-mel features, computed on the runner's host
    if "lipsync_runner/" in path:
        if "render/crops.py" in path:
            return "crop"
        if "render/" in path:
            return "blend"  # blend, masks, sharpen
        if "lipsync_runner/faces/" in path:
            return "faces"
        if path.endswith("media/ffmpeg.py"):
            if name.startswith("VideoReader"):
                return "decode"
            if name.startswith("VideoWriter"):
                return "encode"
            if name.startswith("decode_audio"):
                return "audio"
            if name.startswith(("probe_", "_open_and_decode", "_scan_packets", "_detected_demuxer")):
                return "probe"
            return None  # pipe helpers (_read_exact, the stderr drain): whoever called them
        if "pipeline/framestore.py" in path:
            return "spool"
        if any(p in path for p in _TRANSPORT):
            return "transport"
        if "lipsync_runner/audio/" in path:
            return "audio"
        if "pipeline/avatar_cache.py" in path:
            return "cache"
        if any(p in path for p in _API):
            return "api"
        return "other"
    if any(p in path for p in _TRANSPORT):
        return "transport"
    if any(p in path for p in _FRAMEWORK):
        return "api"
    return None


def _native_stage(comm: str) -> str:
    """The stage of a thread that C++ started, by its name."""
    if comm.startswith("mediapipe"):
        return "faces"  # MediaPipe's graph runs the detector and the landmarks on its own threads
    return "unsampled"


class CpuSampler(threading.Thread):
    """Charges each thread's CPU to the stage its stack is in (module docstring)."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(name=SAMPLER_NAME, daemon=True)
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.seconds: Counter = Counter()  # stage (or client) -> CPU seconds
        self.threads: Counter = Counter()  # thread name prefix -> CPU seconds
        self.native: Counter = Counter()  # native thread name -> CPU seconds
        self.wakes = 0
        self._last: dict[tuple[int, int], float] = {}
        self._started_with: set[tuple[int, int]] = set()
        self.own_cpu = 0.0

    def baseline(self) -> None:
        for t in threading.enumerate():
            key = (t.ident, t.native_id)
            cpu = _thread_cpu(t)
            if cpu is not None:
                self._last[key] = cpu
        self.native_tick({t.native_id for t in threading.enumerate()})
        self.native = Counter()  # only what they use from now on

    def run(self) -> None:
        start = time.thread_time()
        while not self.stop.wait(self.interval_s):
            self.tick()
        self.tick()
        self.own_cpu = time.thread_time() - start

    def tick(self) -> None:
        self.wakes += 1
        stacks = sys._current_frames()
        me = threading.get_ident()
        for t in threading.enumerate():
            if t.ident == me or t.ident is None:
                continue
            cpu = _thread_cpu(t)
            if cpu is None:
                continue
            key = (t.ident, t.native_id)
            delta = cpu - self._last.get(key, 0.0)  # a thread first seen now: all its CPU is in the window
            self._last[key] = cpu
            if delta <= 0:
                continue
            if t.name.startswith(CLIENT_PREFIX):
                bucket = "client"
            else:
                bucket = stage_of(stacks.get(t.ident)) or "other"
            self.seconds[bucket] += delta
            self.threads[t.name.rstrip("0123456789_-")] += delta
        if self.wakes % 4 == 0:
            self.native_tick({t.native_id for t in threading.enumerate()})
        CHILDREN.sample()

    def native_tick(self, python_tids: set[int]) -> None:
        """Threads that C++ libraries start (MediaPipe's, BLAS pools...): no Python stack, so charged
        by their name (``native:<comm>``)."""
        for tid in os.listdir("/proc/self/task"):
            if int(tid) in python_tids:
                continue
            try:
                with open(f"/proc/self/task/{tid}/schedstat") as f:
                    cpu = int(f.read().split()[0]) / 1e9
                with open(f"/proc/self/task/{tid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            key = (0, int(tid))
            delta = cpu - self._last.get(key, 0.0)
            self._last[key] = cpu
            if delta > 0:
                self.native[comm] += delta


def _thread_cpu(t: threading.Thread) -> float | None:
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(t.ident))
    except (OSError, TypeError, ValueError):
        return None


# ------------------------------------------------------------------ the runner, over BentoML's serialization


class Wire:
    """The runner as the API side reaches it: each call's array, and its answer, through BentoML's
    serialization between services (pickle 5, out-of-band buffers, joined as one body)."""

    def __init__(self, runner) -> None:
        from _bentoml_impl.serde import Payload, PickleSerde

        self.runner = runner
        self.serde = PickleSerde()
        self.payload = Payload
        self.bytes = Counter()

    def _send(self, endpoint: str, value: Any) -> Any:
        payload = self.serde.serialize_value(value)
        body = b"".join(payload.data)  # what the socket carries
        self.bytes[endpoint] += len(body)
        return self.serde.deserialize_value(self.payload((body,), payload.metadata))

    def __getattr__(self, endpoint: str):
        """Any of the runner's endpoints (prepare, generate, audio_pieces, ...), over the wire."""
        target = getattr(self.runner, endpoint)  # AttributeError for what the runner lacks (to_async)

        def call(*arrays: Any) -> Any:
            received = self._send(endpoint, arrays)
            return self._send(endpoint + " (answer)", target(*received))

        return call

    def health(self) -> dict[str, Any]:
        return self.runner.health()


# ------------------------------------------------------------------ media


def clip(media_dir: Path, height: int, seconds: float, seed: int, crf: int = SOURCE_CRF) -> tuple[Path, Path]:
    """A 16:9 talking head at `height` (noise seed `seed`: its own avatar) and speech as long."""
    from lipsync_runner.media.ffmpeg import VideoWriter
    from lipsync_runner.media.samples import face_frames, write_speech_like_audio

    width = (height * 16 // 9) // 2 * 2
    video = media_dir / f"face-{height}p-{seconds:g}s-crf{crf}-{seed}.mp4"
    audio = media_dir / f"speech-{seconds:g}s.wav"
    if not audio.exists():
        write_speech_like_audio(audio, seconds=seconds)
    if not video.exists():
        part = video.with_suffix(".part.mp4")
        with VideoWriter(part, width, height, FPS, crf=crf) as writer:
            for frame in face_frames(int(seconds * FPS), (width, height), face_px=int(height * 0.6), seed=seed):
                writer.write(frame)
        part.rename(video)
    return video, audio


# ------------------------------------------------------------------ the service


class Service:
    """ServiceCore (what `bentoml serve` builds for the LipSync service) with its REST app on a port."""

    def __init__(self, work: Path, args) -> None:
        import uvicorn

        from lipsync_runner.config import RunnerSettings, ServiceSettings, Settings
        from lipsync_runner.serving.core import ServiceCore
        from lipsync_runner.serving.runner import RunnerCore

        settings = Settings(
            runner=RunnerSettings(runner_model="timed", timed_efficiency=args.efficiency,
                                  face_detector=args.detector),
            service=ServiceSettings(data_dir=work / "data", job_workers=args.job_workers or args.jobs,
                                    free_space_floor_mb=0, max_queued_jobs=max(100, 2 * args.jobs),
                                    max_queued_jobs_per_owner=max(20, 2 * args.jobs)))
        self.runner = RunnerCore(settings.runner)
        while not self.runner.ready:
            time.sleep(0.01)
        self.wire = Wire(self.runner)
        self.core = ServiceCore(self.wire, settings)
        self.core.start(None)
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.core.rest_app, host="127.0.0.1", port=port,
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="api-uvicorn", daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    @property
    def detector(self) -> str:
        from lipsync_runner.faces import load_face_detector

        runner = self.core.settings.runner
        return load_face_detector(runner.face_detector, runner.models_dir, "cpu").name

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.core.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_job(url: str, video: Path, audio: Path, out: Path) -> dict[str, Any]:
    """What a client does: upload both files, wait for the job, download the result."""
    import httpx

    with httpx.Client(base_url=url, timeout=3600) as http, video.open("rb") as v, audio.open("rb") as a:
        answer = http.post("/generate", params={"wait": "true"},
                           files={"video": (video.name, v, "video/mp4"), "audio": (audio.name, a, "audio/wav")})
        body = answer.json()
        if answer.status_code != 200 or not body.get("success"):
            raise RuntimeError(f"job failed: {answer.status_code} {body}")
        with http.stream("GET", f"/download/{body['job_id']}") as download, out.open("wb") as f:
            download.raise_for_status()
            for part in download.iter_bytes(1 << 20):
                f.write(part)
        return http.get(f"/status/{body['job_id']}").json()


def round_of_jobs(service: Service, clips: list[tuple[Path, Path]], out_dir: Path) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(max_workers=len(clips), thread_name_prefix=CLIENT_PREFIX) as pool:
        futures = [pool.submit(one_job, service.url, v, a, out_dir / f"out-{i}.mp4") for i, (v, a) in enumerate(clips)]
        return [f.result() for f in futures]


# ------------------------------------------------------------------ the run


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}"


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def measure(args) -> dict[str, Any]:
    from lipsync_runner.models.timed import LatencyModel

    media_dir = Path(args.media_dir)
    media_dir.mkdir(parents=True, exist_ok=True)
    clips = [clip(media_dir, args.height, args.seconds, seed, args.source_crf) for seed in range(args.jobs)]
    mode = "warm" if args.warm else "cold"
    _record_children()
    with tempfile.TemporaryDirectory(prefix="bench-feed-") as tmp:
        work = Path(tmp)
        service = Service(work, args)
        try:
            # a small job first, as a running service has done: detector loaded, imports made
            round_of_jobs(service, [clip(media_dir, 240, 1.0, seed=1000)], work)
            if args.warm:  # the first round fills the avatar cache; only the second is measured
                round_of_jobs(service, clips, work)
            busy0, bytes0 = service.runner.model.busy_s, Counter(service.wire.bytes)
            sampler = CpuSampler(args.interval_ms / 1000)
            load_before = os.getloadavg()
            self0, kids0, kinds0 = (resource.getrusage(resource.RUSAGE_SELF),
                                    resource.getrusage(resource.RUSAGE_CHILDREN), CHILDREN.by_kind())
            sampler.baseline()
            sampler.start()
            start = time.perf_counter()
            statuses = round_of_jobs(service, clips, work)
            wall = time.perf_counter() - start
            sampler.stop.set()
            sampler.join()
            self1, kids1, kinds1 = (resource.getrusage(resource.RUSAGE_SELF),
                                    resource.getrusage(resource.RUSAGE_CHILDREN), CHILDREN.by_kind())
            load_after = os.getloadavg()
            gpu_busy = service.runner.model.busy_s - busy0
            detector = service.detector
            wire_bytes = Counter(service.wire.bytes) - bytes0
            batches = service.runner.stats.as_dict()
        finally:
            service.close()

    hits = [s.get("avatar_cache") for s in statuses]
    if args.warm and any(h != "hit" for h in hits):
        raise RuntimeError(f"a warm job missed the avatar cache: {hits}")
    frames = sum(int(s["frames"]) for s in statuses)
    # this process: by stage from the samples; what they missed (threads gone between two wakes) apart
    python = Counter(sampler.seconds)
    left_out = python.pop("client", 0.0)
    for comm, seconds in sampler.native.items():
        python[_native_stage(comm)] += seconds
    python_total = _cpu(self1) - _cpu(self0) - sampler.own_cpu - left_out
    unsampled_python = max(0.0, python_total - sum(python.values()))
    python["unsampled"] += unsampled_python
    # children by kind; what no wait4 or sample saw is unsampled
    kinds = Counter({k: kinds1[k] - kinds0.get(k, 0.0) for k in kinds1})
    children_total = _cpu(kids1) - _cpu(kids0)
    unsampled_children = max(0.0, children_total - sum(kinds.values()))
    stage_s = Counter(python)
    for kind, seconds in kinds.items():
        stage_s[kind] += seconds
    stage_s["unsampled"] += unsampled_children
    node_cpu = sum(stage_s.values())
    ms = {stage: round(stage_s.get(stage, 0.0) * 1000 / frames, 2) for stage in STAGES}
    cpu_ms = node_cpu * 1000 / frames

    latency = LatencyModel(efficiency=args.efficiency)
    gpu_fps = latency.frames_per_second(args.gpu_batch, cold=not args.warm)
    cpu_fps = args.cores * 1000 / cpu_ms
    projected = min(cpu_fps, gpu_fps)
    bound = "CPU" if cpu_fps < gpu_fps else "GPU (modelled)"
    result = {
        "config": {"jobs": args.jobs, "height": args.height, "seconds": args.seconds, "mode": mode,
                   "source_crf": args.source_crf,
                   "source_mbit_s": round(clips[0][0].stat().st_size * 8 / args.seconds / 1e6, 2),
                   "detector": detector, "job_workers": args.job_workers or args.jobs,
                   "efficiency": args.efficiency, "interval_ms": args.interval_ms},
        "machine": machine(), "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
        "frames": frames, "wall_s": round(wall, 2), "fps_here": round(frames / wall, 1),
        "cpu_ms_per_frame": round(cpu_ms, 2), "cpu_ms_per_frame_by_stage": ms,
        "python_cpu_s": round(sum(python.values()), 2), "ffmpeg_cpu_s": round(children_total, 2),
        "left_out_cpu_s": {"clients": round(left_out, 2), "sampler": round(sampler.own_cpu, 2)},
        "unsampled_cpu_s": {"python": round(unsampled_python, 2), "children": round(unsampled_children, 2)},
        "sampler_wakes": sampler.wakes,
        "native_threads_cpu_s": {k: round(v, 2) for k, v in sampler.native.most_common(8)},
        "gpu_busy_s_modelled": round(gpu_busy, 2), "gpu_busy_share_here": round(gpu_busy / wall, 3),
        "transport_bytes_per_frame": {k: round(v / frames) for k, v in sorted(wire_bytes.items())},
        "runner_batches": batches["mean_batch_size"], "avatar_cache": hits,
        "projection": {
            "cores": args.cores, "gpu_batch": args.gpu_batch,
            "cpu_bound_fps": round(cpu_fps, 1), "gpu_bound_fps": round(gpu_fps, 1),
            "projected_fps": round(projected, 1), "bound": bound,
            "arithmetic": (f"CPU: {args.cores} cores x 1000 / {cpu_ms:.1f} CPU-ms per frame = {cpu_fps:.0f} frames/s; "
                           f"GPU: {args.gpu_batch} frames / "
                           + (f"{latency.generate_s(args.gpu_batch) * 1000:.1f} ms (generate)" if args.warm else
                              f"({latency.prepare_s(args.gpu_batch) * 1000:.1f} ms prepare + "
                              f"{latency.generate_s(args.gpu_batch) * 1000:.1f} ms generate)")
                           + f" = {gpu_fps:.0f} frames/s; projected min = {projected:.0f} frames/s, bound by {bound}"),
        },
    }
    return result


def report(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [(f"# {c['jobs']} jobs, {c['height']}p, {c['seconds']:g} s ({c['source_mbit_s']} Mbit/s), {c['mode']}, "
              f"detector {c['detector']}; {r['machine']}; load {r['load_before']} -> {r['load_after']}"),
             (f"frames {r['frames']}, wall {r['wall_s']} s, {r['fps_here']} frames/s here; "
              f"CPU {r['cpu_ms_per_frame']} ms per output frame (Python {r['python_cpu_s']} s + ffmpeg "
              f"{r['ffmpeg_cpu_s']} s; left out: {r['left_out_cpu_s']})"),
             "CPU ms per output frame: " + ", ".join(f"{k} {v}" for k, v in r["cpu_ms_per_frame_by_stage"].items()),
             (f"modelled GPU busy {r['gpu_busy_s_modelled']} s ({100 * r['gpu_busy_share_here']:.0f} % of the wall "
              f"time); transport bytes per frame {r['transport_bytes_per_frame']}"),
             "projection: " + r["projection"]["arithmetic"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4, help="concurrent jobs (one client each)")
    parser.add_argument("--height", type=int, default=720, help="clip height (16:9): 720 or 1080")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--warm", action="store_true", help="measure a second run of each clip (avatar cache hits)")
    mode.add_argument("--cold", action="store_true", help="a fresh avatar cache (the default)")
    parser.add_argument("--source-crf", type=int, default=SOURCE_CRF,
                        help="x264 quality of the synthetic clips (14: about 5 Mbit/s at 720p)")
    parser.add_argument("--detector", default="auto", choices=["auto", "haar", "mediapipe", "fan"],
                        help="the service's face detector (auto: what the service loads here)")
    parser.add_argument("--job-workers", type=int, default=0, help="LIP_SYNC_JOB_WORKERS (default: --jobs)")
    parser.add_argument("--efficiency", type=float, default=0.5, help="timed runner: share of 790 TFLOP/s reached")
    parser.add_argument("--gpu-batch", type=int, default=32, help="batch size of the GPU projection")
    parser.add_argument("--cores", type=int, default=16, help="cores of the projected node")
    parser.add_argument("--interval-ms", type=float, default=5.0, help="the CPU sampler's period")
    parser.add_argument("--media-dir", default=str(Path(tempfile.gettempdir()) / "bench-feed-media"))
    parser.add_argument("--json", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    result = measure(args)
    print(report(result))
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
