"""Hostile-input bounds of the media layer (issue 11, items 1 and 2), measured.

    python bench/bench_media_limits.py                      # a 2M-line metadata file, 10 min of hidden audio
    python bench/bench_media_limits.py --lines 4000000 --hidden-minutes 60

Each measurement runs in a fresh Python process so its peak RSS (ru_maxrss) is its own:

- probe: probe_video on an MKV whose title tag has --lines lines (a few bytes each in the
  file, ~22 bytes each every time ffmpeg prints the input summary). Wall seconds and the
  process's peak RSS growth; the probe refuses it (400, header too large).
- decode: decode_audio on an M4A whose packet durations are edited so it declares under a
  second while it holds --hidden-minutes of audio, with max_seconds=--limit-s. Wall seconds,
  peak RSS growth and tracemalloc's peak; it stops with 413 at the limit.

Prints the load average with every figure (the machine is shared), then the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, resource, sys, time, tracemalloc
from lipsync_runner.media import ffmpeg as media
kind, path, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
start = time.perf_counter()
try:
    if kind == "probe":
        media.probe_video(path)
    else:
        media.decode_audio(path, max_seconds=limit)
    outcome = "accepted"
except Exception as exc:
    outcome = f"{getattr(exc, 'http_status', '?')}: {exc}"
seconds = time.perf_counter() - start
traced = tracemalloc.get_traced_memory()[1]
rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
print(json.dumps({"seconds": round(seconds, 2), "rss_growth_mb": round(rss / 2**20, 1),
                  "traced_peak_mb": round(traced / 2**20, 1), "outcome": outcome}))
"""


def measure(kind: str, path: Path, limit: float = 0) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), str(limit)], capture_output=True, text=True,
                         cwd=ROOT, check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"load": round(os.getloadavg()[0], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2_000_000)
    parser.add_argument("--hidden-minutes", type=float, default=10)
    parser.add_argument("--limit-s", type=float, default=600)
    args = parser.parse_args()
    from tests.hostile_media import ffmpeg, mkv_with_huge_metadata, mp4_with_sample_durations

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ffmpeg("-f", "lavfi", "-i", "testsrc2=s=64x64:r=25:d=1", "-c:v", "libx264", "-preset", "ultrafast",
               d / "clip.mkv")
        meta = mkv_with_huge_metadata(d / "clip.mkv", d / "metadata.mkv", lines=args.lines)
        seconds = args.hidden_minutes * 60
        ffmpeg("-f", "lavfi", "-i", f"sine=f=300:r=8000:d={seconds}", "-c:a", "aac", "-b:a", "12k",
               "-use_editlist", "0", d / "real.m4a")
        hidden = mp4_with_sample_durations(d / "real.m4a", d / "hidden.m4a", delta=8)  # 1/128 of its length
        result = {
            "probe_metadata": {"file_mb": round(meta.stat().st_size / 2**20, 1), "lines": args.lines,
                               **measure("probe", meta)},
            "decode_hidden_audio": {"file_mb": round(hidden.stat().st_size / 2**20, 2), "real_s": seconds,
                                    "declared_s": round(seconds / 128, 2), "limit_s": args.limit_s,
                                    "limit_mb": round((args.limit_s + 0.5) * 16000 * 4 / 2**20, 1),
                                    **measure("decode", hidden, args.limit_s)},
        }
    for name, r in result.items():
        print(f"{name:22s} " + ", ".join(f"{k}={v}" for k, v in r.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
