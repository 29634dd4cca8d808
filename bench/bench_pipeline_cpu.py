"""The pipeline's own CPU cost per frame, against a bare ffmpeg transcode of the same clip.

    python bench/bench_pipeline_cpu.py                      # 10 s clips at 720p and 1080p
    python bench/bench_pipeline_cpu.py --sizes 720p --repeats 3
    python bench/bench_pipeline_cpu.py --seconds 2 --sizes 320x240    # a quick smoke run
    python bench/bench_pipeline_cpu.py --profile prof.txt   # also cProfile one cold 720p run
    python bench/bench_pipeline_cpu.py --py-spy spy.txt --sizes 720p   # sample every thread of one cold run

Everything but the model is real: `lipsync_runner.pipeline.job.run`, the face detector the service
would load without face-alignment weights (`load_face_detector("auto")`: MediaPipe, or Haar where
mediapipe cannot be imported), the avatar cache, ffmpeg decode and x264 encode.
The model is a null model (the `LipSyncModel` protocol): audio features and latents are zeros of
the right shapes, and `generate` returns one constant 256x256 face (the astronaut), so the model
costs nothing and what is measured is the work around it: what bounds a job, and how many CPU
cores each GPU needs, once the model runs on a GPU.

For each clip size (a synthetic talking head, `lipsync_runner.models.tiny.write_face_video`, 25 fps,
with speech-like audio of the same length), in one process and one after the other:

- transcode: the floor. The same clip decoded by ffmpeg to a raw RGB pipe read by Python
  (`media.VideoReader`) and written back through the pipeline's own writer (`media.VideoWriter`:
  x264 at the pipeline's preset and crf, AAC audio from the speech file), nothing in between;
- cold: `pipeline.run` with a fresh avatar cache (video hash, face tracking, crops, "model",
  blend, encode);
- warm: the same video again through the same cache (the face track comes from the cache).

The inputs are probed once before the runs (ffprobe of the video and the audio; the time is
printed) and every run is handed that probe: the transcode needs the size and rate to read the
pipe, and the service's worker passes the admission's probe to `pipeline.run` (`video_info`), so
neither measures it.

With --repeats N each triple runs N times and the fastest of each kind is kept (on a shared
machine the least disturbed run is the best estimate). Each row prints wall time, ms per frame,
the pipeline's stage times in ms per frame (stages overlap in the render pass, so they add up to
more than the wall time), the CPU seconds of this process and of its ffmpeg children, and the
load average before and after. The ratio cold / transcode is the issue-16 target (<= 1.5x at 720p).
The last line is the whole result as JSON.

--py-spy FILE runs one cold job of the first size under py-spy (all threads, 100 samples/s, idle
threads left out) and writes where the samples fall: by thread, by innermost Python function
(the function calling into OpenCV/numpy/the pipe is where that C time is counted), and inclusive
for the pipeline's own functions. ffmpeg's own CPU is in the transcode/cold rows, not here.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")
if TYPE_CHECKING:
    from lipsync_runner.media.ffmpeg import VideoInfo

SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}
ENCODER_LAYERS = 4  # whisper-tiny's encoder: 4 layers + embeddings = 5 hidden states per step


class NullModel:
    """A `LipSyncModel` whose calls return at once: zeros, and one constant generated face."""

    weights_id = "null-model"

    def __init__(self) -> None:
        import cv2

        from lipsync_runner.media.samples import face_image

        face = face_image()[40:300, 120:380]  # the astronaut's head, roughly a MuseTalk crop
        self.face = np.ascontiguousarray(cv2.resize(face, (256, 256), interpolation=cv2.INTER_AREA))

    def audio_features(self, pcm: np.ndarray) -> np.ndarray:
        from lipsync_runner.audio import windows as audio

        return np.zeros((audio.step_count(len(pcm)), ENCODER_LAYERS + 1, 384), np.float32)

    def prepare(self, crops: np.ndarray) -> np.ndarray:
        return np.zeros((len(crops), 8, 32, 32), np.float32)

    def generate(self, latents: np.ndarray, audio_windows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.face, (len(latents), 256, 256, 3)).copy()


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs ({model}), {mem:.0f} GiB, {platform.system()} {platform.release()}"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class _Meter:
    """Wall time, CPU seconds of this process and of the children reaped meanwhile, and load."""

    def __enter__(self) -> _Meter:
        self.load_before = _load()
        self._self0 = resource.getrusage(resource.RUSAGE_SELF)
        self._kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        s1 = resource.getrusage(resource.RUSAGE_SELF)
        k1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu_self = (s1.ru_utime + s1.ru_stime) - (self._self0.ru_utime + self._self0.ru_stime)
        self.cpu_ffmpeg = (k1.ru_utime + k1.ru_stime) - (self._kids0.ru_utime + self._kids0.ru_stime)
        self.load_after = _load()

    def row(self, kind: str, frames: int, **extra) -> dict:
        return {
            "run": kind, "frames": frames, "wall_s": round(self.wall, 3),
            "ms_per_frame": round(self.wall * 1000 / frames, 2),
            "cpu_s_python": round(self.cpu_self, 2), "cpu_s_ffmpeg": round(self.cpu_ffmpeg, 2),
            "cpu_ms_per_frame": round((self.cpu_self + self.cpu_ffmpeg) * 1000 / frames, 2),
            "load_before": self.load_before, "load_after": self.load_after, **extra,
        }


def transcode(video: Path, audio: Path, out: Path, opts, info: VideoInfo) -> dict:
    """The floor: decode to a raw pipe, hand every frame straight to the pipeline's writer."""
    from lipsync_runner.media.ffmpeg import VideoReader, VideoWriter

    frames = 0
    with _Meter() as m:
        with VideoReader(video, info) as reader, VideoWriter(
                out, info.width, info.height, info.fps, audio_path=audio, crf=opts.crf, preset=opts.preset) as writer:
            while len(chunk := reader.read_chunk(opts.batch_size)):
                writer.write(chunk)
                frames += len(chunk)
    return m.row("transcode", frames, output_kb=out.stat().st_size // 1024)


def probe(video: Path, audio: Path) -> tuple[VideoInfo, float]:
    """Both inputs checked once, outside every measured run, as the service's worker does before
    `pipeline.run` (it hands the job the admission's probe); returns the video's info and the
    seconds the probe took (printed, so the figure is not lost)."""
    from lipsync_runner.pipeline.job import validate_inputs

    start = time.perf_counter()
    info = validate_inputs(video, audio)[0]
    return info, time.perf_counter() - start


def pipeline_run(kind: str, model, detector, video: Path, audio: Path, out: Path, opts, cache,
                 profile: cProfile.Profile | None = None, info: VideoInfo | None = None) -> dict:
    from lipsync_runner.pipeline.job import run

    info = info if info is not None else probe(video, audio)[0]
    with _Meter() as m:
        if profile is not None:
            profile.enable()
        result = run(model, detector, video, audio, out, opts, cache=cache, video_info=info)
        if profile is not None:
            profile.disable()
    stages = {k: round(v * 1000 / result.frames, 2) for k, v in sorted(result.seconds.items())}
    return m.row(kind, result.frames, cache_hit=result.cache_hit, stage_ms_per_frame=stages,
                 output_kb=out.stat().st_size // 1024)


def bench_size(label: str, size: tuple[int, int], args, work: Path, model, detector) -> dict:
    from lipsync_runner.pipeline.avatar_cache import AvatarCache
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

    video = write_face_video(work / f"clip-{label}.mp4", seconds=args.seconds, size=size, fps=25)
    audio = write_speech_like_audio(work / f"speech-{label}.wav", seconds=args.seconds)
    opts = _options(args)
    info, probe_s = probe(video, audio)
    print(f"# {label}: probing both inputs took {probe_s:.3f} s (outside every run below)", flush=True)
    best: dict[str, dict] = {}
    for rep in range(args.repeats):
        cache = AvatarCache(work / f"avatars-{label}-{rep}")
        rows = [transcode(video, audio, work / "transcode.mp4", opts, info),
                pipeline_run("cold", model, detector, video, audio, work / "cold.mp4", opts, cache, info=info),
                pipeline_run("warm", model, detector, video, audio, work / "warm.mp4", opts, cache, info=info)]
        for row in rows:
            row.update(size=label, repeat=rep)
            print(json.dumps(row), flush=True)
            if row["run"] not in best or row["wall_s"] < best[row["run"]]["wall_s"]:
                best[row["run"]] = row
    floor = best["transcode"]["wall_s"]
    return {"size": label, "width": size[0], "height": size[1], "runs": best,
            "cold_over_transcode": round(best["cold"]["wall_s"] / floor, 2),
            "warm_over_transcode": round(best["warm"]["wall_s"] / floor, 2)}


def profile_cold(size: tuple[int, int], args, work: Path, model, detector, path: Path) -> None:
    """cProfile of one cold run (main thread only: the render pass's reader and blend+encode
    threads are not in it; use py-spy for those)."""
    from lipsync_runner.pipeline.avatar_cache import AvatarCache
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

    video = write_face_video(work / "clip-profile.mp4", seconds=args.seconds, size=size, fps=25)
    audio = write_speech_like_audio(work / "speech-profile.wav", seconds=args.seconds)
    prof = cProfile.Profile()
    pipeline_run("cold", model, detector, video, audio, work / "profile.mp4", _options(args),
                 AvatarCache(work / "avatars-profile"), profile=prof)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    path.write_text(text.getvalue())
    print(f"# cProfile of a cold {size[0]}x{size[1]} run written to {path}")


def one_cold_run(video: Path, audio: Path, args, work: Path, model, detector) -> None:
    from lipsync_runner.pipeline.avatar_cache import AvatarCache

    row = pipeline_run("cold", model, detector, video, audio, work / "cold.mp4",
                       _options(args), AvatarCache(work / "avatars"))
    print(json.dumps(row), flush=True)


def py_spy(args, out: Path) -> None:
    """One cold run of the first size in a child process under py-spy; a summary of the samples."""
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-spy-") as tmp:
        work = Path(tmp)
        video = write_face_video(work / "clip.mp4", seconds=args.seconds, size=_size(args.sizes[0])[1], fps=25)
        audio = write_speech_like_audio(work / "speech.wav", seconds=args.seconds)
        raw = work / "spy.raw"
        cmd = [exe, "record", "-r", "100", "-f", "raw", "--threads", "-o", str(raw), "--", sys.executable, __file__,
               "--only-cold", str(video), str(audio), "--batch-size", str(args.batch_size)]
        if args.cv2_threads is not None:
            cmd += ["--cv2-threads", str(args.cv2_threads)]
        subprocess.run(cmd, check=True)
        summary = summarise_py_spy(raw.read_text())
    header = f"# {args.sizes[0]} {args.seconds:g} s, machine: {machine()}, load average {_load()}\n"
    out.write_text(header + summary)
    print(header + summary)


def summarise_py_spy(raw: str, top: int = 25) -> str:
    from collections import Counter

    by_thread: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0]
        calls = frames[1:] or ["?"]
        if any("main (bench_pipeline_cpu.py" in f for f in calls) and not any("pipeline_run" in f for f in calls):
            continue  # the main thread before and after the job: imports, the null model's face
        total += n
        by_thread[thread.split(" ")[0] + " " + _thread_name(calls)] += n
        leaf[calls[-1] if calls != ["?"] else "(native threads)"] += n
        for f in {f for f in calls if "lipsync_runner" in f or "bench_" in f}:
            inclusive[f] += n
    lines = [f"# py-spy: {total} samples at 100/s of the active threads during one cold run", "", "## by thread"]
    lines += [f"{n:7d} {100 * n / total:5.1f}%  {t}" for t, n in by_thread.most_common()]
    lines += ["", "## innermost Python function (self)"]
    lines += [f"{n:7d} {100 * n / total:5.1f}%  {f}" for f, n in leaf.most_common(top)]
    lines += ["", "## the pipeline's functions (inclusive)"]
    lines += [f"{n:7d} {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"


def _thread_name(calls: list[str]) -> str:
    """A readable role for a thread from its outermost frames."""
    if calls == ["?"]:
        return "(no Python frames: OpenCV/torch worker threads)"
    text = ";".join(calls[:6])
    for key, name in (("_drain_stderr", "(ffmpeg stderr)"), ("_worker", "(pool worker)"), ("<module>", "(main)")):
        if key in text:
            return name
    return ""


def _options(args):
    """Pipeline options with the video codecs resolved beforehand: hardware-codec detection (a few
    ffmpeg runs, once per process) must not land in the first measured run."""
    from lipsync_runner.media.hwcodecs import video_codecs
    from lipsync_runner.pipeline.job import PipelineOptions

    extra = {} if args.max_spool_gb is None else {"max_spool_bytes": int(args.max_spool_gb * 2**30)}
    return PipelineOptions(batch_size=args.batch_size, codecs=video_codecs(), **extra)


def _size(text: str) -> tuple[str, tuple[int, int]]:
    if text in SIZES:
        return text, SIZES[text]
    w, h = (int(v) for v in text.lower().split("x"))
    return text, (w, h)


def print_table(results: list[dict], seconds: float) -> None:
    stages = sorted({s for r in results for run in r["runs"].values() for s in run.get("stage_ms_per_frame", {})})
    print("\n| clip | run | wall s | ms/frame | x transcode | CPU ms/frame (py + ffmpeg) | "
          + " | ".join(f"{s}" for s in stages) + " | load before/after |")
    print("|" + "---|" * (7 + len(stages)))
    for r in results:
        floor = r["runs"]["transcode"]["wall_s"]
        for kind in ("transcode", "cold", "warm"):
            row = r["runs"][kind]
            cells = [f"{row.get('stage_ms_per_frame', {}).get(s, 0):.1f}" if kind != "transcode" else ""
                     for s in stages]
            cpu = f"{row['cpu_ms_per_frame']:.1f} ({row['cpu_s_python']:.1f} + {row['cpu_s_ffmpeg']:.1f} s)"
            print(f"| {r['size']} {seconds:g} s | {kind} | {row['wall_s']:.2f} | {row['ms_per_frame']:.1f} | "
                  f"{row['wall_s'] / floor:.2f} | {cpu} | " + " | ".join(cells)
                  + f" | {row['load_before'][0]} / {row['load_after'][0]} |")
    print("\n(stage columns: ms per frame of wall time in the pipeline's StageClock; they overlap)")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sizes", nargs="+", default=["720p", "1080p"], help="720p, 1080p or WxH")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-spool-gb", type=float, default=None,
                        help="LIP_SYNC_MAX_SPOOL_GB for the cold run (0: decode twice instead of keeping frames)")
    parser.add_argument("--profile", type=Path, default=None, help="write a cProfile of one cold run of the first size")
    parser.add_argument("--py-spy", type=Path, default=None, help="write a py-spy summary of one cold run of the first size")
    parser.add_argument("--cv2-threads", type=int, default=None,
                        help="cv2.setNumThreads for the run (default: LIP_SYNC_OPENCV_THREADS, as the service)")
    parser.add_argument("--only-cold", nargs=2, type=Path, metavar=("VIDEO", "AUDIO"),
                        help=argparse.SUPPRESS)  # the run py-spy samples
    args = parser.parse_args()
    if args.py_spy is not None:
        py_spy(args, args.py_spy)
        return

    import cv2

    from lipsync_runner.faces import load_face_detector
    from lipsync_runner.config import RunnerSettings
    from lipsync_runner.pipeline.job import configure_opencv

    if args.cv2_threads is not None:
        cv2.setNumThreads(args.cv2_threads)
    else:
        configure_opencv(RunnerSettings())
    print(f"# machine: {machine()}; load average {_load()}; OpenCV threads {cv2.getNumThreads()}")
    detector = load_face_detector("auto", None, "cpu")
    print(f"# {args.seconds:g} s 25 fps clips, null model, detector: {detector.name}; "
          f"video codecs: {_options(args).codecs.reason}", flush=True)
    model = NullModel()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-cpu-") as tmp:
        work = Path(tmp)
        if args.only_cold:
            one_cold_run(*args.only_cold, args, work, model, detector)
            return
        for text in args.sizes:
            label, size = _size(text)
            results.append(bench_size(label, size, args, work, model, detector))
            print(f"# {label}: cold / transcode = {results[-1]['cold_over_transcode']}x, "
                  f"warm / transcode = {results[-1]['warm_over_transcode']}x", flush=True)
        if args.profile is not None:
            profile_cold(_size(args.sizes[0])[1], args, work, model, detector, args.profile)
    print_table(results, args.seconds)
    print(f"\n# load average at the end {_load()}")
    print(json.dumps({"machine": machine(), "seconds": args.seconds, "detector": detector.name, "results": results}))


if __name__ == "__main__":
    main()
