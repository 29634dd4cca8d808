"""Cost of the look features on this machine (CPU), and what the prepare fix changes.

    .venv/bin/python bench/bench_look.py [--repeats 3]

* face-parsing masks (BiSeNet at 512x512, random full-size weights: the real compute) and
  landmark-contour masks, per face;
* the detail-preserving paste for a 512x512 box (scale factor 2);
* the full-size VAE encoder (sd-vae-ft-mse config) on one crop pair: a contiguous NCHW input (what
  `prepare` now sends) vs the permuted channels-last view it used to send: time and how far apart
  the latents are.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, repeats: int) -> str:
    """Wall and CPU (all threads) milliseconds per call: on a shared machine the CPU figure is
    the steadier one."""
    fn()  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    wall, used = (time.perf_counter() - start) / repeats, (time.process_time() - cpu) / repeats
    return f"{1000 * wall:.1f} ms wall / {1000 * used:.1f} ms CPU"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch
    from diffusers import AutoencoderKL

    from lipsync_runner.render.sharpen import restore_detail
    from lipsync_runner.render.masks import ContourMasks, load_mask_provider
    from lipsync_runner.models.tiny import FULL_VAE_CONFIG, write_face_parsing
    from lipsync_runner.media.samples import face_image, synthetic_landmarks

    print(f"load average before: {os.getloadavg()[0]:.2f} (2-core machine), torch threads {torch.get_num_threads()}")
    frame = np.zeros((720, 1280, 3), np.uint8)
    frame[104:616, 384:896] = face_image()
    boxes = np.array([[384, 104, 896, 616]])
    lm = synthetic_landmarks(400, 880, 360, 600)[None]
    with tempfile.TemporaryDirectory() as tmp:
        write_face_parsing(tmp)
        parsing = load_mask_provider(tmp)
        ms = timed(lambda: parsing(frame[None], boxes), args.repeats)
        print(f"face-parsing mask (BiSeNet 512x512 + jaw selection + geometry): {ms} per face")
    contour = ContourMasks()
    print(f"landmark-contour mask: {timed(lambda: contour(frame[None], boxes, lm), args.repeats)} per face")
    face = np.ascontiguousarray(face_image()[::2, ::2])
    print(f"detail paste, 512x512 box: "
          f"{timed(lambda: restore_detail(frame[None], face[None], boxes, lm, 1.0), args.repeats)} per face")

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(FULL_VAE_CONFIG).eval()
    crops = torch.from_numpy(np.stack([face_image()[:256, 128:384]] * 2))
    strided = (crops.permute(0, 3, 1, 2).float() / 127.5 - 1)  # channels-last strides
    contiguous = strided.contiguous()
    with torch.inference_mode():
        a = vae.encode(contiguous).latent_dist.mode()
        b = vae.encode(strided).latent_dist.mode()
        t_c = timed(lambda: vae.encode(contiguous), args.repeats)
        t_s = timed(lambda: vae.encode(strided), args.repeats)
    rel = float((a - b).abs().max() / a.abs().max())
    print(f"full-size VAE encode, 2 crops: contiguous NCHW {t_c}, channels-last view {t_s}; "
          f"latents differ by {100 * rel:.3f} % of their range")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
