"""A job's inputs made ready for the pipeline: uploads as they are, URL references fetched.

The worker calls :func:`prepare_inputs` before the pipeline: each reference is fetched with
the upload limits (:mod:`.fetch`), and then every input is checked by content and the media
limits exactly as uploads are at admission (the same ``validate_media``: demuxer whitelist,
duration, pixels, fps, frame count, the per-job scratch cap), so a URL input that is too long,
too large or not media fails the job with the same message an upload would have got (400/413
become the job's error); uploads are checked again too (today's limits for a job queued before a restart).
A job by ``avatar_id`` reads the avatar's stored video (``avatar_video``); an avatar has no audio.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lipsync_runner.config import ApiLimits
from lipsync_runner.inputs.files import media_specs
from lipsync_runner.errors import LipSyncError
from lipsync_runner.jobs.records import JobRecord
from lipsync_runner.media.ffmpeg import AudioInfo, VideoInfo
from lipsync_runner.inputs.netguard import AddressPolicy
from lipsync_runner.inputs.fetch import FetchedInput, S3Reader, fetch_input
from lipsync_runner.config import FetchSettings
from lipsync_runner.inputs.reference import is_avatar_reference, is_reference, read_reference, write_json

INPUT_FIELDS = ("video", "audio")


@dataclass
class PreparedInputs:
    video: Path
    audio: Path | None  # None: an avatar
    fetched: dict[str, FetchedInput]  # by field, for the inputs that came from a URL
    video_info: VideoInfo
    audio_info: AudioInfo | None
    # files written into the job's directory (each fetched file, then its updated reference): with
    # object storage the worker stores them with the job (JobOutcome.keep), else they vanish with its scratch
    written: list[str]


Validate = Callable[[Path, Path | None, ApiLimits], tuple[VideoInfo, AudioInfo | None]]
AvatarVideo = Callable[[str, str | None], Path]
"""``(avatar_id, owner) -> the avatar's stored video``; raises LipSyncError when it is gone."""


def prepare_inputs(job: JobRecord, work_dir: Path, limits: ApiLimits, *, validate: Validate,
                   settings: FetchSettings | None = None, policy: AddressPolicy | None = None,
                   s3_reader: S3Reader | None = None, avatar_video: AvatarVideo | None = None,
                   progress: Callable[[str, float], None] = lambda stage, fraction: None,
                   should_cancel: Callable[[], bool] = lambda: False) -> PreparedInputs:
    """Fetch the job's URL inputs into ``work_dir`` and check the inputs by content and limits.

    ``validate`` is admission's content check (``api.validation.validate_media``; called with
    ``None`` for an avatar's audio). Raises what a refused upload would: InvalidInputError
    (400), InputTooLargeError (413), with the user's names for the inputs. ``should_cancel``
    is the job's: a fetch in progress stops within a fraction of a second (JobCancelledError),
    so a cancelled or cleaned-up job frees its worker even while an origin trickles its bytes.
    """
    specs = media_specs(limits.max_video_bytes, limits.max_audio_bytes)
    names = {"video": job.video_file, "audio": job.audio_file}
    shown = {"video": job.video_filename, "audio": job.audio_filename}
    fetched: dict[str, FetchedInput] = {}
    paths: dict[str, Path] = {}
    written: list[str] = []
    for field in INPUT_FIELDS:
        name = names[field]
        if name is None:  # an avatar has no audio
            continue
        if is_avatar_reference(name):
            if avatar_video is None:
                raise LipSyncError("the job names an avatar but this server keeps no avatars")
            paths[field] = avatar_video(str(read_reference(work_dir / name).get("avatar_id", "")), job.owner)
            shown[field] = "the avatar's video"
            continue
        if not is_reference(name):
            paths[field] = work_dir / name
            continue
        url = getattr(job.params, f"{field}_url")
        if not url:
            raise LipSyncError(f"the job's {field} is a URL reference but has no {field}_url")
        progress(f"fetching {field}", 0.0)
        got = fetch_input(url, work_dir, specs[field], settings=settings, policy=policy, s3_reader=s3_reader,
                          should_cancel=should_cancel)
        fetched[field] = got
        paths[field] = work_dir / got.file_name
        shown[field] = f"{field}_url ({got.display_name})"
        write_json(work_dir / name, {**read_reference(work_dir / name), "file": got.file_name, "size": got.size,
                                      "sha256": got.sha256})
        written += [got.file_name, name]  # the file before the reference that names it
    try:
        video_info, audio_info = validate(paths["video"], paths.get("audio"), limits)
    except LipSyncError as exc:  # name the inputs as the user knows them, never by our file names
        message = exc.message
        for field, path in paths.items():  # a fetched input by its URL's name; an upload as admission names it
            label = shown[field] if field in fetched or is_avatar_reference(names[field]) else path.name
            message = message.replace(str(path), label).replace(path.name, label)
        exc.message = message
        exc.args = (message,)
        raise
    return PreparedInputs(paths["video"], paths.get("audio"), fetched, video_info, audio_info, written)
