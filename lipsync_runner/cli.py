"""`python -m lipsync_runner ...`: generate, download-models, import-models, make-test-assets.

Exit codes a script can rely on: 0 success, 2 bad input or usage, 3 models missing or
broken, 4 media processing failed, 1 anything else. Errors are one line on stderr;
`--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import get_args

from lipsync_runner.errors import InvalidInputError, LipSyncError, MediaProcessingError, ModelFilesError
from lipsync_runner.params import add_cli_arguments, from_cli_args
from lipsync_runner.config import RunnerSettings, ServiceSettings
from lipsync_runner.pipeline.job import configure_opencv

DEFAULT_CACHE_DIR = "~/.cache/lipsync-runner/avatars"
EXIT_CODES = ((InvalidInputError, 2), (ModelFilesError, 3), (MediaProcessingError, 4), (LipSyncError, 1))


def _parser(settings: RunnerSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lipsync_runner", description="MuseTalk lip-sync, streaming.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="lip-sync a video to an audio track")
    gen.add_argument("--video", type=Path, required=True, help="input video (mp4, avi, mov, mkv, webm)")
    gen.add_argument("--audio", type=Path, required=True, help="speech (mp3, wav, m4a, aac, ogg, or a video)")
    gen.add_argument("--output", "-o", type=Path, required=True, help="output file: .mp4, or .webm with --output-format webm")
    gen.add_argument("--models-dir", type=Path, default=settings.models_dir,
                     help="MuseTalk models directory (default: $MUSETALK_MODELS_DIR)")
    gen.add_argument("--device", default=settings.device, help="cpu, cuda, cuda:N or auto ($LIP_SYNC_DEVICE)")
    gen.add_argument("--batch-size", type=int, default=settings.batch_size, help="frames per model call")
    gen.add_argument("--version", choices=["auto", "v15", "v1"], default=settings.model_version,
                     help="MuseTalk UNet version (auto: v1.5 when present)")
    gen.add_argument("--face-detector", choices=get_args(RunnerSettings.model_fields["face_detector"].annotation),
                     default=settings.face_detector,
                     help="auto: S3FD+FAN when its weights are in the models dir, else MediaPipe, else OpenCV Haar")
    gen.add_argument("--crf", type=int, default=settings.crf, help="x264 quality (lower is better)")
    gen.add_argument("--preset", default=settings.preset, help="x264 preset")
    gen.add_argument("--cache-dir", type=Path,
                     default=Path(ServiceSettings().avatar_cache_dir or DEFAULT_CACHE_DIR).expanduser(),
                     help="avatar cache: face tracks and latents of videos seen before ($LIP_SYNC_AVATAR_CACHE_DIR)")
    gen.add_argument("--no-cache", action="store_true", help="do not read or write the avatar cache")
    # the job parameters from the schema; the service-only ones (URL inputs, webhooks) stay out
    add_cli_arguments(gen, _param_defaults(settings), surface="local")

    dl = sub.add_parser("download-models", help="fetch the real weights from the model hub")
    dl.add_argument("--to", type=Path, required=True, help="models directory to fill")
    dl.add_argument("--version", choices=["v15", "v1", "all"], default="v15")
    dl.add_argument("--with-face-alignment", action="store_true", help="also fetch S3FD + FAN weights")
    dl.add_argument("--without-face-parsing", action="store_true",
                    help="skip MuseTalk's BiSeNet face-parsing weights (the blend then follows landmark contours)")

    imp = sub.add_parser("import-models", help="copy a models directory into the BentoML model store")
    imp.add_argument("--from", dest="source", type=Path, required=True, help="MuseTalk models directory")
    imp.add_argument("--name", default="musetalk", help="model name in the store (the service uses musetalk)")

    assets = sub.add_parser("make-test-assets",
                            help="write tiny RANDOM-weight models in the real layout plus a test video and audio")
    assets.add_argument("--to", type=Path, required=True)
    assets.add_argument("--size", choices=["tiny", "full"], default="tiny",
                        help="full: MuseTalk's real dimensions, random weights (for benchmarks)")
    assets.add_argument("--media-only", action="store_true", help="only the test video and audio")
    return parser


def _param_defaults(settings: RunnerSettings) -> dict[str, object]:
    """Job parameters whose default is a deployment setting (the seed's LIP_SYNC_BBOX_SHIFT)."""
    return {"bbox_shift": settings.bbox_shift}


def _generate(args: argparse.Namespace, settings: RunnerSettings) -> int:
    from tqdm import tqdm

    from lipsync_runner.pipeline.avatar_cache import AvatarCache
    from lipsync_runner.faces import load_face_detector
    from lipsync_runner.render.masks import load_mask_provider
    from lipsync_runner.models.musetalk import MuseTalk
    from lipsync_runner.pipeline.job import PipelineOptions, run, validate_inputs

    params = from_cli_args(args, _param_defaults(settings))  # bad options: exit 2 before any work
    if args.output.suffix.lower() != f".{params.output_format}":  # the writer's container follows the name
        raise SystemExit(f"error: --output-format {params.output_format} writes a .{params.output_format} file; "
                         f"name the output so (got {args.output.name})")
    video_info, _ = validate_inputs(args.video, args.audio)  # fail fast, before loading models
    model = MuseTalk.from_pretrained(args.models_dir, device=args.device, version=args.version,
                                     compile=settings.compile)
    detector = load_face_detector(args.face_detector, model.layout.root, str(model.device))
    masks = load_mask_provider(model.layout.root, version=model.layout.version, device=str(model.device))
    options = PipelineOptions.from_settings(settings, params, batch_size=args.batch_size,
                                            version=model.layout.version, crf=args.crf, preset=args.preset)
    cache = None if args.no_cache else AvatarCache(args.cache_dir)
    with tqdm(total=1000, unit="‰", desc="starting", disable=None, bar_format="{desc:<9} {percentage:3.0f}%|{bar}| {elapsed}") as bar:
        def progress(stage: str, fraction: float) -> None:
            bar.set_description_str(stage)
            bar.update(int(fraction * 1000) - bar.n)

        result = run(model, detector, args.video, args.audio, args.output, options, progress=progress, cache=cache,
                     video_info=video_info, masks=masks)
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(result.seconds.items(), key=lambda kv: -kv[1]))
    print(f"wrote {result.output} ({result.frames} frames at {float(result.fps):.3f} fps, "
          f"{result.width}x{result.height}; face in {result.face_frames}/{result.source_frames} input frames, "
          f"mouth generated in {result.generated}; "
          f"detector {detector.name}; masks {masks.name}; avatar cache {_cache_word(result.cache_hit)}; {timing})")
    return 0


