"""``lipsync``: the command line of the lip-sync service.

    lipsync generate VIDEO AUDIO -o OUT.mp4 [--server URL] [--bbox-shift N] [any job parameter]
    lipsync generate --video-url URL --audio-url URL [--webhook-url URL] [--idempotency-key KEY]
    lipsync generate --avatar-id ID AUDIO -o OUT.mp4
    lipsync avatar create VIDEO | --video-url URL [--bbox-shift N]   (prints the avatar id once ready)
    lipsync avatar list | status ID | delete ID
    lipsync status JOB_ID [--json]
    lipsync jobs [--limit N] [--json]
    lipsync download JOB_ID -o OUT.mp4
    lipsync wait JOB_ID
    lipsync cancel JOB_ID
    lipsync cleanup JOB_ID
    lipsync health [--json]
    lipsync usage [--since YYYY-MM-DD] [--until YYYY-MM-DD] [--json]
    lipsync credentials JOB_ID                (the result's C2PA manifest, as the server read it back)
    lipsync verify OUT.mp4 [--trust-anchors CA.pem] [--json]   (checks a file locally; needs c2pa-python)

Results go to stdout (``generate``/``download`` print only the output path), progress bars and
``error: ...`` lines to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from tqdm import tqdm

from . import __version__
from .client import LipSyncClient
from .live import read_pcm, sender_thread
from .errors import (
    BadRequest,
    ConnectionFailed,
    IdempotencyConflict,
    JobFailed,
    LipSyncClientError,
    LiveSessionClosed,
    NotFinished,
    NotFound,
    PayloadTooLarge,
    ServerError,
    TooManyRequests,
    Unauthorized,
    WaitTimeout,
)
from .credentials import CredentialsUnavailable, verify_file
from .errors import AvatarFailed
from .models import Avatar, Job

from lipsync_runner.errors import InvalidInputError  # noqa: E402 - the schema is light (pydantic only)
from lipsync_runner.params import (  # noqa: E402
    add_cli_arguments,
    avatar_request_fields,
    cli_fields,
    parse_avatar_fields,
    parse_fields,
)

OK, JOB_FAILED, BAD_INPUT, NOT_FOUND, UNAUTHORIZED, UNAVAILABLE, TIMED_OUT, INTERRUPTED = 0, 1, 2, 3, 4, 5, 6, 130

EXIT_CODES = f"""\
exit codes:
  {OK}    success
  {JOB_FAILED}    the job (or the avatar's preparation) failed or was cancelled
  {BAD_INPUT}    bad usage or input: missing file, refused upload (400), too large (413),
       an Idempotency-Key used for another request (409)
  {NOT_FOUND}    unknown job or avatar (404), the job has not finished or the avatar is not ready (409)
  {UNAUTHORIZED}    missing or wrong token (401/403)
  {UNAVAILABLE}    server unavailable: cannot connect, not ready (503), queue full (429),
       out of storage (507), other server errors
  {TIMED_OUT}    --wait-timeout passed before the job finished (it keeps running)
  {INTERRUPTED}  interrupted (Ctrl-C)
errors are one line on stderr: "error: <message>".

environment: LIPSYNC_SERVER (default http://localhost:3000), LIPSYNC_TOKEN (bearer token).
"""


def exit_code(exc: BaseException) -> int:
    """The exit code for an error (see EXIT_CODES)."""
    if isinstance(exc, (JobFailed, AvatarFailed)):
        return JOB_FAILED
    if isinstance(exc, (BadRequest, PayloadTooLarge, IdempotencyConflict, CredentialsUnavailable)):
        return BAD_INPUT
    if isinstance(exc, (NotFound, NotFinished)):
        return NOT_FOUND
    if isinstance(exc, Unauthorized) or (isinstance(exc, LiveSessionClosed) and exc.code == 4401):
        return UNAUTHORIZED
    if isinstance(exc, LiveSessionClosed) and exc.code in (4404, 4409):
        return NOT_FOUND
    if isinstance(exc, WaitTimeout):
        return TIMED_OUT
    if isinstance(exc, (ServerError, TooManyRequests, ConnectionFailed, LipSyncClientError)):
        return UNAVAILABLE
    if isinstance(exc, OSError):
        return BAD_INPUT
    return JOB_FAILED


# ---------------------------------------------------------------------------- output helpers


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _fmt_time(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "-"


def _print_job(job: Job) -> None:
    rows = [("job_id", job.job_id), ("status", job.status), ("stage", job.stage or "-"),
            ("progress", f"{job.progress * 100:.0f}%"), ("created_at", _fmt_time(job.created_at)),
            ("completed_at", _fmt_time(job.completed_at))]
    if job.queue_position is not None:
        rows.append(("queue", f"position {job.queue_position}"))
    if job.eta_s is not None and not job.finished:
        rows.append(("eta", f"about {_duration(job.eta_s)}"))
    if job.frames is not None:
        rows.append(("frames", str(job.frames)))
    if job.output_path:
        rows.append(("output", job.output_path))
    if job.error:
        rows.append(("error", job.error))
    for hook in job.webhooks or []:
        outcome = f"HTTP {hook.last_status}" if hook.last_status is not None else (hook.last_error or "-")
        rows.append(("webhook", f"{hook.event}: {hook.state} after {hook.attempts} attempt(s), last {outcome}"))
    for key, value in rows:
        print(f"{key + ':':<14}{value}")


def job_line(job: Job) -> str:
    """``queued (position 3, about 2 min left)``, ``processing (generate, about 40 s left)``."""
    details = []
    if job.status == "queued" and job.queue_position is not None:
        details.append(f"position {job.queue_position}")
    elif job.stage and job.status != "queued":
        details.append(job.stage)
    if job.eta_s is not None and not job.finished:
        details.append(f"about {_duration(job.eta_s)} left")
    return job.status + (f" ({', '.join(details)})" if details else "")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class JobProgress:
    """A tqdm bar (0-100 %) fed by ``wait``'s progress callback."""

    def __init__(self, enabled: bool) -> None:
        self.bar = tqdm(total=100, unit="%", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}]") if enabled else None

    def __call__(self, job: Job) -> None:
        if self.bar is None:
            return
        self.bar.set_description_str(job_line(job), refresh=False)
        self.bar.n = round(job.progress * 100)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ByteProgress:
    def __init__(self, enabled: bool, desc: str) -> None:
        self.enabled, self.desc, self.bar = enabled, desc, None

    def __call__(self, done: int, total: Optional[int]) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self.desc,
                            file=sys.stderr, dynamic_ncols=True)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _note(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def _output_target(out: str) -> Path:
    target = Path(out).expanduser()
    folder = target if target.is_dir() else target.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {folder}")
    return target


def _require_file(path: str, what: str) -> None:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")


# ---------------------------------------------------------------------------- commands


def cmd_generate(client: LipSyncClient, args: argparse.Namespace) -> int:
    fields = cli_fields(args)
    video_elsewhere = "video_url" in fields or "avatar_id" in fields
    if args.video is not None and args.audio is None and video_elsewhere and "audio_url" not in fields:
        args.video, args.audio = None, args.video  # `--avatar-id ID speech.wav`: the one file is the audio
    for kind in ("video", "audio"):
        given, url = getattr(args, kind), fields.get(f"{kind}_url")
        if kind == "video" and "avatar_id" in fields:
            if given is not None or url is not None:
                raise _UsageError("give the video as a file, --video-url or --avatar-id: one of them")
            continue
        if given is None and url is None:
            raise _UsageError(f"give the {kind} as a file or with --{kind}-url"
                              + (" (or the video as --avatar-id)" if kind == "video" else ""))
        if given is not None and url is not None:
            raise _UsageError(f"give the {kind} as a file or with --{kind}-url, not both")
        if given is not None:
            _require_file(given, kind)
    target = _output_target(args.output)
    show = not (args.quiet or args.no_progress)
    output_format = parse_fields(fields).output_format  # refuse a bad parameter here (exit 2), before a long upload
    if not target.is_dir() and target.suffix.lower() in (".mp4", ".webm") and target.suffix.lower() != f".{output_format}":
        raise _UsageError(f"the result is a .{output_format} file (--output-format {output_format}): "
                          f"name the output so (got {target.name})")
    sources = [Path(f).name for f in (args.video, args.audio) if f is not None]
    _note(args, f"uploading {' and '.join(sources)} to {client.base_url}" if sources
          else f"submitting to {client.base_url} (inputs by URL)")
    job = client.generate(args.video, args.audio, idempotency_key=args.idempotency_key, **fields)
    _note(args, f"job {job.job_id} {job.status}")
    bar = JobProgress(show)
    try:
        job = client.wait(job.job_id, progress=bar, timeout=args.wait_timeout)
    except KeyboardInterrupt:
        bar.close()
        print(f"error: interrupted; job {job.job_id} keeps running on the server", file=sys.stderr)
        return INTERRUPTED
    finally:
        bar.close()
    return _download(client, args, job.job_id, target, show, cleanup=args.cleanup)


def cmd_preview(client: LipSyncClient, args: argparse.Namespace) -> int:
    fields = cli_fields(args)
    if "avatar_id" in fields and args.audio is None:
        args.video, args.audio = None, args.video  # `--avatar-id ID speech.wav`
    if args.audio is None or (args.video is None and "avatar_id" not in fields):
        raise _UsageError("give the video and the audio as files (or the video as --avatar-id)")
    for kind in ("video", "audio"):
        if getattr(args, kind) is not None:
            _require_file(getattr(args, kind), kind)
    parse_fields(fields)  # refuse a bad parameter here (exit 2), before the upload
    image = args.jpeg or str(args.output).lower().endswith((".jpg", ".jpeg"))
    _note(args, f"rendering a preview on {client.base_url}")
    shown = client.preview(args.video, args.audio, at=args.at, image=image, **fields)
    path = shown.save(args.output)
    _note(args, f"preview {shown.start:.2f}-{shown.end:.2f} s written to {path}")
    print(json.dumps(shown.faces, indent=2))
    return OK


def _download(client: LipSyncClient, args: argparse.Namespace, job_id: str, target: Path, show: bool,
              cleanup: bool = False) -> int:
    bar = ByteProgress(show, "download")
    try:
        path = client.download(job_id, target, progress=bar)
    finally:
        bar.close()
    if cleanup:
        client.cleanup(job_id)
        _note(args, f"job {job_id} removed from the server")
    print(path.resolve())
    return OK


def cmd_download(client: LipSyncClient, args: argparse.Namespace) -> int:
    return _download(client, args, args.job_id, _output_target(args.output), not (args.quiet or args.no_progress))


def cmd_wait(client: LipSyncClient, args: argparse.Namespace) -> int:
    bar = JobProgress(not (args.quiet or args.no_progress))
    try:
        job = client.wait(args.job_id, progress=bar, timeout=args.wait_timeout)
    finally:
        bar.close()
    _print_json(job.to_json()) if args.json else _print_job(job)
    return OK


def cmd_status(client: LipSyncClient, args: argparse.Namespace) -> int:
    job = client.status(args.job_id)
    _print_json(job.to_json()) if args.json else _print_job(job)
    return OK


def cmd_jobs(client: LipSyncClient, args: argparse.Namespace) -> int:
    listing = client.jobs(limit=args.limit)
    if args.json:
        _print_json(listing.to_json())
        return OK
    if not listing.jobs:
        _note(args, "no jobs")
        return OK
    print(f"{'JOB_ID':<36}  {'STATUS':<10}  {'PROGRESS':>8}  {'CREATED (UTC)':<19}  STAGE")
    for j in listing.jobs:
        created = j.created_at.strftime("%Y-%m-%d %H:%M:%S") if j.created_at else "-"
        print(f"{j.job_id:<36}  {j.status:<10}  {j.progress * 100:>7.0f}%  {created:<19}  {j.stage}")
    return OK


def cmd_cancel(client: LipSyncClient, args: argparse.Namespace) -> int:
    job = client.cancel(args.job_id)
    _print_json(job.to_json()) if args.json else print(f"job {job.job_id} {job.status}")
    return OK


def cmd_cleanup(client: LipSyncClient, args: argparse.Namespace) -> int:
    result = client.cleanup(args.job_id)
    _print_json(result.to_json()) if args.json else print(f"job {result.job_id} removed")
    return OK


def cmd_usage(client: LipSyncClient, args: argparse.Namespace) -> int:
    usage = client.usage(since=args.since, until=args.until)
    if args.json:
        _print_json(usage.to_json())
        return OK
    print(f"{usage.since} .. {usage.until}: {usage.jobs} jobs ({usage.completed} completed, {usage.failed} failed, "
          f"{usage.cancelled} cancelled), {usage.output_seconds:.1f} s of video, {usage.frames} frames")
    for day in usage.days:
        print(f"  {day.date}  {day.jobs:>5} jobs  {day.output_seconds:>10.1f} s  {day.frames:>9} frames")
    return OK


def cmd_credentials(client: LipSyncClient, args: argparse.Namespace) -> int:
    _print_json(client.credentials(args.job_id))
    return OK


def cmd_verify(client: LipSyncClient, args: argparse.Namespace) -> int:
    """Exit 0: intact (signature and content hashes match); 1: changed since it was signed; 3: no manifest."""
    result = verify_file(args.file, args.trust_anchors)
    if args.json:
        _print_json({"validation_state": result.state, "failures": result.failures, "manifest": result.manifest})
    elif result.state is None:
        print(f"{args.file}: no content credentials")
    else:
        job, agent = result.job, _edit_agent(result.manifest)
        signer = result.manifest.get("signature_info") or {}
        print(f"{args.file}: {result.state}" + ("" if result.intact else " (changed since it was signed)"))
        print(f"  signed by: {signer.get('common_name', '?')} ({signer.get('issuer', '?')})"
              + ("" if result.state == "Trusted" else ", not on a trust list here"))
        if job:
            print(f"  job: {job.get('job_id')}  model: {job.get('model')} {job.get('model_version')}  "
                  f"software: {job.get('software')}")
        if agent:
            print(f"  AI alteration: {agent}")
        for ing in result.manifest.get("ingredients", []):
            print(f"  ingredient: {ing.get('title')} ({ing.get('relationship')})")
        for failure in result.mismatches:
            print(f"  failure: {failure.get('code')}: {failure.get('explanation', '')}")
    if result.state is None:
        return NOT_FOUND
    return OK if result.intact else JOB_FAILED


def _edit_agent(manifest: dict[str, Any]) -> str:
    for assertion in manifest.get("assertions", []):
        if str(assertion.get("label", "")).startswith("c2pa.actions"):
            for action in (assertion.get("data") or {}).get("actions", []):
                if action.get("digitalSourceType"):
                    return f"{action.get('action')} ({action['digitalSourceType'].rsplit('/', 1)[-1]})"
    return ""


def _print_avatar(avatar: Avatar) -> None:
    rows = [("avatar_id", avatar.avatar_id), ("status", avatar.status), ("ready", "yes" if avatar.ready else "no"),
            ("stage", avatar.stage or "-"), ("progress", f"{avatar.progress * 100:.0f}%"),
            ("video", str(avatar.video.get("filename", "-"))), ("params", json.dumps(avatar.params)),
            ("created_at", _fmt_time(avatar.created_at)), ("expires_at", _fmt_time(avatar.expires_at))]
    if avatar.frames is not None:
        rows.append(("frames", str(avatar.frames)))
    if avatar.error:
        rows.append(("error", avatar.error))
    for key, value in rows:
        print(f"{key + ':':<14}{value}")


def cmd_live(client: LipSyncClient, args: argparse.Namespace) -> int:
    """Stream a WAV file into a live session at the pace of speech; save what comes back as an MP4."""
    _require_file(args.speech, "speech")
    pcm = read_pcm(Path(args.speech).expanduser())
    with client.live(args.avatar) as session:
        ready = session.ready
        _note(args, f"live: {ready['width']}x{ready['height']} at {ready['fps']:g} fps; streaming "
                    f"{len(pcm) / 32000:.1f} s of speech{'' if args.fast else ' in real time'}")
        sender = sender_thread(session, pcm, realtime=not args.fast)
        with open(args.output, "wb") as out:
            for message in session:
                if isinstance(message, bytes):
                    out.write(message)
                elif message.get("type") == "dropped":
                    _note(args, f"live: {message['frames']} frames dropped (reading too slowly)")
        sender.join()
    end = session.end_message or {}
    if args.json:
        _print_json(end)
    else:
        _note(args, f"live: {end.get('frames', 0)} frames ({end.get('idle_frames', 0)} idle, "
                    f"{end.get('dropped', 0)} dropped) -> {args.output}")
    return OK


def cmd_avatar_create(client: LipSyncClient, args: argparse.Namespace) -> int:
    fields = cli_fields(args)
    if (args.video is None) == ("video_url" not in fields):
        raise _UsageError("give the video as a file or with --video-url (one of them)")
    if args.video is not None:
        _require_file(args.video, "video")
    parse_avatar_fields(fields)  # refuse a bad parameter here (exit 2), before the upload
    _note(args, f"uploading {Path(args.video).name} to {client.base_url}" if args.video
          else f"submitting to {client.base_url} (video by URL)")
    avatar = client.create_avatar(args.video, idempotency_key=args.idempotency_key, **fields)
    if not args.no_wait:
        bar = JobProgress(not (args.quiet or args.no_progress))
        try:
            avatar = client.wait_avatar(avatar.avatar_id, progress=bar, timeout=args.wait_timeout)
        finally:
            bar.close()
    _print_json(avatar.to_json()) if args.json else print(avatar.avatar_id)
    return OK


def cmd_avatar_list(client: LipSyncClient, args: argparse.Namespace) -> int:
    listing = client.avatars(limit=args.limit)
    if args.json:
        _print_json(listing.to_json())
        return OK
    if not listing.avatars:
        _note(args, "no avatars")
        return OK
    print(f"{'AVATAR_ID':<36}  {'STATUS':<10}  {'FRAMES':>6}  {'EXPIRES (UTC)':<19}  VIDEO")
    for a in listing.avatars:
        expires = a.expires_at.strftime("%Y-%m-%d %H:%M:%S") if a.expires_at else "-"
        frames = str(a.frames) if a.frames is not None else "-"
        print(f"{a.avatar_id:<36}  {a.status:<10}  {frames:>6}  {expires:<19}  {a.video.get('filename', '-')}")
    return OK


def cmd_avatar_status(client: LipSyncClient, args: argparse.Namespace) -> int:
    avatar = client.avatar(args.avatar_id)
    _print_json(avatar.to_json()) if args.json else _print_avatar(avatar)
    return OK


def cmd_avatar_delete(client: LipSyncClient, args: argparse.Namespace) -> int:
    result = client.delete_avatar(args.avatar_id)
    _print_json(result.to_json()) if args.json else print(f"avatar {result.avatar_id} removed")
    return OK


def cmd_health(client: LipSyncClient, args: argparse.Namespace) -> int:
    health = client.health()
    if args.json:
        _print_json(health.to_json())
    elif health.ready:
        print(f"ready: device={health.device or '-'} model_version={health.model_version or '-'}")
    if not health.ready:
        reason = f": {health.error}" if health.error else ""
        print(f"error: service not ready ({health.status}){reason}", file=sys.stderr)
        return UNAVAILABLE
    return OK


# ---------------------------------------------------------------------------- parser


def _connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--server", metavar="URL", default=default,
                        help="service URL, may include a path prefix (default: $LIPSYNC_SERVER "
                             "or http://localhost:3000)")
    parser.add_argument("--token", default=default, help="bearer token (default: $LIPSYNC_TOKEN)")
    parser.add_argument("--timeout", type=float, metavar="S", default=argparse.SUPPRESS if suppress else 120.0,
                        help="network timeout per request operation in seconds (default 120)")
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="no notes or progress bars on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lipsync", description="Client of the MuseTalk lip-sync service.", epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lipsync-client {__version__}")
    _connection_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, epilog=EXIT_CODES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        _connection_options(sub, suppress=True)
        sub.set_defaults(func=func)
        return sub

    def json_flag(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--json", action="store_true", help="print the JSON body")

    def no_progress(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub = command("generate", cmd_generate, "upload a video and an audio track (or give their URLs, or an "
                                            "avatar's id for the video), wait, download the result")
    sub.add_argument("video", nargs="?", help="input video (a face); or --video-url")
    sub.add_argument("audio", nargs="?", help="audio track to lip-sync to; or --audio-url (with --video-url and "
                                              "one file, the file is the audio)")
    sub.add_argument("-o", "--output", default=".", metavar="OUT.mp4",
                     help="where to write the result (a file, or a directory for lip_sync_<id>.mp4; default .)")
    add_cli_arguments(sub, surface="service")  # one option per job parameter, from the schema (lipsync_runner/params.py)
    sub.add_argument("--wait-timeout", type=float, metavar="S", help="give up waiting after S seconds (exit 6)")
    sub.add_argument("--cleanup", action="store_true", help="remove the job from the server after the download")
    sub.add_argument("--idempotency-key", metavar="KEY",
                     help="the same KEY and request within 24 h gives the original job instead of a new one "
                          "(retry a generate safely)")
    no_progress(sub)

    sub = command("live", cmd_live, "a real-time session: stream a speech WAV (16 kHz mono) to an avatar at the "
                                    "pace of speech, save the talking video that comes back")
    sub.add_argument("--avatar", required=True, metavar="ID", help="a ready avatar's id (lipsync avatar create)")
    sub.add_argument("speech", help="16 kHz mono 16-bit WAV (ffmpeg -i IN -ar 16000 -ac 1 OUT.wav)")
    sub.add_argument("-o", "--output", default="live.mp4", metavar="OUT.mp4", help="where to save (default live.mp4)")
    sub.add_argument("--fast", action="store_true", help="send the speech at once instead of in real time")
    json_flag(sub)
    sub = command("preview", cmd_preview, "render a short stretch at once (same inputs and parameters as "
                                          "generate), write it, print the faces found")
    sub.add_argument("video", nargs="?", help="input video (a face); or --avatar-id")
    sub.add_argument("audio", nargs="?", help="audio track to lip-sync to")
    sub.add_argument("-o", "--output", default="preview.mp4", metavar="OUT",
                     help="where to write it (default preview.mp4; a .jpg name asks for the JPEG strip)")
    sub.add_argument("--at", type=float, metavar="S", help="start of the stretch, in seconds of the output "
                                                           "(default: where the dubbing starts)")
    sub.add_argument("--jpeg", action="store_true", help="a JPEG strip of the frames instead of an MP4")
    add_cli_arguments(sub, surface="service")

    sub = command("status", cmd_status, "show a job's status")
    sub.add_argument("job_id")
    json_flag(sub)

    sub = command("jobs", cmd_jobs, "list jobs, newest first")
    sub.add_argument("--limit", type=int, default=100, metavar="N", help="at most N jobs (default 100)")
    json_flag(sub)

    sub = command("download", cmd_download, "download a completed job's result")
    sub.add_argument("job_id")
    sub.add_argument("-o", "--output", default=".", metavar="OUT.mp4", help="file or directory (default .)")
    no_progress(sub)

    sub = command("wait", cmd_wait, "wait for a job to finish (exit 1 if it failed)")
    sub.add_argument("job_id")
    sub.add_argument("--wait-timeout", type=float, metavar="S", help="give up after S seconds (exit 6)")
    no_progress(sub)
    json_flag(sub)

    sub = command("cancel", cmd_cancel, "cancel a queued or running job")
    sub.add_argument("job_id")
    json_flag(sub)

    sub = command("cleanup", cmd_cleanup, "cancel if running, then delete a job and its files")
    sub.add_argument("job_id")
    json_flag(sub)

    sub = command("health", cmd_health, "is the service ready? (exit 5 if not)")
    json_flag(sub)

    avatar = commands.add_parser("avatar", help="avatars: a video prepared once, dubbed by generate --avatar-id",
                                 description="An avatar is a video prepared once (face track and latents); "
                                             "generate --avatar-id ID AUDIO then uploads only the audio.")
    avatar_commands = avatar.add_subparsers(dest="avatar_command", metavar="ACTION", required=True)

    def avatar_command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        sub = avatar_commands.add_parser(name, help=help, description=help, epilog=EXIT_CODES,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        _connection_options(sub, suppress=True)
        sub.set_defaults(func=func)
        return sub

    sub = avatar_command("create", cmd_avatar_create, "prepare a video once (upload or --video-url); prints its "
                                                      "avatar id once it is ready")
    sub.add_argument("video", nargs="?", help="the video with the face; or --video-url")
    add_cli_arguments(sub, surface="service", only=avatar_request_fields())  # from the schema, as generate's
    sub.add_argument("--no-wait", action="store_true", help="print the id at once, do not wait until it is ready")
    sub.add_argument("--wait-timeout", type=float, metavar="S", help="give up waiting after S seconds (exit 6)")
    sub.add_argument("--idempotency-key", metavar="KEY", help="a retry with the same KEY gives the same avatar")
    no_progress(sub)
    json_flag(sub)
    sub = avatar_command("list", cmd_avatar_list, "list your avatars, newest first")
    sub.add_argument("--limit", type=int, default=100, metavar="N", help="at most N avatars (default 100)")
    json_flag(sub)
    sub = avatar_command("status", cmd_avatar_status, "show an avatar's status")
    sub.add_argument("avatar_id")
    json_flag(sub)
    sub = avatar_command("delete", cmd_avatar_delete, "delete an avatar and its prepared data")
    sub.add_argument("avatar_id")
    json_flag(sub)

    sub = command("credentials", cmd_credentials, "print a completed job's content credentials (C2PA manifest, JSON)")
    sub.add_argument("job_id")

    sub = command("verify", cmd_verify, "check a file's content credentials locally (needs c2pa-python); exit 0 "
                                        "intact, 1 changed since signed, 3 none")
    sub.add_argument("file", help="a result (e.g. OUT.mp4)")
    sub.add_argument("--trust-anchors", metavar="CA.pem", help="PEM CA certificates to trust (e.g. the server's "
                                                               "<data_dir>/signing-dev/ca.pem)")
    json_flag(sub)

    sub = command("usage", cmd_usage, "your jobs, output seconds and frames by UTC day")
    sub.add_argument("--since", metavar="YYYY-MM-DD", help="first UTC day (default: 29 days before --until)")
    sub.add_argument("--until", metavar="YYYY-MM-DD", help="last UTC day (default: today)")
    json_flag(sub)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _UsageError(Exception):
    """A bad combination of arguments (exit 2, like argparse's own)."""


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit 2
    try:
        with LipSyncClient(args.server, token=args.token, timeout=args.timeout) as client:
            return args.func(client, args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED
    except InvalidInputError as exc:  # a job parameter the schema refuses
        print(f"error: {_one_line(exc.message)}", file=sys.stderr)
        return BAD_INPUT
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    except (LipSyncClientError, OSError) as exc:
        message = exc.message if isinstance(exc, LipSyncClientError) else (
            f"{exc.strerror}: {exc.filename}" if exc.filename and exc.strerror else str(exc))
        print(f"error: {_one_line(message)}", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
