"""Preview benchmark: POST /preview's pipeline (pipeline.job.preview) against the full job, cold and warm.

    python bench/bench_preview.py                        # 10 s 720p, tiny random-weight models, CPU
    python bench/bench_preview.py --size full            # full-size MuseTalk (random weights); needs CUDA
    python bench/bench_preview.py --seconds 2 --width 320 --height 240   # a quick smoke run

The clip and models are bench_cache.py's (a synthetic talking head, speech-like audio; models loaded
and every batch shape warmed up first). Each run is the pipeline in process, as the service's
preview and job run it (the service adds the upload and the runner's batching):

- job cold: a fresh avatar cache: the whole job, face tracking included;
- preview cold: another fresh cache: the preview of the default stretch (where the dubbing
  starts, ``--preview-seconds`` long), which tracks the whole video into the cache;
- preview warm: the same preview again (the track from the cache);
- job after preview: the full job through the preview's cache (no face tracking; the stretch's
  latents are there too);
- job warm: the first job's cache again (track and every latent cached).

Prints wall seconds and stages of each, and the whole result as JSON on the last line.
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

from bench.bench_cache import _sync, _warm_up  # noqa: E402


def _timed(label: str, fn) -> dict:
    _sync()
    start = time.perf_counter()
    result = fn()
    _sync()
    wall = time.perf_counter() - start
    frames = getattr(result, "frames", None)
    row = {"run": label, "wall_s": round(wall, 3), "cache_hit": result.cache_hit,
           "frames": frames if isinstance(frames, int) else int(len(frames)),
           "stage_s": {k: round(v, 3) for k, v in sorted(result.seconds.items())}}
    print(json.dumps(row), flush=True)
    return row


def bench(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from lipsync_runner.faces import load_face_detector
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio
    from lipsync_runner.models.musetalk import MuseTalk
    from lipsync_runner.models.tiny import write_models_dir
    from lipsync_runner.pipeline.avatar_cache import AvatarCache
    from lipsync_runner.pipeline.job import PipelineOptions, preview, run

    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.size == "full" and not cuda:
        raise SystemExit("bench_preview --size full needs CUDA")
    models = args.models or write_models_dir(work / f"models-{args.size}", size=args.size)
    video = write_face_video(work / "clip.mp4", seconds=args.seconds, size=(args.width, args.height), fps=args.fps)
    audio = write_speech_like_audio(work / "speech.wav", seconds=args.seconds)
    model = MuseTalk.from_pretrained(models, device="cuda" if cuda else "cpu")
    detector = load_face_detector(args.detector, models, str(model.device))
    n_frames = int(round(args.seconds * args.fps))
    _warm_up(model, n_frames, args.batch_size, args.seconds)
    opts = PipelineOptions(batch_size=args.batch_size)
    header = {"size": args.size, "device": str(model.device), "cpus": os.cpu_count(),
              "gpu": torch.cuda.get_device_name(0) if cuda else None, "detector": detector.name,
              "batch_size": args.batch_size, "clip": f"{args.seconds:g} s {args.width}x{args.height} {args.fps:g} fps",
              "preview_s": args.preview_seconds, "load_before": os.getloadavg()[0]}
    print("# " + json.dumps(header), flush=True)
    job_cache, preview_cache = AvatarCache(work / "avatars-job"), AvatarCache(work / "avatars-preview")

    def job(cache, name):
        return lambda: run(model, detector, video, audio, work / f"{name}.mp4", opts, cache=cache)

    def shown(name):
        return lambda: preview(model, detector, video, audio, opts, seconds=args.preview_seconds,
                               output=work / f"{name}.mp4", cache=preview_cache, work_dir=work)

    rows = [_timed("job cold", job(job_cache, "job-cold")),
            _timed("preview cold", shown("preview-cold")),
            _timed("preview warm", shown("preview-warm")),
            _timed("job after preview", job(preview_cache, "job-after")),
            _timed("job warm", job(job_cache, "job-warm"))]
    return {**header, "load_after": os.getloadavg()[0], "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--preview-seconds", type=float, default=1.5)
    parser.add_argument("--detector", default="auto")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-preview-") as tmp:
        result = bench(args, Path(tmp))
    print("\n| run | wall s | cache hit | frames rendered | faces s | prepare s | generate s |")
    print("|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        s = r["stage_s"]
        print(f"| {r['run']} | {r['wall_s']:.2f} | {r['cache_hit']} | {r['frames']} | {s.get('faces', 0):.2f} | "
              f"{s.get('prepare', 0):.2f} | {s.get('generate', 0):.2f} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
