"""Live sessions through the real server: latency, one session's frame rate, sessions at once.

    python bench/bench_live.py                      # tiny models on the CPU, 1, 2 and 4 sessions
    python bench/bench_live.py --sessions 1 --seconds 5   # a quick smoke run

It starts `bentoml serve service:LipSync` (tests/server.py, the API and runner services on
127.0.0.1, with a token, so the WebSocket goes through every middleware of service.py), prepares
one avatar (a --width x --height talking-head clip of --avatar-seconds) and then measures:

- **latency**: one session fed --seconds of speech in real time (100 ms chunks): the server's
  time from the arrival of a speech frame's last sample to the frame entering the encoder
  (the end message's latency_ms, p50 and p99 over the session's batches);
- **sustained frames/s of one session**: the same speech sent at once; speech frames over the
  seconds from the first media fragment to the end message (pacing caps it at the avatar's fps);
- **sessions at once**: N sessions fed in real time together; a session holds real time when its
  p99 latency stays under --hold-ms and it dropped nothing. With each round, from /metrics: the
  runner's generate batches, their mean rows and how many sessions each mixed (frames of concurrent
  sessions share batches: they call the same runner endpoints through its adaptive batcher).

The last line is the whole result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

TOKEN = "bench-live"


def speech_pcm(root: Path, seconds: float) -> bytes:
    from lipsync_client.live import read_pcm
    from lipsync_runner.media.ffmpeg import ffmpeg_exe
    from lipsync_runner.media.samples import write_speech_like_audio

    mp3 = write_speech_like_audio(root / "speech.mp3", seconds=seconds)
    wav = root / "speech.wav"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(mp3), "-ar", "16000", "-ac", "1",
                    "-sample_fmt", "s16", str(wav)], check=True)
    return read_pcm(wav)


def one_session(url: str, avatar_id: str, pcm: bytes, realtime: bool) -> dict:
    from lipsync_client import LipSyncClient
    from lipsync_client.live import sender_thread

    with LipSyncClient(url, TOKEN, timeout=300) as c, c.live(avatar_id) as session:
        sender = sender_thread(session, pcm, realtime=realtime)
        first_media = None
        for message in session:
            if isinstance(message, bytes) and first_media is None and message[4:8] == b"moof":
                first_media = time.monotonic()
        done = time.monotonic()
        sender.join()
    end = session.end_message or {}
    end["media_s"] = round(done - (first_media or done), 2)
    return end


def holds(end: dict, hold_ms: float) -> bool:
    latency = end.get("latency_ms") or {}
    return bool(latency) and latency["p99"] <= hold_ms and end.get("dropped", 0) == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=10.0, help="speech per session")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--avatar-seconds", type=float, default=2.0)
    parser.add_argument("--hold-ms", type=float, default=1000.0, help="p99 latency under which a session holds")
    parser.add_argument("--models", type=Path, help="models directory (default: tiny random weights)")
    args = parser.parse_args()

    import httpx

    from bench.bench_service import scrape
    from lipsync_client import LipSyncClient
    from lipsync_runner.media.samples import write_face_video
    from tests.server import running_server

    result: dict = {"machine": f"{os.cpu_count()} CPUs", "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = args.models
        if models is None:
            from lipsync_runner.models.tiny import write_models_dir

            models = write_models_dir(root / "models", versions=("v15",))
        clip = write_face_video(root / "avatar.mp4", seconds=args.avatar_seconds, fps=25,
                                size=(args.width, args.height))
        pcm = speech_pcm(root, args.seconds)
        (root / "srv").mkdir()
        with running_server(root / "srv", models, LIP_SYNC_API_TOKENS=TOKEN,
                            LIP_SYNC_LIVE_SESSIONS_PER_CLIENT=str(max(args.sessions)),
                            LIP_SYNC_LIVE_MAX_SESSIONS=str(max(args.sessions))) as server:
            with LipSyncClient(server.url, TOKEN, timeout=300) as c:
                avatar = c.create_avatar(clip)
                avatar_id = c.wait_avatar(avatar.avatar_id, timeout=600).avatar_id
            one_session(server.url, avatar_id, pcm[: 32000], realtime=False)  # warm-up, not counted
            realtime = one_session(server.url, avatar_id, pcm, realtime=True)
            result["latency_ms"] = realtime.get("latency_ms")
            result["realtime_session"] = realtime
            fast = one_session(server.url, avatar_id, pcm, realtime=False)
            result["sustained_fps"] = round(fast["speech_frames"] / max(fast["media_s"], 1e-6), 1)
            result["fast_session"] = fast
            rounds = []
            metrics = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
            for n in args.sessions:
                before = scrape(metrics)
                ends: list[dict] = []
                threads = [threading.Thread(target=lambda: ends.append(one_session(server.url, avatar_id, pcm, True)))
                           for _ in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                after = scrape(metrics)
                batches = after["jobs_count"] - before["jobs_count"]
                rounds.append({"sessions": n, "holding": sum(holds(e, args.hold_ms) for e in ends),
                               "p99_ms": [(e.get("latency_ms") or {}).get("p99") for e in ends],
                               "idle": [e.get("idle_frames") for e in ends],
                               # the runner's generate batches in the round: how many sessions each mixed
                               "sessions_per_batch": round((after["jobs_sum"] - before["jobs_sum"])
                                                           / max(batches, 1), 2),
                               "mixed_batches": round(1 - (after["jobs_single"] - before["jobs_single"])
                                                      / max(batches, 1), 2),
                               "frames_per_batch": round((after["generate_sum"] - before["generate_sum"])
                                                         / max(after["generate_count"] - before["generate_count"], 1),
                                                         1)})
                print(f"{n} sessions: {rounds[-1]}", file=sys.stderr)
            result["rounds"] = rounds
    result["load_after"] = os.getloadavg()[0]
    print(f"latency p50/p99 ms: {result['latency_ms']}; sustained fps of one session: {result['sustained_fps']}",
          file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
