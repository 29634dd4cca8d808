"""Load (short form of bench/bench_load.py) and admission control, on the real server over loopback.

- While 2 jobs run, 8 client threads call status, jobs and health for ~15 s (bounded by time and
  count): no errors, and status p99 stays under a second (p50/p99 are printed; run with -s).
- With `LIP_SYNC_MAX_QUEUED_JOBS=1`, generate answers 429 with a numeric Retry-After once a job
  is waiting, on the REST route and on the BentoML endpoint.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

from bench.bench_load import hammer, percentile, start_jobs, submit, table
from lipsync_runner.media.samples import write_speech_like_audio

from .server import Server, running_server

API = "/api/lip-sync"
LOAD_SECONDS = float(os.environ.get("LIP_SYNC_LOAD_SECONDS", "15"))
STATUS_P99_LIMIT_S = float(os.environ.get("LIP_SYNC_LOAD_STATUS_P99_S", "1.0"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir) -> Server:
    with running_server(tmp_path_factory.mktemp("load"), models_dir, LIP_SYNC_JOB_WORKERS="2",
                        LIP_SYNC_MAX_QUEUED_JOBS="1") as srv:
        yield srv


@pytest.fixture(scope="module")
def long_audio(tmp_path_factory):
    return write_speech_like_audio(tmp_path_factory.mktemp("load-media") / "speech_40s.wav", seconds=40,
                                   sample_rate=16000)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def cleanup(client: httpx.Client, job_ids: list[str]) -> None:
    for job_id in job_ids:
        client.delete(f"{API}/cleanup/{job_id}")


@pytest.fixture(scope="module")
def load(server, client, media_dir, long_audio):
    """~15 s of 8 threads calling status, jobs and health while 2 jobs run; the jobs' states after."""
    job_ids = start_jobs(server.url, media_dir / "face.mp4", long_audio, 2)
    try:
        running = [client.get(f"{API}/status/{j}").json()["status"] for j in job_ids]
        assert running == ["processing", "processing"], running
        result = hammer(server.url, job_ids, threads=8, duration_s=LOAD_SECONDS, max_requests_per_thread=2000)
        print(f"\n{len(result.samples)} requests in {result.wall_s:.1f} s with 2 jobs running\n{table(result)}")
        after = [client.get(f"{API}/status/{j}").json() for j in job_ids]
        yield result, after
    finally:
        cleanup(client, job_ids)


def test_status_and_jobs_stay_fast_and_error_free_while_jobs_run(load):
    result, after = load
    for kind in ("status", "jobs", "health"):
        assert len(result.of(kind)) >= 8, f"too few {kind} requests"
    errors = [s for s in result.errors if s.kind in ("status", "jobs")]
    assert not errors, [s.error for s in errors[:5]]
    status_s = [s.seconds for s in result.of("status")]
    p50, p99 = percentile(status_s, 50), percentile(status_s, 99)
    print(f"status latency: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert p99 < STATUS_P99_LIMIT_S, f"status p99 {p99:.3f} s"
    # the jobs were really working meanwhile
    assert all(b["status"] in ("processing", "completed") for b in after), [(b["status"], b["error"]) for b in after]
    print("jobs after the load: " + ", ".join(f"{b['status']} ({b['stage']}, {b['progress']:.2f})" for b in after))


def test_health_stays_200_while_jobs_run(load):
    result, _ = load
    errors = [s for s in result.errors if s.kind == "health"]
    assert not errors, f"{len(errors)} of {len(result.of('health'))}: {errors[0].error}"


@pytest.fixture(scope="module")
def full_queue(server, client, media_dir, long_audio):
    """Submit long jobs as fast as possible until generate refuses one; yields (accepted ids, the 429)."""
    accepted: list[str] = []
    refused = None
    try:
        for _ in range(8):
            r = submit(client, media_dir / "face.mp4", long_audio)
            if r.status_code == 429:
                refused = r
                break
            assert r.status_code == 202, r.text
            accepted.append(r.json()["job_id"])
        yield accepted, refused
    finally:
        cleanup(client, accepted)


def test_generate_answers_429_with_retry_after_beyond_the_queue_limit(full_queue, client):
    accepted, refused = full_queue
    assert refused is not None, f"{len(accepted)} jobs accepted with LIP_SYNC_MAX_QUEUED_JOBS=1"
    # 2 workers busy + 1 waiting: the next one is refused
    assert len(accepted) <= 3, accepted
    assert refused.headers["retry-after"].isdigit() and 1 <= int(refused.headers["retry-after"]) <= 600
    body = refused.json()
    print(f"\n{len(accepted)} accepted, then 429 Retry-After: {refused.headers['retry-after']}: {body['error']}")
    assert "busy" in body["error"] and "try again" in body["error"], body
    counts = client.get(f"{API}/health").json()["jobs"]
    assert counts["queued"] >= 1, counts


def test_the_bentoml_generate_endpoint_also_answers_429_with_retry_after(full_queue, server, media_dir,
                                                                           long_audio):
    accepted, refused = full_queue
    assert refused is not None
    with httpx.Client(base_url=server.url, timeout=60) as c, (media_dir / "face.mp4").open("rb") as v, \
            long_audio.open("rb") as a:
        r = c.post("/generate", files={"video": ("face.mp4", v), "audio": ("speech.wav", a)})
    if r.status_code == 202:
        accepted.append(r.json()["job_id"])  # cleaned up by the fixture
    assert r.status_code == 429, r.text
    assert r.headers.get("retry-after", "").isdigit(), dict(r.headers)


def test_a_refused_upload_leaves_nothing_and_a_freed_slot_is_usable(full_queue, server, client, media_dir,
                                                                    long_audio):
    accepted, _ = full_queue
    listed = {j["job_id"] for j in client.get(f"{API}/jobs", params={"limit": 1000}).json()["jobs"]}
    dirs = {p.name for p in (server.data_dir / "jobs").iterdir()}
    assert dirs <= listed, dirs - listed  # the 429s left no upload directory
    queued = [j for j in accepted if client.get(f"{API}/status/{j}").json()["status"] == "queued"]
    assert queued
    assert client.post(f"{API}/cancel/{queued[0]}").status_code == 200
    deadline = time.monotonic() + 10
    while (r := submit(client, media_dir / "face.mp4", long_audio)).status_code == 429:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    assert r.status_code == 202, r.text
    accepted.append(r.json()["job_id"])
