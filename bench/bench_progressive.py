"""Progressive output: time from submit to the first playable segment, against the time to the finished MP4.

    python bench/bench_progressive.py                       # tiny models on the CPU, a 10 s 720p clip
    python bench/bench_progressive.py --seconds 4 --height 360 --width 640   # a quicker run
    python bench/bench_progressive.py --models DIR --device cuda              # e.g. real weights on a GPU

It starts the real server (tests/server.py: `bentoml serve service:LipSync`, API service plus runner
service on 127.0.0.1) with the avatar cache on, writes a --seconds talking-head clip at --width x
--height, 25 fps, and as much speech-like audio, and submits it --runs times, one job at a time:

- **cold**: the first submit of the video (no avatar cache entry: decode, face tracking, VAE encode);
- **warm**: the same video again (the cache has its face track and latents).

For each job it polls the status every --poll-s and reports, from the moment the upload began:
`first_segment_s` (the status first shows `progressive`: the playlist lists a stored segment, which
the test suite checks decodes), `first_fetch_s` (the playlist and its first segment fetched and the
segment's bytes in hand), `mp4_s` (the status says completed: the MP4 is downloadable) and their
ratio. The server's segment length is --segment-s (LIP_SYNC_PROGRESSIVE_SEGMENT_S). The machine's
load is printed (os.getloadavg at the start and the end) since on a shared machine it moves the
figures. It also encodes the clip's frames with the service's writer twice, with and without the
progressive copy, and reports the MP4's size and the encode's wall time for each: the keyframes forced
at every segment cut are the price of one shared encode. The last line is the whole result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

API = "/api/lip-sync"


def one_job(client: httpx.Client, video: Path, audio: Path, poll_s: float, timeout_s: float) -> dict:
    t0 = time.perf_counter()
    with video.open("rb") as v, audio.open("rb") as a:
        r = client.post(f"{API}/generate", files={"video": (video.name, v, "video/mp4"),
                                                  "audio": (audio.name, a, "audio/wav")})
    r.raise_for_status()
    job_id = r.json()["job_id"]
    first = fetched = None
    while True:
        body = client.get(f"{API}/status/{job_id}").json()
        now = time.perf_counter() - t0
        if first is None and body.get("progressive"):
            first = now
            playlist = client.get(body["progressive"]["playlist"]).text
            segment = next(line for line in playlist.splitlines() if line and not line.startswith("#"))
            client.get(f"{API}/jobs/{job_id}/live/init.mp4").raise_for_status()
            client.get(f"{API}/jobs/{job_id}/{segment}").raise_for_status()
            fetched = time.perf_counter() - t0
        if body["status"] in ("completed", "failed", "cancelled"):
            if body["status"] != "completed":
                raise RuntimeError(f"job {job_id} {body['status']}: {body.get('error')}")
            return {"job_id": job_id, "first_segment_s": round(first, 2) if first is not None else None,
                    "first_fetch_s": round(fetched, 2) if fetched is not None else None, "mp4_s": round(now, 2),
                    "first_over_mp4": round(first / now, 3) if first is not None else None,
                    "avatar_cache": body.get("avatar_cache"),
                    "playable_s": (body.get("progressive") or {}).get("playable_seconds"),
                    "server_total_s": (body.get("timings") or {}).get("total_s")}
        if now > timeout_s:
            raise RuntimeError(f"job {job_id} still {body['status']} after {timeout_s} s")
        time.sleep(poll_s)


def mp4_cost(video: Path, work: Path, segment_s: float) -> dict:
    """The MP4 the service's writer makes of the clip's frames, without and with the progressive copy."""
    from lipsync_runner.media.ffmpeg import VideoReader, VideoWriter
    from lipsync_runner.media.hls import HlsOutput

    out: dict[str, dict] = {}
    for label, hls in (("mp4_only", None), ("with_progressive", HlsOutput(work / "hls", segment_s))):
        if hls is not None:
            hls.directory.mkdir(exist_ok=True)
        path = work / f"{label}.mp4"
        t0 = time.perf_counter()
        with VideoReader(video) as reader, VideoWriter(path, reader.width, reader.height, reader.info.fps,
                                                       hls=hls) as writer:
            while len(chunk := reader.read_chunk(32)):
                writer.write(chunk)
        out[label] = {"bytes": path.stat().st_size, "wall_s": round(time.perf_counter() - t0, 2)}
    out["size_ratio"] = round(out["with_progressive"]["bytes"] / out["mp4_only"]["bytes"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=os.environ.get("MUSETALK_MODELS_DIR") or None,
                        help="models dir (default: $MUSETALK_MODELS_DIR, else tiny random weights)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--segment-s", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=2, help="1 cold, then warm ones")
    parser.add_argument("--poll-s", type=float, default=0.05)
    parser.add_argument("--timeout-s", type=float, default=1200.0)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()

    from tests.server import start_server, stop_server

    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio
    from lipsync_runner.models.tiny import write_models_dir

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-progressive-", dir=args.work) as tmp:
        work = Path(tmp)
        models = args.models or write_models_dir(work / "models-tiny")
        video = write_face_video(work / "face.mp4", seconds=args.seconds, size=(args.width, args.height))
        audio = write_speech_like_audio(work / "speech.wav", seconds=args.seconds)
        env = {"LIP_SYNC_PROGRESSIVE_SEGMENT_S": f"{args.segment_s:g}", "LIP_SYNC_DEVICE": device,
               "LIP_SYNC_JOB_WORKERS": "1"}
        if device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES") or "0"
        server = start_server(work, models, timeout=600, **env)
        try:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                health = client.get(f"{API}/health").json()
                header = {"models": str(args.models or "tiny"), "device": health.get("device"), "cpus": os.cpu_count(),
                          "clip": f"{args.seconds:g} s {args.width}x{args.height} 25 fps", "segment_s": args.segment_s,
                          "load_before": [round(x, 1) for x in os.getloadavg()]}
                print("# " + json.dumps(header), flush=True)
                runs = []
                for i in range(args.runs):
                    run = {"run": "cold" if i == 0 else "warm", **one_job(client, video, audio, args.poll_s,
                                                                         args.timeout_s)}
                    runs.append(run)
                    print(json.dumps(run), flush=True)
        finally:
            stop_server(server)
        cost = mp4_cost(video, work, args.segment_s)
        print("# mp4 " + json.dumps(cost), flush=True)
    result = {**header, "load_after": [round(x, 1) for x in os.getloadavg()], "runs": runs, "mp4": cost}
    print(f"\n{'run':5} {'first segment s':>16} {'first fetched s':>16} {'MP4 s':>8} {'ratio':>6}")
    for r in runs:
        print(f"{r['run']:5} {r['first_segment_s']!s:>16} {r['first_fetch_s']!s:>16} {r['mp4_s']:>8} "
              f"{r['first_over_mp4']!s:>6}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
