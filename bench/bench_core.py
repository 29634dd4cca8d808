"""Inference-core benchmark: per-stage time per frame and peak memory, plus full-size model speed.

    python bench/bench_core.py                 # everything below, prints a table
    python bench/bench_core.py clip --seconds 10   # one 720p end-to-end run (JSON), used internally
    python bench/bench_core.py model --size full --batch-sizes 1 2 4

End-to-end runs use the tiny random-weight models (the real layout) on a synthetic 720p
talking-head clip; each runs in its own process so its peak memory is its own. The model
run builds MuseTalk's full-size networks from their published configs with random weights
(timing does not depend on the weight values) on whatever device is present.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


def _peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def run_clip(seconds: float, work: Path, models: Path, batch_size: int) -> dict:
    from lipsync_runner.faces import load_face_detector
    from lipsync_runner.models.musetalk import MuseTalk
    from lipsync_runner.pipeline.job import PipelineOptions, run
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

    video = work / f"clip_{seconds:g}s.mp4"
    audio = work / f"speech_{seconds:g}s.wav"
    if not video.exists():
        write_face_video(video, seconds=seconds, size=(1280, 720), fps=25)
    if not audio.exists():
        write_speech_like_audio(audio, seconds=seconds)
    model = MuseTalk.from_pretrained(models, device="auto")
    detector = load_face_detector("auto", models, str(model.device))
    rss_before = _peak_rss_mb(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = run(model, detector, video, audio, work / "out.mp4", PipelineOptions(batch_size=batch_size))
    wall = time.perf_counter() - start
    return {
        "seconds_of_video": seconds, "frames": result.frames, "wall_s": round(wall, 2),
        "fps": round(result.frames / wall, 1), "realtime_factor": round(seconds / wall, 2),
        "stage_ms_per_frame": {k: round(v * 1000 / result.frames, 2) for k, v in sorted(result.seconds.items())},
        "peak_rss_mb": round(_peak_rss_mb(resource.RUSAGE_SELF), 1),
        "peak_rss_before_job_mb": round(rss_before, 1),
        "peak_ffmpeg_rss_mb": round(_peak_rss_mb(resource.RUSAGE_CHILDREN), 1),
        "device": str(model.device), "detector": detector.name, "batch_size": batch_size,
    }


def run_model(size: str, batch_sizes: list[int], repeats: int) -> list[dict]:
    """Generation speed (UNet + VAE decode) and preparation speed (2 VAE encodes) per frame."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lipsync_runner.models import tiny as testing
    from lipsync_runner.models.musetalk import MuseTalk

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    full = size == "full"
    unet = UNet2DConditionModel.from_config(testing.FULL_UNET_CONFIG if full else testing.TINY_UNET_CONFIG)
    vae = AutoencoderKL.from_config(testing.FULL_VAE_CONFIG if full else testing.TINY_VAE_CONFIG)
    model = MuseTalk(unet.to(device, dtype).eval(), vae.to(device, dtype).eval(), None, None, device=device,
                     dtype=dtype, layout=None)  # type: ignore[arg-type]
    rows = []
    rng = np.random.default_rng(0)
    for bs in batch_sizes:
        crops = rng.integers(0, 256, (bs, 256, 256, 3), dtype=np.uint8)
        windows = rng.normal(size=(bs, 50, 384)).astype(np.float32)
        latents = model.prepare(crops)  # warm-up
        model.generate(latents, windows)
        t_prep = t_gen = 0.0
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            latents = model.prepare(crops)
            _sync(device)
            t1 = time.perf_counter()
            model.generate(latents, windows)
            _sync(device)
            t_prep += t1 - t0
            t_gen += time.perf_counter() - t1
        n = bs * repeats
        rows.append({"size": size, "device": device, "dtype": str(dtype).removeprefix("torch."), "batch_size": bs,
                     "generate_fps": round(n / t_gen, 2), "prepare_fps": round(n / t_prep, 2),
                     "cold_fps": round(n / (t_gen + t_prep), 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    clip = sub.add_parser("clip")
    clip.add_argument("--seconds", type=float, required=True)
    clip.add_argument("--work", type=Path, required=True)
    clip.add_argument("--models", type=Path, required=True)
    clip.add_argument("--batch-size", type=int, default=16)
    model = sub.add_parser("model")
    model.add_argument("--size", choices=["tiny", "full"], default="full")
    model.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    model.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clips", type=float, nargs="+", default=[10, 60])
    parser.add_argument("--full-batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()

    if args.cmd == "clip":
        print(json.dumps(run_clip(args.seconds, args.work, args.models, args.batch_size)))
        return
    if args.cmd == "model":
        run_model(args.size, args.batch_sizes, args.repeats)
        return

    from lipsync_runner.models.tiny import write_models_dir

    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmp:
        work = Path(tmp)
        models = write_models_dir(work / "models")
        print(f"# machine: {os.cpu_count()} CPUs; tiny random-weight models; synthetic 1280x720 25 fps clips")
        results = []
        for seconds in args.clips:
            out = subprocess.run([sys.executable, __file__, "clip", "--seconds", str(seconds), "--work", str(work),
                                  "--models", str(models)], capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
        stages = sorted({k for r in results for k in r["stage_ms_per_frame"]})
        print("\n| clip | frames | wall s | fps | x real time | " + " | ".join(f"{s} ms/f" for s in stages)
              + " | peak RSS MB | peak ffmpeg RSS MB |")
        print("|" + "---|" * (7 + len(stages)))
        for r in results:
            cells = [f"{r['stage_ms_per_frame'].get(s, 0):.1f}" for s in stages]
            print(f"| {r['seconds_of_video']:g} s 720p | {r['frames']} | {r['wall_s']} | {r['fps']} | "
                  f"{r['realtime_factor']} | " + " | ".join(cells) + f" | {r['peak_rss_mb']} | "
                  f"{r['peak_ffmpeg_rss_mb']} |")
        if len(results) >= 2:
            print(f"\npeak memory {results[-1]['seconds_of_video']:g} s / {results[0]['seconds_of_video']:g} s: "
                  f"{results[-1]['peak_rss_mb'] / results[0]['peak_rss_mb']:.2f}x")
    print("\n# full-size MuseTalk (random weights): frames/s by batch size")
    run_model("full", args.full_batch_sizes, repeats=1)


if __name__ == "__main__":
    main()
