"""Face detectors on the same real-face frames: MuseTalk crop-box agreement and time per frame.

    .venv/bin/python bench/bench_detectors.py [--frames 40]

Frames: testing.face_frames (the astronaut photo moving like a talking head) at three sizes,
and once with the head tilted 20° (a rotated frame).
Reference: dlib's 68 landmarks on the photo (tests/data/astronaut_dlib68.json) moved to each
frame's known placement, through MuseTalk's crop-box rule (v1.5, extra_margin 10). Error: the
largest |side - reference side| per frame, as a fraction of the reference box's width (x1, x2)
or height (y1, y2); "mean" and "max" over frames.

FAN runs on random test weights (no real weights here): its time is real, its boxes are not, so
no agreement is printed for it. dlib itself is timed when importable (a scratch venv with
dlib-bin + face-recognition-models; it is not a project dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lipsync_runner.faces import FaceDetection, HaarFaceDetector, musetalk_crop_box  # noqa: E402
from lipsync_runner.media.samples import face_frames, face_placement  # noqa: E402

#: (label, frame size, face size in px, in-plane head tilt in degrees)
SCENES = (("320x240", (320, 240), 192, 0), ("1280x720", (1280, 720), 560, 0), ("1920x1080", (1920, 1080), 840, 0),
          ("1280x720 tilted 20°", (1280, 720), 560, 20))
REFERENCE = np.array(json.loads((ROOT / "tests/data/astronaut_dlib68.json").read_text())["landmarks"], float)


def tilt(size, angle: float) -> np.ndarray:
    return cv2.getRotationMatrix2D((size[0] / 2, size[1] / 2), angle, 1.0)


def scene_frames(n: int, size, face_px: int, angle: float) -> list[np.ndarray]:
    frames = list(face_frames(n, size, face_px=face_px))
    if angle:
        m = tilt(size, angle)
        frames = [cv2.warpAffine(f, m, size, borderMode=cv2.BORDER_REPLICATE) for f in frames]
    return frames


def reference_box(i: int, size, face_px, angle: float):
    scale, x0, y0 = face_placement(i, size, face_px)
    lm = (REFERENCE - [100, 0]) * scale + [x0, y0]
    if angle:
        lm = lm @ tilt(size, angle)[:, :2].T + tilt(size, angle)[:, 2]
    return musetalk_crop_box(FaceDetection(box=np.zeros(4), landmarks=lm, score=1.0), size[::-1])


def largest(found):
    if isinstance(found, list):
        return found[0] if found else None
    return found


def fan_detector():
    import torch
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    from lipsync_runner.faces import FAN_FILENAME, S3FD_FILENAME, FanFaceDetector

    root = Path(tempfile.mkdtemp(prefix="bench-fan-"))
    (root / "face-alignment").mkdir()
    torch.manual_seed(0)
    sd = s3fd().state_dict()
    for k in sd:  # random S3FD that always finds a face, so FAN runs every frame (as on real video)
        if "_mbox_" in k:
            sd[k].zero_()
        if "_mbox_conf" in k and k.endswith("bias"):
            sd[k][:] = -10.0
            sd[k][-1] = 10.0
    torch.save(sd, root / "face-alignment" / S3FD_FILENAME)
    torch.save(FAN(4).state_dict(), root / "face-alignment" / FAN_FILENAME)
    det = FanFaceDetector(root)
    det.warmup()
    return det


class DlibDetector:
    name = "dlib"

    def __init__(self) -> None:
        import dlib
        import face_recognition_models

        self._det = dlib.get_frontal_face_detector()
        self._sp = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())

    def detect(self, frames):
        out = []
        for f in frames:
            faces = sorted(self._det(f, 1), key=lambda r: -r.area())
            if not faces:
                out.append([])
                continue
            s = self._sp(f, faces[0])
            lm = np.array([(s.part(i).x, s.part(i).y) for i in range(68)], float)
            r = faces[0]
            out.append([FaceDetection(box=np.array([r.left(), r.top(), r.right(), r.bottom()], float),
                                      landmarks=lm, score=1.0)])
        return out


def measure(detector, frames, label, size, face_px, angle, agree: bool) -> str:
    detector.detect(frames[:2])  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    found = []
    for k in range(0, len(frames), 8):
        found += detector.detect(np.stack(frames[k : k + 8]))
    ms = 1000 * (time.perf_counter() - start) / len(frames)
    cpu_ms = 1000 * (time.process_time() - cpu) / len(frames)  # all threads: steadier on a shared machine
    errs, hits = [], 0
    for i, f in enumerate(found):
        d = largest(f)
        if d is None:
            continue
        hits += 1
        if agree:
            want = np.array(reference_box(i, size, face_px, angle), float)
            got = np.array(musetalk_crop_box(d, size[::-1]), float)
            w, h = want[2] - want[0], want[3] - want[1]
            errs.append((np.abs(got - want) / [w, h, w, h]).max())
    agreement = f"{100 * np.mean(errs):5.1f} % | {100 * np.max(errs):5.1f} %" if errs else "- | -"
    return f"| {detector.name:9} | {label} | {hits}/{len(frames)} | {agreement} | {ms:7.1f} | {cpu_ms:7.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--fan", action="store_true", help="also time FAN (random weights; slow to start)")
    args = parser.parse_args()
    from lipsync_runner.faces.detectors.mediapipe import MediaPipeFaceDetector

    detectors = [(HaarFaceDetector(), True), (MediaPipeFaceDetector(), True)]
    try:
        detectors.append((DlibDetector(), True))
    except ImportError:
        pass
    if args.fan:
        detectors.append((fan_detector(), False))
    print(f"load average before: {os.getloadavg()[0]:.2f} (2-core machine)")
    print("| detector | frame | faces found | box error mean | max | ms/frame wall | ms/frame CPU |")
    print("|---|---|---|---|---|---|---|")
    for label, size, face_px, angle in SCENES:
        frames = scene_frames(args.frames, size, face_px, angle)
        for det, agree in detectors:
            print(measure(det, frames, label, size, face_px, angle, agree), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