def _cache_word(hit: bool | None) -> str:
    return "off" if hit is None else ("hit" if hit else "miss")


def _make_test_assets(args: argparse.Namespace) -> int:
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio
    from lipsync_runner.models.tiny import write_models_dir

    root: Path = args.to
    root.mkdir(parents=True, exist_ok=True)
    if not args.media_only:
        models = write_models_dir(root / "models", size=args.size, versions=("v15", "v1"))
        print(f"models: {models} (random weights: the mouth is regenerated but does not follow the speech)")
    print(f"video: {write_face_video(root / 'face.mp4', seconds=4, size=(640, 360))}")
    print(f"audio: {write_speech_like_audio(root / 'speech.wav', seconds=5)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    settings = RunnerSettings()
    args = _parser(settings).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.debug:
        warnings.filterwarnings("ignore")
        _quiet_libraries()
    try:
        if args.command == "generate":
            configure_opencv(settings)
            return _generate(args, settings)
        if args.command == "download-models":
            from lipsync_runner.models.download import download_models

            root = download_models(args.to, version=args.version, face_alignment=args.with_face_alignment,
                                   face_parsing=not args.without_face_parsing)
            print(f"models ready in {root}")
            return 0
        if args.command == "import-models":
            from lipsync_runner.models.bentostore import import_models_dir

            print(f"imported {import_models_dir(args.source, name=args.name)}")
            return 0
        return _make_test_assets(args)
    except LipSyncError as exc:
        if args.debug:
            raise
        print(f"error: {exc.message}", file=sys.stderr)
        return next(code for cls, code in EXIT_CODES if isinstance(exc, cls))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """diffusers/transformers print load-time advice that is noise for a CLI user."""
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass
