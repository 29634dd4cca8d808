"""Scale-out benchmarks: the shared queue's claim latency, and a fleet of API replicas on one runner.

    python bench/bench_scale.py claims                      # PostgreSQL vs SQLite claim latency, 1/4/16 workers
    python bench/bench_scale.py claims --database-url postgresql://...   # an existing server (tables lipsync_*)
    python bench/bench_scale.py fleet --configs 1x2 2x2 1x4 --jobs 12    # jobs/min and status p99

``claims`` queues --jobs jobs and lets W worker threads drain the queue with ``claim()`` (and a
lease renewal after each, as the heartbeat does), split over two stores as two replicas would be;
it prints the latency of one claim (p50/p99) and claims per second. Without --database-url it
starts a throwaway PostgreSQL cluster on the loopback (tests/backends.py).

``fleet`` starts a throwaway PostgreSQL, moto's S3 server and one MuseTalkRunner, then for each
config ``<replicas>x<job workers per replica>`` that many LipSync API replicas apart (as
deploy/kubernetes does, tiny random-weight models on the CPU); it submits --jobs jobs round-robin
over the replicas while a client polls ``GET /status`` at --status-rate per second (round-robin
too), and prints jobs per minute (first submit to last completion) and status latency.
Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

API = "/api/lip-sync"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ------------------------------------------------------------------------------------------ claims


def bench_claims(make_store, label: str, jobs: int, workers: int) -> None:
    from lipsync_runner.jobs import JobRecord, new_job_id

    stores = [make_store(), make_store()]  # two replicas
    for _ in range(jobs):
        stores[0].create(JobRecord(job_id=new_job_id(), video_filename="v.mp4", audio_filename="a.wav",
                                   video_file="video.mp4", audio_file="audio.wav"))
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
    assert len(latencies) == jobs, (len(latencies), jobs)
    ms = [x * 1000 for x in latencies]
    print(f"| {label} | {workers} | {jobs} | {pct(ms, 50):.2f} | {pct(ms, 99):.2f} | {max(ms):.1f} | "
          f"{jobs / wall:.0f} | {load()} |", flush=True)
    for store in stores:
        store.close()


def run_claims(args: argparse.Namespace) -> None:
    from contextlib import ExitStack

    from lipsync_runner.jobs.postgres import PostgresJobStore
    from lipsync_runner.jobs.store import SQLiteJobStore

    print("| store | workers | jobs | claim p50 ms | claim p99 ms | max ms | claims/s | load |")
    print("|---|---|---|---|---|---|---|---|")
    with ExitStack() as stack:
        if args.database_url:
            base_url, create = args.database_url, None
        else:
            from tests.backends import postgres_cluster

            cluster = stack.enter_context(postgres_cluster())
            base_url, create = None, cluster.create_database
        for workers in args.workers:
            url = base_url or create()
            if base_url:  # an existing server: start from an empty queue
                import psycopg

                PostgresJobStore(url).close()
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("TRUNCATE lipsync_jobs, lipsync_uploads")
            bench_claims(lambda: PostgresJobStore(url, pool_size=max(2, workers)), "PostgreSQL", args.jobs, workers)
        for workers in args.workers:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            shared = SQLiteJobStore(tmp / "jobs.sqlite3")  # one process: both "replicas" share the file
            bench_claims(lambda: shared, "SQLite (one process)", args.jobs, workers)


# ------------------------------------------------------------------------------------------- fleet


def run_fleet(args: argparse.Namespace) -> None:
    import httpx

    from lipsync_runner.testing import write_face_video, write_models_dir, write_speech_like_audio
    from tests.backends import fleet_env, postgres_cluster, s3_server, start_bento, wait_ready
    from tests.server import stop_server

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp, postgres_cluster() as pg, s3_server() as s3:
        root = Path(tmp)
        models = write_models_dir(root / "models", versions=("v15",))
        media = root / "media"
        media.mkdir()
        write_face_video(media / "face.mp4", seconds=2.0, size=(320, 240))
        write_speech_like_audio(media / "speech.wav", seconds=args.audio_seconds)
        bucket = s3.create_bucket()
        database = pg.create_database()
        env = fleet_env(root, models, database, f"s3://{bucket}/bench", s3.endpoint_url,
                        LIP_SYNC_MAX_QUEUED_JOBS="1000")
        runner = start_bento(root, "runner", ["--service-name", "MuseTalkRunner"], env)
        api_args = ["--service-name", "LipSync", "--depends", f"MuseTalkRunner={runner.url}"]
        try:
            wait_ready(runner)
            print(f"# {args.jobs} jobs of {args.audio_seconds} s speech on a 2 s 320x240 clip, status polled "
                  f"{args.status_rate}/s; one runner")
            print("| API replicas x job workers | jobs | wall s | jobs/min | status n | status p50 ms | status p99 ms | "
                  "status max ms | errors | load before | load after |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for config in args.configs:
                replicas, workers = (int(x) for x in config.lower().split("x"))
                apis = [start_bento(root, f"api-{config}-{i}", api_args, {**env, "LIP_SYNC_JOB_WORKERS": str(workers)})
                        for i in range(replicas)]
                try:
                    for server in apis:
                        wait_ready(server)
                    fleet_round(apis, media, args, httpx, label=config)
                finally:
                    for server in apis:
                        stop_server(server)
        finally:
            stop_server(runner)


def fleet_round(apis, media: Path, args: argparse.Namespace, httpx, label: str) -> None:
    before = load()
    latencies: list[float] = []
    errors: list[str] = []
    jobs: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        i = 0
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                if jobs:
                    server = apis[i % len(apis)]
                    t = time.perf_counter()
                    try:
                        r = client.get(f"{server.url}{API}/status/{jobs[i % len(jobs)]}")
                        if r.status_code != 200:
                            errors.append(str(r.status_code))
                    except httpx.HTTPError as e:
                        errors.append(type(e).__name__)
                    latencies.append((time.perf_counter() - t) * 1000)
                    i += 1
                time.sleep(1 / args.status_rate)

    poller = threading.Thread(target=poll)
    poller.start()
    start = time.perf_counter()
    try:
        with httpx.Client(timeout=120) as client:
            for k in range(args.jobs):
                server = apis[k % len(apis)]
                with (media / "face.mp4").open("rb") as v, (media / "speech.wav").open("rb") as a:
                    r = client.post(f"{server.url}{API}/generate",
                                    files={"video": ("face.mp4", v, "video/mp4"), "audio": ("s.wav", a, "audio/wav")})
                r.raise_for_status()
                jobs.append(r.json()["job_id"])
            pending = set(jobs)
            while pending:
                for job_id in list(pending):
                    body = client.get(f"{apis[0].url}{API}/status/{job_id}").json()
                    if body["status"] in ("completed", "failed", "cancelled"):
                        if body["status"] != "completed":
                            errors.append(f"job {body['status']}: {body.get('error')}")
                        pending.discard(job_id)
                time.sleep(0.5)
        wall = time.perf_counter() - start
    finally:
        stop.set()
        poller.join()
    with httpx.Client(timeout=60) as client:
        for job_id in jobs:
            client.delete(f"{apis[0].url}{API}/cleanup/{job_id}")
    print(f"| {label} | {args.jobs} | {wall:.1f} | {args.jobs / wall * 60:.1f} | {len(latencies)} | "
          f"{pct(latencies, 50):.1f} | {pct(latencies, 99):.1f} | {max(latencies, default=float('nan')):.1f} | "
          f"{len(errors)} | {before} | {load()} |", flush=True)
    if errors:
        print(f"#   errors: {statistics.multimode(errors)[:3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    claims = sub.add_parser("claims")
    claims.add_argument("--jobs", type=int, default=2000)
    claims.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    claims.add_argument("--database-url", default=None)
    fleet = sub.add_parser("fleet")
    fleet.add_argument("--configs", nargs="+", default=["1x2", "2x2", "1x4"],
                       help="<API replicas>x<job workers per replica>")
    fleet.add_argument("--jobs", type=int, default=12)
    fleet.add_argument("--audio-seconds", type=float, default=1.2)
    fleet.add_argument("--status-rate", type=float, default=20.0)
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} load {load()}")
    (run_claims if args.what == "claims" else run_fleet)(args)


if __name__ == "__main__":
    main()
