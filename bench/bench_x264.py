"""What the x264 preset and thread count cost and buy, for the pipeline's output encode.

    python bench/bench_x264.py                          # 10 s 720p clip; superfast/veryfast/faster x threads auto/1/2
    python bench/bench_x264.py --presets veryfast --threads 0 --crf 18 23
    python bench/bench_x264.py --seconds 2 --size 320x240   # a quick smoke run

The clip is the test clip of bench_pipeline_cpu.py (a synthetic talking head with a real face,
`lipsync_runner.models.tiny.write_face_video`, 25 fps, with speech-like audio). It is decoded once
into memory; each setting then encodes the same RGB frames through the pipeline's own writer
(`media.VideoWriter`: rgb24 on a pipe -> yuv420p -> x264 at that preset/crf/threads + AAC), so the
ffmpeg child's CPU seconds are the encoder's alone. Quality is measured against the source clip
with ffmpeg's psnr and ssim filters (the average over all frames, luma and chroma together).
Each setting runs --repeats times and the fastest wall time is kept; CPU seconds are less
disturbed by neighbours than wall time, which is why both are printed. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from bench.bench_pipeline_cpu import machine  # noqa: E402

_PSNR_RE = re.compile(r"PSNR .*? average:([\d.]+|inf)")
_SSIM_RE = re.compile(r"SSIM .*? All:([\d.]+)")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def quality(output: Path, source: Path) -> tuple[float, float]:
    """(PSNR dB, SSIM) of output against source, averaged over the frames."""
    from lipsync_runner.media.ffmpeg import ffmpeg_exe

    graph = "[0:v]split[a][b];[1:v]split[c][d];[a][c]psnr;[b][d]ssim"
    res = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(output), "-i", str(source),
                          "-lavfi", graph, "-f", "null", "-"], capture_output=True, text=True, check=True)
    psnr, ssim = _PSNR_RE.search(res.stderr), _SSIM_RE.search(res.stderr)
    if not psnr or not ssim:
        raise RuntimeError(f"no psnr/ssim in ffmpeg's output: {res.stderr[-500:]}")
    return float(psnr.group(1)), float(ssim.group(1))


def encode(frames, info, audio: Path, out: Path, preset: str, crf: int, threads: int) -> tuple[float, float]:
    from lipsync_runner.media.ffmpeg import VideoWriter

    cpu0, t0 = _children_cpu(), time.perf_counter()
    with VideoWriter(out, info.width, info.height, info.fps, audio_path=audio, crf=crf, preset=preset,
                     threads=threads or None) as writer:
        for start in range(0, len(frames), 16):
            writer.write(frames[start : start + 16])
    return time.perf_counter() - t0, _children_cpu() - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--presets", nargs="+", default=["superfast", "veryfast", "faster"])
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1, 2], help="0: ffmpeg's default (auto)")
    parser.add_argument("--crf", type=int, nargs="+", default=[18])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import numpy as np

    from lipsync_runner.media.ffmpeg import VideoReader, probe_video
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

    w, h = (int(v) for v in args.size.lower().split("x"))
    print(f"# machine: {machine()}; load average {[round(x, 2) for x in os.getloadavg()]}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-x264-") as tmp:
        work = Path(tmp)
        source = write_face_video(work / "clip.mp4", seconds=args.seconds, size=(w, h), fps=25)
        audio = write_speech_like_audio(work / "speech.wav", seconds=args.seconds)
        info = probe_video(source)
        with VideoReader(source, info) as reader:
            frames = np.concatenate(_read_all(reader))
        print(f"# {len(frames)} frames {w}x{h} from a {source.stat().st_size // 1024} KB crf-12 clip", flush=True)
        for crf in args.crf:
            for preset in args.presets:
                for threads in args.threads:
                    out = work / f"{preset}-{threads}-{crf}.mp4"
                    best = None
                    load_before = round(os.getloadavg()[0], 2)
                    for _ in range(args.repeats):
                        wall, cpu = encode(frames, info, audio, out, preset, crf, threads)
                        best = (wall, cpu) if best is None or wall < best[0] else best
                    psnr, ssim = quality(out, source)
                    row = {"preset": preset, "threads": threads or "auto", "crf": crf, "wall_s": round(best[0], 2),
                           "encoder_cpu_s": round(best[1], 2),
                           "encoder_cpu_ms_per_frame": round(best[1] * 1000 / len(frames), 2),
                           "size_kb": out.stat().st_size // 1024, "psnr_db": psnr, "ssim": ssim,
                           "load_before": load_before, "load_after": round(os.getloadavg()[0], 2)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    ref = next((r for r in rows if r["preset"] == "veryfast" and r["threads"] == "auto"), rows[0])
    print("\n| preset | threads | crf | wall s | encoder CPU ms/frame | size KB | size vs veryfast | PSNR dB | SSIM | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['threads']} | {r['crf']} | {r['wall_s']} | {r['encoder_cpu_ms_per_frame']} | "
              f"{r['size_kb']} | {r['size_kb'] / ref['size_kb']:.2f}x | {r['psnr_db']:.2f} | {r['ssim']:.5f} | "
              f"{r['load_before']} / {r['load_after']} |")
    print(json.dumps({"machine": machine(), "rows": rows}))


def _read_all(reader):
    chunks = []
    while len(chunk := reader.read_chunk(64)):
        chunks.append(chunk)
    return chunks


if __name__ == "__main__":
    main()
