"""Load benchmark of the API while lip-sync jobs run: status, jobs and health latency.

    python bench/bench_load.py                          # 60 s, 8 threads, 2 jobs, own server (tiny models)
    python bench/bench_load.py --duration 15 --threads 4 --jobs 1
    python bench/bench_load.py --url http://127.0.0.1:3000 --duration 30   # an already running server

Without --url it starts `bentoml serve service:LipSync` on 127.0.0.1 with the tiny random-weight
models (tests/server.py), submits --jobs jobs (a 2 s talking-head clip and --audio-seconds of
speech-like audio), waits until they are processing, then runs --threads client threads for
--duration seconds (or --max-requests per thread), each cycling through
`GET /api/lip-sync/status/<id>`, `GET /api/lip-sync/jobs?limit=20` and `GET /api/lip-sync/health`.
It prints one row per request kind: count, errors, p50/p90/p99/max latency and throughput, plus
what the jobs did meanwhile. Everything stays on loopback. tests/test_load.py runs the same loop
for ~15 s.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

API = "/api/lip-sync"
KINDS = ("status", "jobs", "health")


@dataclass
class Sample:
    kind: str
    seconds: float
    status: int  # 0: no response (a transport error)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0

    def of(self, kind: str) -> list[Sample]:
        return [s for s in self.samples if s.kind == kind]

    @property
    def errors(self) -> list[Sample]:
        return [s for s in self.samples if not s.ok]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def hammer(base_url: str, job_ids: list[str], *, threads: int = 8, duration_s: float = 15.0,
           max_requests_per_thread: int | None = None, timeout_s: float = 15.0,
           kinds: tuple[str, ...] = KINDS) -> LoadResult:
    """`threads` clients, each cycling through `kinds` until `duration_s` or its request cap."""
    if not job_ids and "status" in kinds:
        raise ValueError("status requests need at least one job id")
    result = LoadResult()
    lock = threading.Lock()
    start_gate = threading.Barrier(threads)
    deadline_box: list[float] = []

    def worker(index: int) -> None:
        local: list[Sample] = []
        with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
            start_gate.wait()
            deadline = deadline_box[0] if deadline_box else time.monotonic() + duration_s
            n = 0
            while time.monotonic() < deadline and (max_requests_per_thread is None or n < max_requests_per_thread):
                kind = kinds[(index + n) % len(kinds)]
                if kind == "status":
                    path = f"{API}/status/{job_ids[(index + n) % len(job_ids)]}"
                elif kind == "jobs":
                    path = f"{API}/jobs?limit=20"
                else:
                    path = f"{API}/health"
                t0 = time.perf_counter()
                try:
                    r = client.get(path)
                    elapsed = time.perf_counter() - t0
                    error = None if r.status_code == 200 else f"{r.status_code}: {r.text[:200]}"
                    local.append(Sample(kind, elapsed, r.status_code, error))
                except httpx.HTTPError as exc:
                    local.append(Sample(kind, time.perf_counter() - t0, 0, f"{type(exc).__name__}: {exc}"))
                n += 1
        with lock:
            result.samples.extend(local)

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    deadline_box.append(time.monotonic() + duration_s)
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join(duration_s + timeout_s + 30)
    result.wall_s = time.perf_counter() - t0
    return result


def table(result: LoadResult) -> str:
    rows = [f"{'request':<8} {'count':>6} {'errors':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
            f"{'req/s':>7}"]
    for kind in (*KINDS, "all"):
        samples = result.samples if kind == "all" else result.of(kind)
        if not samples:
            continue
        ms = [s.seconds * 1000 for s in samples]
        rows.append(f"{kind:<8} {len(samples):>6} {sum(not s.ok for s in samples):>6} {percentile(ms, 50):>8.1f} "
                    f"{percentile(ms, 90):>8.1f} {percentile(ms, 99):>8.1f} {max(ms):>8.1f} "
                    f"{len(samples) / result.wall_s:>7.1f}")
    return "\n".join(rows)


# ------------------------------------------------------------------ jobs to run meanwhile


def submit(client: httpx.Client, video: Path, audio: Path) -> httpx.Response:
    with video.open("rb") as v, audio.open("rb") as a:
        return client.post(f"{API}/generate", files={"video": (video.name, v, "video/mp4"),
                                                     "audio": (audio.name, a, "audio/wav")})


def wait_for(client: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get(f"{API}/status/{job_id}").json()
        if body["status"] in statuses or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def start_jobs(base_url: str, video: Path, audio: Path, n: int) -> list[str]:
    """Submit n jobs one after another, each once the previous one is processing."""
    ids = []
    with httpx.Client(base_url=base_url, timeout=120) as c:
        for _ in range(n):
            r = submit(c, video, audio)
            r.raise_for_status()
            ids.append(r.json()["job_id"])
            wait_for(c, ids[-1], ("processing", "completed", "failed", "cancelled"))
    return ids


def media(workdir: Path, audio_seconds: float) -> tuple[Path, Path]:
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

    video = workdir / "face.mp4"
    audio = workdir / f"speech_{audio_seconds:g}s.wav"
    if not video.exists():
        write_face_video(video, seconds=2.0, fps=25, size=(320, 240))
    if not audio.exists():
        write_speech_like_audio(audio, seconds=audio_seconds, sample_rate=16000)
    return video, audio


def machine() -> str:
    cpus = os.cpu_count()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{cpus} vCPU ({model})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an already running server (default: start one with tiny models)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--max-requests", type=int, default=None, help="cap per thread")
    p.add_argument("--jobs", type=int, default=2, help="jobs running during the load")
    p.add_argument("--audio-seconds", type=float, default=60.0, help="length of each job's audio")
    p.add_argument("--workers", type=int, default=2, help="LIP_SYNC_JOB_WORKERS of the started server")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = Path(tmp)
        server = None
        if args.url:
            url = args.url.rstrip("/")
        else:
            from lipsync_runner.models.tiny import write_models_dir
            from tests.server import start_server

            models = write_models_dir(work / "models", versions=("v15",))
            server = start_server(work, models, LIP_SYNC_JOB_WORKERS=str(args.workers))
            url = server.url
        try:
            video, audio = media(work, args.audio_seconds)
            job_ids = start_jobs(url, video, audio, args.jobs) if args.jobs else []
            if not job_ids:
                kinds = ("jobs", "health")
            else:
                kinds = KINDS
            print(f"machine: {machine()}; server: {url}; {args.threads} threads x {args.duration:g} s; "
                  f"{len(job_ids)} job(s) running ({args.audio_seconds:g} s audio each)", flush=True)
            result = hammer(url, job_ids, threads=args.threads, duration_s=args.duration,
                            max_requests_per_thread=args.max_requests, kinds=kinds)
            print(table(result))
            with httpx.Client(base_url=url, timeout=60) as c:
                for job_id in job_ids:
                    body = c.get(f"{API}/status/{job_id}").json()
                    print(f"job {job_id[:8]}: {body['status']}, stage {body['stage']}, progress {body['progress']:.2f}")
                    c.delete(f"{API}/cleanup/{job_id}")
            for s in result.errors[:10]:
                print(f"error: {s.kind} after {s.seconds:.2f} s: {s.error}")
            return 1 if result.errors else 0
        finally:
            if server is not None:
                from tests.server import stop_server

                stop_server(server)


if __name__ == "__main__":
    sys.exit(main())
