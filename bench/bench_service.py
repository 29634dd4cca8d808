"""Service throughput: N concurrent lip-sync jobs through the real server, and how the runner batched them.

    python bench/bench_service.py                          # tiny models on the CPU, 1, 4 and 16 jobs
    python bench/bench_service.py --models DIR --device cuda   # e.g. full-size random weights on a GPU
    python bench/bench_service.py --size full              # writes full-size random weights first (~3.5 GB)
    python bench/bench_service.py --concurrency 1 2 --video-seconds 1   # a quick smoke run

It starts `bentoml serve service:LipSync` (tests/server.py: the API service plus the runner service,
on 127.0.0.1) with LIP_SYNC_JOB_WORKERS=16 and LIP_SYNC_AVATAR_CACHE=false, so every job tracks
faces and VAE-encodes its crops: the same clip sent N times is N times the full work. One warm-up
job runs first (lazy initialisation, cuDNN autotuning) and is not counted. Then, for each N, it
uploads N jobs at once (a --video-seconds talking-head clip at --width x --height, and
--audio-seconds of speech-like audio), waits for all of them, and reports:

- wall seconds from the first upload to the last completion, and frames/s summed over the jobs;
- the mean job time (the server's timings.total_s, queueing included) and each stage's mean seconds;
- the runner's mean batch size for `generate`, `prepare` and `audio_pieces`, from the deltas of
  the `lipsync_runner_batch_size{endpoint}` histogram on /metrics (sum / count) over the round;
- the mean number of distinct jobs per generate batch (`lipsync_runner_jobs_per_batch`) and the
  share of generate batches that mixed 2+ jobs;
- on CUDA, the peak GPU memory in use during the round (nvidia-smi, whole device).

A job cuts each pipeline batch (4 x LIP_SYNC_CHUNK_FRAMES frames) into runner calls of
LIP_SYNC_CHUNK_FRAMES frames and sends them at once, so one job alone already fills runner batches
of up to 4 chunks; concurrency fills them up to the runner's max batch size (LIP_SYNC_MAX_BATCH_SIZE).
Jobs that fail are counted (the `failed` column, with the first error) and left out of the
frames/s; the script then exits with status 3 after printing everything. One way jobs fail under
load: BentoML's batcher sheds a queued runner request ("process is overloaded", HTTP 503) once it
estimates that the request would wait past the runner's max latency (LIP_SYNC_MAX_LATENCY_MS).
The last line is the whole result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

API = "/api/lip-sync"
ENDPOINTS = ("generate", "prepare", "audio_pieces")


# ---------------------------------------------------------------- /metrics


def _metric_sum(text: str, name: str, label: str | None = None) -> float:
    """Sum of every sample of `name` (all label sets, all processes), optionally only those with `label`."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        labels = m.group(1) or ""
        if label is None or label in labels:
            total += float(m.group(2))
    return total


