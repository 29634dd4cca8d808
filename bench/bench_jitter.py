"""Box jitter and lag: raw detections, the old moving average, and the One-Euro filter.

    python bench/bench_jitter.py            # prints a table (and the machine load)
    python bench/bench_jitter.py --json
    python bench/bench_jitter.py --detect-every 3   # the detector on every 3rd frame, interpolated between

The clip: a real face (scikit-image's astronaut) in a 480x270 H.264 clip at 25 fps, decoded back
(codec noise included), found by the Haar detector (the offline default; boxes only, the noisier
of the two detectors). The head is

* still for 3 s (frames 0-74)             -> jitter: mean |frame-to-frame change| of the box corners;
* thrown 60 px right within 3 frames (75-77), then still again until frame 149
                                           -> lag: frames the box centre reaches 50 % / 90 % of the jump
                                              after the true head does; overshoot;
* swaying (30 px, 2 s period) for 4 s      -> RMS error of the box centre while it moves.

Truth is where the head shot was pasted plus the detector's own fixed offset (its median on the
still part). Box figures are pixels of the 480x270 frame (the face box is about 70 px wide).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FPS = 25
SIZE = (480, 270)
STILL = (5, 72)  # jitter windows (away from the motion)
STILL2 = (95, 148)
JUMP_AT, JUMP_FRAMES, JUMP_PX = 75, 3, 60.0
SWAY = (150, 250)


def head_path() -> np.ndarray:
    """Head shot centre x, y per frame (see the module doc)."""
    n = SWAY[1]
    x = np.full(n, 200.0)
    ramp = np.clip((np.arange(n) - JUMP_AT + 1) / JUMP_FRAMES, 0, 1)
    x += JUMP_PX * ramp
    t = np.arange(n) - SWAY[0]
    x[SWAY[0]:] += 30 * np.sin(2 * np.pi * t[SWAY[0]:] / (2 * FPS))
    return np.stack([x, np.full(n, 135.0)], 1)


def moving_average_runs(values: np.ndarray, window: int = 5) -> np.ndarray:
    """The smoothing before One-Euro: a centred moving mean (window 5 frames)."""
    r = window // 2
    out = values.copy()
    for i in range(len(values)):
        out[i] = values[max(0, i - r) : i + r + 1].mean(axis=0)
    return out


def crossing(x: np.ndarray, level: float, start: int) -> float:
    """First (fractional) frame from `start` at which x reaches `level` (rising)."""
    for i in range(start, len(x)):
        if x[i] >= level:
            return i - 1 + (level - x[i - 1]) / (x[i] - x[i - 1]) if i > start else float(i)
    return float("nan")


def measure(detect_every: int = 1) -> dict:
    from lipsync_runner.faces import HaarFaceDetector, find_tracks
    from lipsync_runner.media.ffmpeg import VideoReader
    from lipsync_runner.media.samples import Actor, write_actors_video

    path = head_path()
    n = len(path)
    with tempfile.TemporaryDirectory() as tmp:
        video = write_actors_video(Path(tmp) / "moving.mp4", [Actor("astronaut", 150, path)], n, size=SIZE, fps=FPS)

        def chunks():
            with VideoReader(video) as reader:
                while len(chunk := reader.read_chunk(32)):
                    yield chunk

        tracks = find_tracks(chunks(), HaarFaceDetector(), detect_every=detect_every)
    return {**evaluate(tracks, path), "detect_every": detect_every}


def evaluate(tracks, path: np.ndarray, extra: dict | None = None) -> dict:
    """Figures per smoothing method, from one detection pass (`extra`: name -> OneEuro, to compare)."""
    from lipsync_runner.faces import FaceChoice, OneEuro, choose_track

    n = len(path)
    hw = (SIZE[1], SIZE[0])
    raw = choose_track(tracks, FaceChoice(), hw, smoothing=None, fps=FPS)
    if not raw.has_face.all():
        raise SystemExit(f"the detector missed {int((~raw.has_face).sum())} frames: the figures would be mixed")
    raw_boxes = raw.boxes.astype(float)
    methods = {
        "raw detections": raw_boxes,
        "moving average (5 frames, before)": moving_average_runs(raw_boxes),
        "One-Euro, causal (forward only)": choose_track(
            tracks, FaceChoice(), hw, fps=FPS, smoothing=OneEuro(zero_phase=False)).boxes.astype(float),
        "One-Euro, zero-phase (default)": choose_track(tracks, FaceChoice(), hw, fps=FPS).boxes.astype(float),
    }
    for name, params in (extra or {}).items():
        methods[name] = choose_track(tracks, FaceChoice(), hw, fps=FPS, smoothing=params).boxes.astype(float)
    # truth: the pasted head's motion plus the detector's fixed offset on the still part
    offset = np.median(raw_boxes[STILL[0]:STILL[1]] - np.c_[path, path][STILL[0]:STILL[1]], axis=0)
    truth = np.c_[path, path] + offset
    truth_cx = (truth[:, 0] + truth[:, 2]) / 2
    t50 = crossing(truth_cx, truth_cx[0] + 0.5 * JUMP_PX, JUMP_AT - 2)
    t90 = crossing(truth_cx, truth_cx[0] + 0.9 * JUMP_PX, JUMP_AT - 2)
    rows = {}
    for name, boxes in methods.items():
        cx = (boxes[:, 0] + boxes[:, 2]) / 2
        jitter = float(np.mean([np.abs(np.diff(boxes[a:b], axis=0)).mean() for a, b in (STILL, STILL2)]))
        base = cx[JUMP_AT - 10 : JUMP_AT - 3].mean()  # before the jump, outside any smoothing window
        settled = cx[JUMP_AT + 15 : JUMP_AT + 40].mean()
        rows[name] = {
            "jitter_px_per_frame": round(jitter, 3),
            "still_std_px": round(float(np.concatenate(
                [boxes[a:b] - truth[a:b] for a, b in (STILL, STILL2)]).std(axis=0).mean()), 3),
            "lag_50_frames": round(float(crossing(cx, base + 0.5 * JUMP_PX, JUMP_AT - 2) - t50), 2),
            "lag_90_frames": round(float(crossing(cx, base + 0.9 * JUMP_PX, JUMP_AT - 2) - t90), 2),
            "overshoot_px": round(float(cx[JUMP_AT:JUMP_AT + 20].max() - settled), 2),
            "sway_rms_px": round(float(np.sqrt(np.mean((cx[SWAY[0]:] - truth_cx[SWAY[0]:]) ** 2))), 3),
        }
    return {"frames": n, "detector": "haar", "load": os.getloadavg(), "methods": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--detect-every", type=int, default=1,
                        help="run the detector on every k-th frame (the pipeline's default is 2)")
    args = parser.parse_args()
    result = measure(args.detect_every)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    load = ", ".join(f"{v:.1f}" for v in result["load"])
    print(f"{result['frames']} frames, {result['detector']} detector on 1 frame in {result['detect_every']}, "
          f"load average {load} ({os.cpu_count()} cores)")
    cols = ["jitter_px_per_frame", "still_std_px", "lag_50_frames", "lag_90_frames", "overshoot_px", "sway_rms_px"]
    print(f"{'method':36s} " + " ".join(f"{c:>20s}" for c in cols))
    for name, row in result["methods"].items():
        print(f"{name:36s} " + " ".join(f"{row[c]:>20}" for c in cols))


if __name__ == "__main__":
    main()
