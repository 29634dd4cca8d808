"""Per-frame cost of the face crop and the blend, and what cheaper crop filters would change.

    python bench/bench_ops.py                 # 720p and 1080p test clips
    python bench/bench_ops.py --sizes 720p --frames 16

On the test clip of bench_pipeline_cpu.py (a real face, Haar crop boxes: about 160x220 px at
720p, 245x325 at 1080p) this times, per frame, in CPU milliseconds (thread CPU time of this
process: OpenCV's own worker threads included, neighbours' load mostly not):

- the crop's resize to 256x256 with Lanczos-4 (MuseTalk's filter, what crops.py does) against
  bicubic, area, bilinear and Lanczos-4 on float32 input, each with its PSNR against the
  Lanczos crop (how far the model's input would move);
- the blend: the code before the issue-16 work (tests/blend_reference.py), the current one
  without and with landmarks, and the torch version (lipsync_runner.render.torch_ops) on the CPU and,
  where present, on CUDA (there in wall milliseconds, synchronised).

The last line is the whole result as JSON.
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from bench.bench_pipeline_cpu import SIZES, machine  # noqa: E402


def _cpu_ms(fn, n_frames: int, repeats: int = 5) -> float:
    fn()  # warm-up (mask caches, resize tables)
    t0 = time.process_time()
    for _ in range(repeats):
        fn()
    return round((time.process_time() - t0) * 1000 / (repeats * n_frames), 3)


def _cuda_ms(fn, n_frames: int, repeats: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) * 1000 / (repeats * n_frames), 3)


def _psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return round(10 * np.log10(255**2 / mse), 2) if mse else float("inf")


def bench_size(label: str, size: tuple[int, int], n: int, work: Path) -> dict:
    import cv2
    import numpy as np
    import torch

    from lipsync_runner.render import blend, crops, torch_ops as gpu_ops
    from lipsync_runner.faces import HaarFaceDetector, track_faces
    from lipsync_runner.media.ffmpeg import VideoReader
    from lipsync_runner.media.samples import landmarks_for_boxes, write_face_video
    from tests import blend_reference

    clip = write_face_video(work / f"{label}.mp4", seconds=n / 25, size=size, fps=25)
    with VideoReader(clip) as reader:
        frames = reader.read_chunk(n)
    boxes = track_faces([frames], HaarFaceDetector(), detect_every=2).boxes
    faces = np.ascontiguousarray(255 - crops.crop_faces(frames, boxes))
    # a tracker's landmarks move every frame: fresh ones per call, or the mask cache would hit
    seeds = iter(range(10**6))
    lms = lambda: landmarks_for_boxes(boxes, seed=next(seeds))  # noqa: E731
    box_w = (boxes[:, 2] - boxes[:, 0]).mean()
    box_h = (boxes[:, 3] - boxes[:, 1]).mean()

    lanczos = crops.crop_faces(frames, boxes)

    def crop_with(flag, as_float=False):
        out = np.zeros_like(lanczos)
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            region = frames[i, y1:y2, x1:x2]
            r = cv2.resize(region.astype(np.float32) if as_float else region, (256, 256), interpolation=flag)
            out[i] = np.clip(np.rint(r), 0, 255) if as_float else r
        return out

    crop_rows = {}
    for name, flag, as_float in [("lanczos4 (kept)", cv2.INTER_LANCZOS4, False), ("cubic", cv2.INTER_CUBIC, False),
                                 ("area", cv2.INTER_AREA, False), ("linear", cv2.INTER_LINEAR, False),
                                 ("lanczos4 on float32", cv2.INTER_LANCZOS4, True)]:
        fn = (lambda f=flag, a=as_float: crop_with(f, a))
        crop_rows[name] = {"cpu_ms_per_frame": _cpu_ms(fn, n), "psnr_vs_lanczos_db": _psnr(fn(), lanczos)}
    crop_rows["lanczos4 (crops.crop_faces)"] = {"cpu_ms_per_frame": _cpu_ms(lambda: crops.crop_faces(frames, boxes), n)}
    t_frames = torch.from_numpy(frames)
    crop_rows["lanczos4 torch CPU (gpu_ops)"] = {
        "cpu_ms_per_frame": _cpu_ms(lambda: gpu_ops.crop_faces(t_frames, boxes), n, repeats=2)}

    work_frames = frames.copy()
    blend_rows = {
        "before (reference)": _cpu_ms(lambda: blend_reference.blend_faces(work_frames, faces, boxes, inplace=True), n),
        "now, ellipse": _cpu_ms(lambda: blend.blend_faces(work_frames, faces, boxes, inplace=True), n),
        "before, landmarks": _cpu_ms(
            lambda: blend_reference.blend_faces(work_frames, faces, boxes, lms(), inplace=True), n),
        "now, landmarks": _cpu_ms(lambda: blend.blend_faces(work_frames, faces, boxes, lms(), inplace=True), n),
        "torch CPU (gpu_ops)": _cpu_ms(
            lambda: gpu_ops.blend_faces(t_frames.clone(), torch.from_numpy(faces), boxes, inplace=False), n, 2),
    }
    if torch.cuda.is_available():
        cf, cfa = t_frames.cuda(), torch.from_numpy(faces).cuda()
        crop_rows["lanczos4 torch CUDA (wall)"] = {"wall_ms_per_frame": _cuda_ms(lambda: gpu_ops.crop_faces(cf, boxes), n)}
        blend_rows["torch CUDA (wall)"] = _cuda_ms(lambda: gpu_ops.blend_faces(cf, cfa, boxes, inplace=True), n)
    return {"size": label, "frames": n, "mean_box_wh": [round(float(box_w)), round(float(box_h))],
            "crop": crop_rows, "blend_cpu_ms_per_frame": blend_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["720p", "1080p"])
    parser.add_argument("--frames", type=int, default=16)
    args = parser.parse_args()
    print(f"# machine: {machine()}; load average {[round(x, 2) for x in os.getloadavg()]}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-ops-") as tmp:
        for label in args.sizes:
            results.append(bench_size(label, SIZES[label], args.frames, Path(tmp)))
            r = results[-1]
            print(f"\n## {label}: mean box {r['mean_box_wh'][0]}x{r['mean_box_wh'][1]} px, {r['frames']} frames")
            print("| crop resize to 256 | CPU ms/frame | PSNR vs Lanczos-4 dB |\n|---|---|---|")
            for name, row in r["crop"].items():
                ms = row.get("cpu_ms_per_frame", row.get("wall_ms_per_frame"))
                print(f"| {name} | {ms} | {row.get('psnr_vs_lanczos_db', '')} |")
            print("| blend | CPU ms/frame |\n|---|---|")
            for name, ms in r["blend_cpu_ms_per_frame"].items():
                print(f"| {name} | {ms} |")
    print(f"\n# load average at the end {[round(x, 2) for x in os.getloadavg()]}")
    print(json.dumps({"machine": machine(), "results": results}))


if __name__ == "__main__":
    main()