def scrape(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    out: dict[str, float] = {}
    for e in ENDPOINTS:
        out[f"{e}_sum"] = _metric_sum(text, "lipsync_runner_batch_size_sum", f'endpoint="{e}"')
        out[f"{e}_count"] = _metric_sum(text, "lipsync_runner_batch_size_count", f'endpoint="{e}"')
    out["jobs_sum"] = _metric_sum(text, "lipsync_runner_jobs_per_batch_sum")
    out["jobs_count"] = _metric_sum(text, "lipsync_runner_jobs_per_batch_count")
    out["jobs_single"] = _metric_sum(text, "lipsync_runner_jobs_per_batch_bucket", 'le="1.0"')
    return out


# ---------------------------------------------------------------- GPU memory


class GpuMemoryPeak:
    """Polls nvidia-smi's memory.used (MiB, whole device) and keeps the peak."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.period_s = period_s
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("nvidia-smi") is not None

    def _read(self) -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            return max(float(x) for x in out.split())
        except Exception:  # noqa: BLE001 - a missing reading is just a missing reading
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            v = self._read()
            if v is not None:
                self.peak_mb = v if self.peak_mb is None else max(self.peak_mb, v)
            self._stop.wait(self.period_s)

    def __enter__(self) -> "GpuMemoryPeak":
        if self.available():
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


# ---------------------------------------------------------------- jobs


def submit(url: str, video: Path, audio: Path) -> str:
    with httpx.Client(base_url=url, timeout=300) as c, video.open("rb") as v, audio.open("rb") as a:
        r = c.post(f"{API}/generate", files={"video": (video.name, v, "video/mp4"),
                                             "audio": (audio.name, a, "audio/wav")})
    if r.status_code != 202:
        raise RuntimeError(f"generate answered {r.status_code}: {r.text[:300]}")
    return r.json()["job_id"]


def wait_all(client: httpx.Client, ids: list[str], timeout_s: float) -> tuple[list[dict], float]:
    """Polls until every job is terminal; returns their status bodies and when the last one ended."""
    done: dict[str, dict] = {}
    last_end = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    while len(done) < len(ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids) - len(done)} of {len(ids)} jobs not finished after {timeout_s:.0f} s")
        for job_id in ids:
            if job_id in done:
                continue
            body = client.get(f"{API}/status/{job_id}").json()
            if body["status"] in ("completed", "failed", "cancelled"):
                done[job_id] = body
                last_end = time.perf_counter()
        time.sleep(0.1)
    return [done[i] for i in ids], last_end


def run_round(client: httpx.Client, url: str, n: int, video: Path, audio: Path, timeout_s: float,
              watch_gpu: bool) -> dict:
    before = scrape(client)
    with GpuMemoryPeak() if watch_gpu else _Nothing() as gpu:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=n) as pool:
            ids = list(pool.map(lambda _: submit(url, video, audio), range(n)))
        uploaded = time.perf_counter()
        bodies, end = wait_all(client, ids, timeout_s)
    after = scrape(client)
    ok = [b for b in bodies if b["status"] == "completed"]
    failed = [b for b in bodies if b["status"] != "completed"]
    for job_id in ids:
        client.delete(f"{API}/cleanup/{job_id}")
    d = {k: after[k] - before[k] for k in after}
    wall = end - start
    frames = sum(int(b.get("frames") or 0) for b in ok)
    totals = [float((b.get("timings") or {}).get("total_s", 0.0)) for b in ok] or [0.0]
    row = {
        "jobs": n, "failed": len(failed), "wall_s": round(wall, 2), "upload_s": round(uploaded - start, 2),
        "frames": frames, "fps_sum": round(frames / wall, 2), "mean_job_s": round(sum(totals) / len(totals), 2),
        "max_job_s": round(max(totals), 2),
    }
    if failed:
        row["first_error"] = failed[0].get("error")
    for e in ENDPOINTS:
        row[f"{e}_batches"] = int(d[f"{e}_count"])
        row[f"{e}_mean_batch"] = round(d[f"{e}_sum"] / d[f"{e}_count"], 2) if d[f"{e}_count"] else None
    row["jobs_per_generate_batch"] = round(d["jobs_sum"] / d["jobs_count"], 2) if d["jobs_count"] else None
    row["multi_job_batch_share"] = round(1 - d["jobs_single"] / d["jobs_count"], 3) if d["jobs_count"] else None
    stages: dict[str, float] = {}
    for b in ok:
        for k, v in (b.get("timings") or {}).items():
            stages[k] = stages.get(k, 0.0) + float(v) / len(ok)
    row["mean_stage_s"] = {k: round(v, 2) for k, v in sorted(stages.items())}
    if watch_gpu:
        row["peak_gpu_mem_mb"] = gpu.peak_mb
    return row


class _Nothing:
    peak_mb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def _report_server_errors(log: Path, keep: Path | None) -> None:
    """The server log's error lines (not its access log), and the whole log kept if asked."""
    lines = log.read_text(errors="replace").splitlines()
    errors = [i for i, line in enumerate(lines) if re.search(r"Traceback|Error|Exception|\[ERROR\]", line)
              and "status=200" not in line]
    shown: list[str] = []
    for i in errors[:3]:  # the first tracebacks in full (30 lines each), then a count
        shown += lines[i : i + 30] + ["..."]
    print("\n".join(["# server log, error lines:", *shown, f"# {len(errors)} error lines in all"]), file=sys.stderr)
    if keep is not None:
        shutil.copy(log, keep)
        print(f"# whole server log copied to {keep}", file=sys.stderr)


def print_table(result: dict) -> None:
    rows = result["rounds"]
    gpu = any(r.get("peak_gpu_mem_mb") is not None for r in rows)
    print(f"\n{result['models']} models on {result['device']}; clip {result['clip']}; chunk {result['chunk_frames']} "
          f"frames; job workers {result['job_workers']}; runner max latency {result['max_latency_ms']} ms; "
          "avatar cache off")
    print("| jobs | failed | wall s | frames | frames/s (sum) | mean job s | generate mean batch (batches) | "
          "prepare mean batch (batches) | audio mean batch | jobs per generate batch | mixed batches |"
          + (" peak GPU MiB |" if gpu else ""))
    print("|" + "---|" * (11 + gpu))
    for r in rows:
        print(f"| {r['jobs']} | {r['failed']} | {r['wall_s']:.1f} | {r['frames']} | {r['fps_sum']:.1f} | "
              f"{r['mean_job_s']:.1f} | "
              f"{r['generate_mean_batch']} ({r['generate_batches']}) | {r['prepare_mean_batch']} "
              f"({r['prepare_batches']}) | {r['audio_pieces_mean_batch']} | {r['jobs_per_generate_batch']} | "
              f"{100 * (r['multi_job_batch_share'] or 0):.0f}% |" + (f" {r.get('peak_gpu_mem_mb')} |" if gpu else ""))
    for key in ("generate_batch_ratio", "prepare_batch_ratio", "fps_ratio"):
        if key in result:
            print(f"{key.replace('_', ' ')} ({result['ratio_of']}): {result[key]}x")
    for r in rows:
        if r["failed"]:
            print(f"{r['failed']} of {r['jobs']} jobs FAILED: {r['first_error']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=os.environ.get("MUSETALK_MODELS_DIR") or None,
                        help="models dir (default: $MUSETALK_MODELS_DIR, else write random weights of --size)")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--video-seconds", type=float, default=2.0)
    parser.add_argument("--audio-seconds", type=float, default=None, help="default: --video-seconds")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--chunk-frames", type=int, default=8, help="LIP_SYNC_CHUNK_FRAMES")
    parser.add_argument("--job-workers", type=int, default=16, help="LIP_SYNC_JOB_WORKERS")
    parser.add_argument("--max-latency-ms", type=int, default=None,
                        help="LIP_SYNC_MAX_LATENCY_MS (the runner batcher's bound; default: the service's)")
    parser.add_argument("--round-timeout", type=float, default=600.0)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--server-log", type=Path, default=None, help="copy the server log here if a round fails")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()

    from tests.server import start_server, stop_server

    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio
    from lipsync_runner.models.tiny import write_models_dir

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-service-", dir=args.work) as tmp:
        work = Path(tmp)
        models = args.models or write_models_dir(work / f"models-{args.size}", size=args.size)
        label = args.size if args.models is None else str(args.models)
        video = write_face_video(work / "face.mp4", seconds=args.video_seconds, size=(args.width, args.height))
        audio = write_speech_like_audio(work / "speech.wav", seconds=args.audio_seconds or args.video_seconds)
        env = {"LIP_SYNC_JOB_WORKERS": str(args.job_workers), "LIP_SYNC_AVATAR_CACHE": "false",
               "LIP_SYNC_CHUNK_FRAMES": str(args.chunk_frames), "LIP_SYNC_DEVICE": device,
               "LIP_SYNC_MAX_QUEUED_JOBS": str(max(100, 2 * max(args.concurrency)))}
        if args.max_latency_ms is not None:
            env["LIP_SYNC_MAX_LATENCY_MS"] = str(args.max_latency_ms)
        if device.startswith("cuda"):
            env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES") or "0"
        t0 = time.perf_counter()
        server = start_server(work, models, timeout=args.start_timeout, **env)
        start_s = time.perf_counter() - t0
        try:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                health = client.get(f"{API}/health").json()
                header = {"models": label, "device": health.get("device"), "cpus": os.cpu_count(),
                          "clip": f"{args.video_seconds:g} s {args.width}x{args.height} 25 fps + "
                                  f"{args.audio_seconds or args.video_seconds:g} s audio",
                          "chunk_frames": args.chunk_frames, "job_workers": args.job_workers,
                          "max_latency_ms": args.max_latency_ms or "default",
                          "server_start_s": round(start_s, 1)}
                print("# " + json.dumps(header), flush=True)
                if not args.no_warmup:
                    warm = run_round(client, server.url, 1, video, audio, args.round_timeout, False)
                    print("# warm-up " + json.dumps(warm), flush=True)
                rounds = []
                for n in args.concurrency:
                    rounds.append(run_round(client, server.url, n, video, audio, args.round_timeout,
                                            device.startswith("cuda")))
                    print(json.dumps(rounds[-1]), flush=True)
        except Exception:
            _report_server_errors(server.log, args.server_log)
            raise
            if any(r["failed"] for r in rounds):
                _report_server_errors(server.log, args.server_log)
        finally:
            stop_server(server)
    result = {**header, "rounds": rounds}
    lo, hi = rounds[0], rounds[-1]
    if len(rounds) >= 2:
        result["ratio_of"] = f"{hi['jobs']} jobs / {lo['jobs']} job{'s' if lo['jobs'] > 1 else ''}"
        for e in ("generate", "prepare"):
            if lo[f"{e}_mean_batch"] and hi[f"{e}_mean_batch"]:
                result[f"{e}_batch_ratio"] = round(hi[f"{e}_mean_batch"] / lo[f"{e}_mean_batch"], 2)
        result["fps_ratio"] = round(hi["fps_sum"] / lo["fps_sum"], 2)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    if any(r["failed"] for r in rounds):
        sys.exit(3)  # the figures are printed, but a job failing is not a result to pass over


if __name__ == "__main__":
    main()
