"""Decode passes of a cold job: the real pipeline with a model that computes nothing.

Prints the per-stage seconds of one cold job (no avatar cache) on a synthetic real-face clip,
how many times the video was opened for decoding, and the machine's load. Run it against two
checkouts to compare (PYTHONPATH decides which `lipsync_runner` is measured):

    PYTHONPATH=/work/main .venv/bin/python bench/bench_decode_pass.py      # before
    PYTHONPATH=.           .venv/bin/python bench/bench_decode_pass.py      # after
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


class NullModel:
    """LipSyncModel that returns at once (shapes right, values constant)."""

    weights_id = "null"

    def audio_features(self, pcm: np.ndarray) -> np.ndarray:
        from lipsync_runner.audio.windows import step_count

        return np.zeros((step_count(len(pcm)), 5, 384), np.float32)

    def prepare(self, crops: np.ndarray) -> np.ndarray:
        return np.zeros((len(crops), 8, 32, 32), np.float32)

    def generate(self, latents: np.ndarray, windows: np.ndarray) -> np.ndarray:
        return np.full((len(latents), 256, 256, 3), 128, np.uint8)


def _cpu_seconds() -> tuple[float, float]:
    """User + system CPU seconds of this process and of its finished children (the ffmpeg processes)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_decode_pass"))
    parser.add_argument("--audio-factor", type=float, default=1.0, help="audio length / video length")
    args = parser.parse_args()

    import lipsync_runner
    import lipsync_runner.pipeline.job as pipeline
    from lipsync_runner.faces import HaarFaceDetector
    from lipsync_runner.media.ffmpeg import VideoReader
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

    width, height = (int(v) for v in args.size.split("x"))
    args.work.mkdir(parents=True, exist_ok=True)
    video = args.work / f"face_{args.size}_{args.seconds:g}s.mp4"
    audio = args.work / f"speech_{args.seconds * args.audio_factor:g}s.wav"
    if not video.exists():
        write_face_video(video, seconds=args.seconds, size=(width, height))
    if not audio.exists():
        write_speech_like_audio(audio, seconds=args.seconds * args.audio_factor)

    opened = []

    class CountingReader(VideoReader):
        def __init__(self, *a, **k):
            opened.append(1)
            super().__init__(*a, **k)

    pipeline.VideoReader = CountingReader
    options = pipeline.PipelineOptions(batch_size=16)
    if hasattr(options, "params"):  # generate every frame, as the code before silence=keep did
        from lipsync_runner.params import JobParams

        options.params = JobParams(silence="generate")
    load_before = os.getloadavg()
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    result = pipeline.run(NullModel(), HaarFaceDetector(), video, audio, args.work / "out.mp4", options,
                          work_dir=args.work)
    wall = time.perf_counter() - start
    cpu_self, cpu_children = (after - before for after, before in zip(_cpu_seconds(), cpu_before))
    n = result.frames
    print(f"code: {Path(lipsync_runner.__file__).parent.parent}")
    print(f"clip: {args.size} {args.seconds:g} s, {result.source_frames} frames; output {n} frames; "
          f"decoder opened {len(opened)}x")
    print(f"wall {wall:.2f} s = {1000 * wall / n:.1f} ms/frame; CPU {1000 * cpu_self / n:.1f} ms/frame in Python "
          f"+ {1000 * cpu_children / n:.1f} ms/frame in ffmpeg (user + system, all threads)")
    for stage, secs in sorted(result.seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {stage:<9} {secs:6.2f} s  {1000 * secs / n:6.1f} ms/frame")
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
