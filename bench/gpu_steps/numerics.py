"""Numerics: the service's GPU fp16 channels-last models against GPU fp32 and CPU fp32.

The full-size random-weight models (one models directory, so the same weights everywhere) are
loaded three times through ``MuseTalk.from_pretrained``, as the service loads them:
- ``gpu_fp16``: fp16 on CUDA, which calls ``tune_for_gpu`` (channels-last, cuDNN autotuning, TF32);
- ``gpu_fp32``: fp32 on CUDA, tuned the same way (TF32 convolutions and matmuls allowed);
- ``cpu_fp32``: fp32 on the CPU, the reference.
The same random crops and audio windows (a small batch) go through ``prepare`` and ``generate``:
relative error ||x - ref|| / ||ref|| of the latents, max and mean |difference| of the uint8 faces
(``generate`` is fed the reference latents, so its error is its own), and a check that the UNet
output and the decoded image are finite before the uint8 cast hides NaN. Then the Whisper
encoder's hidden states fp16 against fp32 on 2 s of speech-like audio.

Smoke mode (tiny models, CPU): the "fast" variant is fp16 channels-last on the CPU.
"""

from __future__ import annotations

import sys
import time

from bench.gpu_steps import common

MODULES = common.MODULES + ("lipsync_runner", "diffusers", "transformers", "safetensors")
STEP = "numerics"


def _load(models, dev: str, dtype):
    import torch

    from lipsync_runner.models.musetalk import MuseTalk

    model = MuseTalk.from_pretrained(models, device=dev, dtype=dtype)
    if not dev.startswith("cuda") and dtype != torch.float32:
        model.tune_for_gpu()  # smoke: the same layout change on the CPU (from_pretrained does it on CUDA)
    return model


def _finite_watch(model) -> dict[str, bool]:
    """Forward hooks that record whether the UNet output and the decoded image stayed finite."""
    import torch

    seen = {"unet": True, "vae_decoder": True}

    def hook(name):
        def fn(_module, _inputs, output):
            out = output.sample if hasattr(output, "sample") else output
            out = out[0] if isinstance(out, tuple) else out
            seen[name] = seen[name] and bool(torch.isfinite(out).all())
        return fn

    model.unet.register_forward_hook(hook("unet"))
    model.vae.decoder.register_forward_hook(hook("vae_decoder"))
    return seen


def _rel(x, ref) -> float:
    import numpy as np

    return float(np.linalg.norm((x.astype(np.float64) - ref.astype(np.float64)).ravel())
                 / max(np.linalg.norm(ref.astype(np.float64).ravel()), 1e-30))


def main() -> int:
    import numpy as np
    import torch

    from lipsync_runner.media.samples import speech_like_signal

    dev = common.device()
    models = common.models_dir()
    batch = 2 if common.SMOKE else 4
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8)
    pcm = speech_like_signal(2.0, seed=1)

    variants = [("cpu_fp32", "cpu", torch.float32), (f"{dev}_fp32", dev, torch.float32),
                (f"{dev}_fp16_channels_last", dev, torch.float16)]
    if dev == "cpu":
        variants.pop(1)  # smoke: the CPU fp32 reference already is the fp32 run
    out: dict[str, dict] = {}
    windows = None
    for name, d, dtype in variants:
        t0 = time.perf_counter()
        model = _load(models, d, dtype)
        finite = _finite_watch(model)
        if windows is None:
            windows = rng.normal(0, 1, (batch, model.tokens_per_frame, 384)).astype(np.float32)
        latents = model.prepare(crops)
        ref_latents = out["cpu_fp32"]["latents"] if out else latents
        faces = model.generate(ref_latents, windows)
        hidden = model.audio_features(pcm)
        out[name] = {"latents": latents, "faces": faces, "hidden": hidden, "finite": dict(finite),
                     "latents_finite": bool(np.isfinite(latents).all()), "hidden_finite": bool(np.isfinite(hidden).all()),
                     "seconds": round(time.perf_counter() - t0, 1)}
        del model
        if d.startswith("cuda"):
            torch.cuda.empty_cache()

    ref = out["cpu_fp32"]
    ok = True
    for name, r in out.items():
        diff = np.abs(r["faces"].astype(np.int16) - ref["faces"].astype(np.int16))
        finite = r["latents_finite"] and r["hidden_finite"] and all(r["finite"].values())
        ok = ok and finite
        common.emit(STEP, {
            "variant": name, "reference": "cpu_fp32", "batch": batch, "size": common.size(),
            "latents_rel_err": _rel(r["latents"], ref["latents"]),
            "faces_max_abs_diff": int(diff.max()), "faces_mean_abs_diff": round(float(diff.mean()), 4),
            "whisper_rel_err": _rel(r["hidden"], ref["hidden"]),
            "all_finite": finite, "finite": {**r["finite"], "latents": r["latents_finite"], "whisper": r["hidden_finite"]},
            "load_and_run_s": r["seconds"],
        })
    fast = [n for n in out if "fp16" in n][0]
    fp32 = [n for n in out if n.endswith("fp32") and n != "cpu_fp32"]
    if fp32:  # fp16 against the same device's fp32 (the Whisper encoder too)
        a, b = out[fast], out[fp32[0]]
        diff = np.abs(a["faces"].astype(np.int16) - b["faces"].astype(np.int16))
        common.emit(STEP, {"variant": fast, "reference": fp32[0], "latents_rel_err": _rel(a["latents"], b["latents"]),
                           "faces_max_abs_diff": int(diff.max()), "faces_mean_abs_diff": round(float(diff.mean()), 4),
                           "whisper_rel_err": _rel(a["hidden"], b["hidden"])})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
