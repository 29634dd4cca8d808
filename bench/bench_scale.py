"""Scale-out benchmarks: the shared queue's claim latency, and 1 vs 2 API replicas on one runner.

    python bench/bench_scale.py                 # both below with their defaults (about 3 minutes)
    python bench/bench_scale.py claims          # claim latency: PostgreSQL (and SQLite, for reference)
    python bench/bench_scale.py claims --database-url postgresql://...   # an existing server (tables lipsync_*)
    python bench/bench_scale.py fleet --configs 1x2 2x2 1x4 --jobs 12    # jobs/min and status p50/p99

``claims`` queues --claim-jobs jobs and lets W worker threads drain the queue with ``claim()`` (and a
lease renewal after each, as the heartbeat does), split over two store objects as two replicas
would be; it prints the latency of one claim (p50/p99/max) and claims per second. Without
--database-url it starts a throwaway PostgreSQL cluster on the loopback (tests/backends.py).

``fleet`` starts a throwaway PostgreSQL, moto's S3 server and one MuseTalkRunner, then for each
config ``<replicas>x<job workers per replica>`` that many LipSync API replicas apart (as
deploy/kubernetes does; tiny random-weight models on the CPU). A replica already running with the
same worker count is kept for the next config (1x2 then 2x2 starts one more), after a round of
warm-up jobs on a new one. It submits --jobs jobs round-robin over the replicas while a client
polls ``GET /status`` at --status-rate per second (round-robin too), and prints jobs per minute
(first submit to last completion) and the status latency seen by that client.

Every table row carries the load average before and after it, and the run starts and ends with
``uptime``: on a shared machine the figures are only comparable at similar load. Everything (the
runner, the replicas, PostgreSQL, moto and this client) shares this machine's cores: on a small
machine the replicas' CPU stages (decode, faces, blend, encode) and the runner's generation compete
for them, so a second replica adds admission and status capacity, not job throughput. Nothing
leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

API = "/api/lip-sync"
FINISHED = ("completed", "failed", "cancelled")


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank), NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return f"load average: {load()}"


# ------------------------------------------------------------------------------------------ claims


def bench_claims(make_store, label: str, jobs: int, workers: int) -> None:
    from lipsync_runner.jobs import JobRecord, new_job_id

    stores = [make_store(), make_store()]  # two replicas
    for _ in range(jobs):
        stores[0].create(JobRecord(job_id=new_job_id(), video_filename="v.mp4", audio_filename="a.wav",
                                   video_file="video.mp4", audio_file="audio.wav"))
    before = load()
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        store, name, mine = stores[i % 2], f"replica-{i % 2}/{i}", []
        while True:
            t = time.perf_counter()
            rec = store.claim(name, lease_s=30)
            dt = time.perf_counter() - t
            if rec is None:
                break
            mine.append(dt)
            store.renew(name, [rec.job_id], 30)
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    assert len(latencies) == jobs, (len(latencies), jobs)  # every job claimed once, none twice
    ms = [x * 1000 for x in latencies]
    print(f"| {label} | {workers} | {jobs} | {pct(ms, 50):.2f} | {pct(ms, 99):.2f} | {max(ms):.1f} | "
          f"{jobs / wall:.0f} | {before} | {load()} |", flush=True)
    for store in {id(s): s for s in stores}.values():
        store.close()


def run_claims(args: argparse.Namespace, stack: ExitStack) -> None:
    from lipsync_runner.jobs.postgres import PostgresJobStore
    from lipsync_runner.jobs.store import SQLiteJobStore

    print(f"\n## Claim latency: {args.claim_jobs} queued jobs drained by W workers over two replicas' stores "
          "(claim + one lease renewal each)")
    print("| store | workers | jobs | claim p50 ms | claim p99 ms | max ms | claims/s | load before | load after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workers in args.workers:
        if args.database_url:  # an existing server: start from an empty queue
            import psycopg

            url = args.database_url
            PostgresJobStore(url).close()  # the schema, if it is not there yet
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("TRUNCATE lipsync_jobs, lipsync_uploads")
        else:
            url = postgres(stack).create_database()
        bench_claims(lambda: PostgresJobStore(url, pool_size=max(2, workers)), "PostgreSQL", args.claim_jobs,
                     workers)
    if args.no_sqlite:
        return
    for workers in args.workers:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-claims-")))
        shared = SQLiteJobStore(tmp / "jobs.sqlite3")  # one process: both "replicas" share the store
        bench_claims(lambda: shared, "SQLite (one process)", args.claim_jobs, workers)


_CLUSTER = None


def postgres(stack: ExitStack):
    """One throwaway PostgreSQL cluster for the whole run."""
    global _CLUSTER
    if _CLUSTER is None:
        from tests.backends import postgres_cluster

        _CLUSTER = stack.enter_context(postgres_cluster())
    return _CLUSTER


# ------------------------------------------------------------------------------------------- fleet


def run_fleet(args: argparse.Namespace, stack: ExitStack) -> None:
    import httpx

    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio
    from lipsync_runner.models.tiny import write_models_dir
    from tests.backends import fleet_env, s3_server, start_bento, wait_ready
    from tests.server import stop_server

    configs = [tuple(int(x) for x in c.lower().split("x")) for c in args.configs]
    root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-scale-")))
    database = postgres(stack).create_database()
    s3 = stack.enter_context(s3_server())
    models = write_models_dir(root / "models", versions=("v15",))
    media = root / "media"
    media.mkdir()
    write_face_video(media / "face.mp4", seconds=args.video_seconds, size=(320, 240))
    write_speech_like_audio(media / "speech.wav", seconds=args.audio_seconds)
    env = fleet_env(root, models, database, f"s3://{s3.create_bucket()}/bench", s3.endpoint_url,
                    LIP_SYNC_MAX_QUEUED_JOBS="1000", LIP_SYNC_QUEUE_POLL_S="0.5")
    runner = start_bento(root, "runner", ["--service-name", "MuseTalkRunner"], env)
    api_args = ["--service-name", "LipSync", "--depends", f"MuseTalkRunner={runner.url}"]
    apis: list = []  # the API replicas running now, all with `workers` job workers
    workers_now = None
    started = 0

    def stop_all() -> None:
        for server in (*apis, runner):
            stop_server(server)

    stack.callback(stop_all)
    wait_ready(runner)
    print(f"\n## API replicas on one runner: {args.jobs} jobs per row ({args.audio_seconds} s of speech on a "
          f"{args.video_seconds} s 320x240 clip, tiny models, CPU), status polled {args.status_rate}/s round-robin")
    print("| API replicas x job workers | jobs | wall s | jobs/min | status n | status p50 ms | status p99 ms | "
          "status max ms | errors | load before | load after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for replicas, workers in configs:
        if workers != workers_now:
            while apis:
                stop_server(apis.pop())
            workers_now = workers
        while len(apis) > replicas:
            stop_server(apis.pop())
        fresh = []
        while len(apis) < replicas:
            server = start_bento(root, f"api-{started}", api_args, {**env, "LIP_SYNC_JOB_WORKERS": str(workers)})
            started += 1
            apis.append(server)
            fresh.append(server)
        for server in fresh:
            wait_ready(server)
        if fresh and args.warmup:  # first jobs on a new replica load its face detector and codecs
            fleet_round(apis, media, args, httpx, label="", jobs=args.warmup * len(apis), report=False)
        fleet_round(apis, media, args, httpx, label=f"{replicas}x{workers}", jobs=args.jobs)


def fleet_round(apis, media: Path, args: argparse.Namespace, httpx, *, label: str, jobs: int,
                report: bool = True) -> None:
    before = load()
    latencies: list[float] = []
    errors: list[str] = []
    submitted: list[str] = []
    stop = threading.Event()

    def poll() -> None:  # the measured client: one status call at a time, round-robin over the replicas
        i = 0
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                if submitted:
                    server = apis[i % len(apis)]
                    t = time.perf_counter()
                    try:
                        r = client.get(f"{server.url}{API}/status/{submitted[i % len(submitted)]}")
                        if r.status_code != 200:
                            errors.append(f"status {r.status_code}")
                    except httpx.HTTPError as e:
                        errors.append(type(e).__name__)
                    latencies.append((time.perf_counter() - t) * 1000)
                    i += 1
                stop.wait(1 / args.status_rate)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start = time.perf_counter()
    try:
        with httpx.Client(timeout=120) as client:
            for k in range(jobs):
                server = apis[k % len(apis)]
                with (media / "face.mp4").open("rb") as v, (media / "speech.wav").open("rb") as a:
                    r = client.post(f"{server.url}{API}/generate",
                                    files={"video": ("face.mp4", v, "video/mp4"), "audio": ("s.wav", a, "audio/wav")})
                r.raise_for_status()
                submitted.append(r.json()["job_id"])
            pending = set(submitted)
            deadline = time.monotonic() + args.round_timeout
            while pending:  # the completion check reads the database through one replica, twice a second
                if time.monotonic() > deadline:
                    raise SystemExit(f"{len(pending)} job(s) not finished after {args.round_timeout} s")
                for job_id in list(pending):
                    body = client.get(f"{apis[0].url}{API}/status/{job_id}").json()
                    if body["status"] in FINISHED:
                        if body["status"] != "completed":
                            errors.append(f"job {body['status']}: {body.get('error')}")
                        pending.discard(job_id)
                time.sleep(0.5)
        wall = time.perf_counter() - start
    finally:
        stop.set()
        poller.join()
        with httpx.Client(timeout=60) as client:
            for job_id in submitted:
                client.delete(f"{apis[0].url}{API}/cleanup/{job_id}")
    if not report:
        return
    print(f"| {label} | {jobs} | {wall:.1f} | {jobs / wall * 60:.1f} | {len(latencies)} | "
          f"{pct(latencies, 50):.1f} | {pct(latencies, 99):.1f} | {max(latencies, default=float('nan')):.1f} | "
          f"{len(errors)} | {before} | {load()} |", flush=True)
    if errors:
        print(f"#   errors: {statistics.multimode(errors)[:3]}")


# -------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=("all", "claims", "fleet"), default="all")
    claims = parser.add_argument_group("claims")
    claims.add_argument("--claim-jobs", type=int, default=400)
    claims.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    claims.add_argument("--database-url", default=None, help="an existing PostgreSQL (its lipsync_* tables are "
                                                             "truncated); default: a throwaway cluster")
    claims.add_argument("--no-sqlite", action="store_true", help="skip the SQLite reference rows")
    fleet = parser.add_argument_group("fleet")
    fleet.add_argument("--configs", nargs="+", default=["1x2", "2x2"], help="<API replicas>x<job workers per "
                                                                              "replica>, in order")
    fleet.add_argument("--jobs", type=int, default=6, help="measured jobs per config")
    fleet.add_argument("--warmup", type=int, default=1, help="warm-up jobs per replica when one starts")
    fleet.add_argument("--audio-seconds", type=float, default=0.8)
    fleet.add_argument("--video-seconds", type=float, default=1.0)
    fleet.add_argument("--status-rate", type=float, default=20.0)
    fleet.add_argument("--round-timeout", type=float, default=600.0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    print(f"# bench_scale {args.what}, {time.strftime('%Y-%m-%d %H:%M:%S')}; uptime: {uptime()}", flush=True)
    with ExitStack() as stack:
        if args.what in ("all", "claims"):
            run_claims(args, stack)
        if args.what in ("all", "fleet"):
            run_fleet(args, stack)
    print(f"\n# done in {time.perf_counter() - t0:.0f} s; uptime: {uptime()}")


if __name__ == "__main__":
    main()
