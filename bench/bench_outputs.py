"""Output controls and content credentials: encode time per format/quality/height, and the signing cost.

    python bench/bench_outputs.py [--seconds 5]

Encodes a synthetic 1280x720 25 fps talking head (media/samples.py) with the speech-like audio through
VideoWriter for each setting, then signs the standard MP4 with a development pair
(media/credentials.py) and reads it back. Wall times on this machine; figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from lipsync_runner.media.credentials import ContentSigner, Ingredient, Provenance, development_pair, read_manifest
from lipsync_runner.media.ffmpeg import VideoWriter, probe_video
from lipsync_runner.media.samples import face_frames, write_face_video, write_speech_like_audio


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-outputs-"))
    n = int(args.seconds * 25)
    frames = np.stack(list(face_frames(n, size=(1280, 720), face_px=360)))
    audio = write_speech_like_audio(root / "speech.wav", seconds=args.seconds)
    print(f"load average {os.getloadavg()[0]:.2f}; {n} frames of 1280x720")
    print("| format | quality | height | encode s | x real time | MB |")
    print("|---|---|---|---|---|---|")
    for fmt, quality, height in (("mp4", "standard", None), ("mp4", "draft", None), ("mp4", "high", None),
                                 ("mp4", "standard", 480), ("webm", "standard", None), ("webm", "draft", None),
                                 ("webm", "standard", 480)):
        out = root / f"{fmt}-{quality}-{height}.{fmt}"
        start = time.perf_counter()
        with VideoWriter(out, 1280, 720, Fraction(25), audio_path=audio, quality=quality, output_height=height) as w:
            w.write(frames)
        took = time.perf_counter() - start
        info = probe_video(out)
        print(f"| {fmt} | {quality} | {info.height} | {took:.2f} | {args.seconds / took:.2f} | "
              f"{out.stat().st_size / 2**20:.2f} |")
    video = write_face_video(root / "input.mp4", seconds=args.seconds, size=(1280, 720))
    chain, key, _ = development_pair(root / "signing")
    signer = ContentSigner(chain, key)
    target = root / "mp4-standard-None.mp4"
    start = time.perf_counter()
    signer.sign(target, Provenance("bench", "MuseTalk", "v1.5", "lipsync-runner", "bench"),
                [Ingredient("video", video, "input.mp4", "mov"), Ingredient("audio", audio, "speech.wav", "wav")])
    signed = time.perf_counter() - start
    start = time.perf_counter()
    state = read_manifest(target)["validation_state"]
    print(f"sign {target.stat().st_size / 2**20:.2f} MB MP4 (inputs {video.stat().st_size / 2**20:.2f} + "
          f"{audio.stat().st_size / 2**20:.2f} MB): {signed:.2f} s; read back and validate: "
          f"{time.perf_counter() - start:.2f} s ({state})")


if __name__ == "__main__":
    main()
