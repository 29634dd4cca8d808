"""Job parameters, declared once.

`JobParams` is the one definition of what a user may ask of a job: each field carries its
type, range and description. Everything that takes job parameters derives from it:

* the REST form and the BentoML `generate` endpoint parse their fields with `parse_fields`;
* the OpenAPI docs of both surfaces use `JobParams.model_json_schema()`;
* both command lines build their options with `add_cli_arguments` / `from_cli_args`;
* the SDK (`lipsync_client`) sends the fields by these names (tests hold it to that);
* the web page renders its controls from `GET /api/lip-sync/params` (this schema).

Where a parameter applies: a field marked ``json_schema_extra={"surface": "service"}``
only means something to the service (inputs by URL, webhooks: the worker fetches, the API
process delivers). `add_cli_arguments(..., surface="local")` leaves those out of the local
command line (`python -m lipsync_runner generate`); the service's surfaces (REST, BentoML,
SDK, the `lipsync` CLI) take every field. A field without the marker applies everywhere.

Avatars (``POST /api/lip-sync/avatars``: a video prepared once, then dubbed many times by
``avatar_id``): a field marked ``json_schema_extra={PREPARES_VIDEO: True}`` changes how a
video is prepared (its face track and latents). An avatar is created with those fields (and
``video_url``), and a generate by ``avatar_id`` takes them from the avatar (`avatar_fields`).

Light on purpose (pydantic only): the client package imports it.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Annotated, Any, Literal, Optional
from urllib.parse import urlsplit

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema,
                      field_validator, model_validator)

from lipsync_runner.errors import InvalidInputError

#: Form fields that are request options, not job parameters.
REQUEST_FIELDS = frozenset({"wait"})
#: JSON-schema keyword on a parameter that only some MuseTalk versions use (health's `model_version`
#: values); the web page offers such a parameter only when the loaded model is one of them.
MODEL_VERSIONS_KEY = "x-model-versions"

#: Segment times are seconds; no video we accept is longer than a day.
MAX_SEGMENT_SECONDS = 86_400.0
MAX_SEGMENTS = 1000


#: output_height's range (pixels, even): 8K's height at most.
MIN_OUTPUT_HEIGHT, MAX_OUTPUT_HEIGHT = 16, 4320
#: The named output qualities (`quality`); media/ffmpeg.py maps each to the encoders' rate control.
QUALITIES = ("draft", "standard", "high")
#: The file type of each output_format.
OUTPUT_MEDIA_TYPES = {"mp4": "video/mp4", "webm": "video/webm"}

#: Track ids are small counters per video: a larger number names nobody, and is refused at once.
MAX_TRACK_ID = 9999

# A job's (and an avatar's) id: a UUID4, the only form a path parameter may take.
JOB_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def is_job_id(value: str) -> bool:
    # fullmatch, not match: "$" would also accept a trailing newline
    return isinstance(value, str) and JOB_ID_RE.fullmatch(value) is not None


FACE_RULES = ("largest", "center", "speaker")
_POINT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*[,; ]\s*(\d+(?:\.\d*)?)\s*$")


class FaceBox(BaseModel):
    """One explicit crop box of the person to dub, on one frame."""

    model_config = ConfigDict(extra="forbid")

    frame: int = Field(ge=0, le=10_000_000, description="Frame index in the video, from 0.")
    box: tuple[int, int, int, int] | None = Field(
        description="x1, y1, x2, y2 in pixels (end-exclusive): the region re-generated, as in the job "
                    "status' track boxes (jaw to jaw, nose bridge to below the chin; the mouth is in its "
                    "lower half). null: the person is not on screen from this frame on.")

    @field_validator("box")
    @classmethod
    def _box_is_a_box(cls, box: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if box is not None and (min(box) < 0 or box[2] <= box[0] or box[3] <= box[1]):
            raise ValueError(f"{list(box)} is not a box: expected 0 <= x1 < x2 and 0 <= y1 < y2")
        return box


def _face_rule_or_id(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in FACE_RULES:
            return text
        if text.isdigit():
            return int(text)
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"{value!r} is not a face choice: expected largest, center, speaker or a track id "
                     "(an integer >= 0)")


def _point_from_text(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        m = _POINT_RE.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a point: expected x,y in pixels (e.g. 320,180)")
        return float(m.group(1)), float(m.group(2))
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value):
        return value
    raise ValueError(f"{value!r} is not a point: expected x,y in pixels (e.g. 320,180)")


def _one_box_per_frame(boxes: list[FaceBox] | None) -> list[FaceBox] | None:
    if boxes is None:
        return None
    frames = [b.frame for b in boxes]
    if len(set(frames)) != len(frames):
        raise ValueError("each frame may have one box only")
    return sorted(boxes, key=lambda b: b.frame)


def _one_way_to_choose_a_face(face_given: bool, face_point: Any, face_boxes: Any) -> None:
    given = [name for name, on in (("face", face_given), ("face_point", face_point is not None),
                                   ("face_boxes", face_boxes is not None)) if on]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} both choose the face: give only one of them")


# The three ways to choose a face, as types: the job's fields and a segment's share them (and their checks).
FaceSpec = Annotated[Literal["largest", "center", "speaker"] | Annotated[int, Field(ge=0, le=MAX_TRACK_ID)],
                     BeforeValidator(_face_rule_or_id)]
FacePoint = Annotated[tuple[float, float] | None, BeforeValidator(_point_from_text), WithJsonSchema(
    {"type": "string", "pattern": _POINT_RE.pattern, "examples": ["320,180"]})]
FaceBoxes = Annotated[list[FaceBox] | None, Field(min_length=1, max_length=100_000),
                      AfterValidator(_one_box_per_frame)]


class Segment(BaseModel):
    """One stretch of the output where the mouth is re-synced (seconds; start inclusive, end exclusive)."""

    model_config = ConfigDict(extra="forbid")

    start: float = Field(ge=0, le=MAX_SEGMENT_SECONDS, description="Start, in seconds of the video.")
    # ge, not gt: OpenAPI 3.0 (BentoML's document) has no numeric exclusiveMinimum; end > start >= 0
    # is checked below.
    end: float = Field(ge=0, le=MAX_SEGMENT_SECONDS, description="End (exclusive), in seconds of the video.")
    audio_start: float | None = Field(
        default=None, ge=0, le=MAX_SEGMENT_SECONDS,
        description="Where in the audio this segment's speech starts (seconds). Default: `start`, i.e. the "
                    "audio is laid on the video's timeline. Rounded to whole frames.")
    face: FaceSpec | None = Field(
        default=None,
        description="Whose face this segment dubs, as the job's `face` (a track id, largest, center), or "
                    "speaker: the person whose mouth moves with the new audio within this segment. "
                    "Default: the job's choice.")
    face_point: FacePoint = Field(default=None, description="As the job's `face_point`, for this segment.")
    face_boxes: FaceBoxes = Field(default=None, description="As the job's `face_boxes`, for this segment.")

    @model_validator(mode="after")
    def _end_after_start(self) -> "Segment":
        if self.end <= self.start:
            raise ValueError(f"end ({self.end:g} s) must be after start ({self.start:g} s)")
        _one_way_to_choose_a_face(self.face is not None, self.face_point, self.face_boxes)
        return self

    @property
    def chooses_face(self) -> bool:
        """The segment names its own person (else the job's choice applies)."""
        return self.face is not None or self.face_point is not None or self.face_boxes is not None


Surface = Literal["local", "service"]
SERVICE_ONLY: dict[str, Any] = {"surface": "service"}  # json_schema_extra of a service-only field
PREPARES_VIDEO = "x-prepares-video"  # json_schema_extra key: the field shapes an avatar (see the module doc)

MAX_URL_CHARS = 2048
MAX_AVATAR_ID_CHARS = 64  # an avatar id is a job id (a uuid4); anything else is "not found" (404)


class WebhookEvent(str, Enum):
    started = "started"
    progress = "progress"  # throttled: at most one per LIP_SYNC_WEBHOOK_PROGRESS_INTERVAL_S per job
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


#: The events a job with a `webhook_url` and no `webhook_events` sends: the job's end.
DEFAULT_WEBHOOK_EVENTS = (WebhookEvent.completed, WebhookEvent.failed, WebhookEvent.cancelled)


def _check_url(value: Optional[str], schemes: tuple[str, ...]) -> Optional[str]:
    """Shape only (scheme, host, no spaces); which addresses may be reached is netguard's job, at fetch time."""
    if value is None:
        return None
    value = value.strip()
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError("a URL must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        raise ValueError("not a valid URL") from None
    if parts.scheme.lower() not in schemes:
        raise ValueError(f"the URL must start with {' or '.join(s + '://' for s in schemes)}")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    return value


class JobParams(BaseModel):
    """What the user asked for: everything that changes the result."""

    model_config = ConfigDict(extra="forbid")

    bbox_shift: int = Field(
        default=0, ge=-100, le=100,
        description="MuseTalk v1.0 only: move the mouth box down (+) or up (-), in pixels. "
                    "v1.5 ignores it, as MuseTalk v1.5 does.",
        json_schema_extra={MODEL_VERSIONS_KEY: ["v1"], PREPARES_VIDEO: True})
    sharpen: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Detail-preserving paste for faces larger than the model's 256x256 (e.g. 1080p): "
                    "0 is off; up to 1 puts the source's own fine detail back outside the mouth and "
                    "sharpens the generated mouth to the same scale.")
    sync_mode: Literal["bounce", "loop", "cut_off", "silence", "remap"] = Field(
        default="bounce",
        description="When the audio and the video differ in length. bounce: the output lasts as long as the "
                    "audio; a shorter video plays forward, then backward, and so on (MuseTalk's ping-pong). "
                    "loop: as long as the audio; a shorter video restarts from its first frame. cut_off: as "
                    "long as the shorter of the two; the rest of the longer one is dropped (audio included). "
                    "silence: as long as the longer of the two; a shorter audio is padded with silence and "
                    "the video's tail keeps its original mouth (a shorter video bounces). remap: as long as "
                    "the audio; the video is retimed (frames repeated or skipped evenly) to fit it. "
                    "With a longer video, bounce and loop play its first frames only.")
    silence: Literal["keep", "generate"] = Field(
        default="keep",
        description="Silent stretches of the new audio. keep: frames show the source mouth, with a short "
                    "cross-fade at each boundary; generate: the model's mouth everywhere (MuseTalk).")
    segments: list[Segment] | None = Field(
        default=None, max_length=MAX_SEGMENTS,
        description='JSON list of {"start", "end"[, "audio_start"][, "face" | "face_point" | "face_boxes"]} in '
                    "seconds: the mouth is re-synced only inside these stretches of the output (its timeline is "
                    "the video's unless the audio is longer under bounce, loop or remap); outside, frames pass "
                    "through untouched. The output keeps the new audio; a segment with audio_start plays the "
                    "audio from there. A segment with its own face dubs that person (face: speaker, whoever "
                    "speaks within it); the others dub the job's. Ordered and non-overlapping. Default: the "
                    "whole output.")
    @field_validator("segments")
    @classmethod
    def _ordered_segments(cls, segments: list[Segment] | None) -> list[Segment] | None:
        if not segments:
            return None  # an empty list means "the whole output", as leaving it out does
        for k in range(1, len(segments)):
            prev, cur = segments[k - 1], segments[k]
            if cur.start < prev.end:
                raise ValueError(f"segment {k} ({cur.start:g}-{cur.end:g} s) starts before segment {k - 1} "
                                 f"ends ({prev.end:g} s): segments must be ordered and must not overlap")
        return segments
    face: FaceSpec = Field(
        default="largest",
        description="Whose face is dubbed when several are on screen: largest (most screen area over "
                    "the video), center (nearest the frame's centre), speaker (the mouth that moves with "
                    "the new audio), or a track id from an earlier job's status (`faces.tracks[].id`) for "
                    "the same video. Frames where that person is not seen pass through.",
        json_schema_extra={PREPARES_VIDEO: True})
    face_point: FacePoint = Field(
        default=None,
        description="x,y in pixels: dub the face under this point, on the first frame that face "
                    "appears in. Instead of `face`.", json_schema_extra={PREPARES_VIDEO: True})
    face_boxes: FaceBoxes = Field(
        default=None,
        description='Explicit crop boxes, JSON: [{"frame": 0, "box": [x1, y1, x2, y2]}, ...]. No face '
                    "detection runs. A box holds until the next given frame, moving linearly towards its "
                    "box (the last one holds to the end); a null box ends a stretch; frames before the "
                    "first given one pass through. Instead of `face`.", json_schema_extra={PREPARES_VIDEO: True})

    @model_validator(mode="after")
    def _one_way_to_choose_a_face(self) -> JobParams:
        _one_way_to_choose_a_face(self.face != "largest", self.face_point, self.face_boxes)
        return self

    webhook_url: Optional[str] = Field(
        default=None, max_length=MAX_URL_CHARS, json_schema_extra=SERVICE_ONLY,
        description="http(s) URL that receives the job's status as signed JSON POSTs (Lipsync-Signature: "
                    "t=...,v1=HMAC-SHA256 of 't.body'; verify with lipsync_client.verify_webhook). "
                    "Retried with back-off until a 2xx.")
    webhook_events: Annotated[Optional[list[WebhookEvent]], WithJsonSchema(
        {"type": "array", "minItems": 1, "items": {"type": "string", "enum": [e.value for e in WebhookEvent]}})] = Field(
        default=None, json_schema_extra=SERVICE_ONLY,
        description="Which events to send to webhook_url: started, progress, completed, failed, cancelled "
                    "(a list, or comma-separated). Default: completed, failed, cancelled.")
    video_url: Optional[str] = Field(
        default=None, max_length=MAX_URL_CHARS, json_schema_extra=SERVICE_ONLY,
        description="Fetch the video from this http(s) (or s3:// with object storage) URL instead of an "
                    "upload. Same limits as an upload; private and loopback addresses are refused.")
    audio_url: Optional[str] = Field(
        default=None, max_length=MAX_URL_CHARS, json_schema_extra=SERVICE_ONLY,
        description="Fetch the audio from this URL instead of an upload (as video_url).")
    avatar_id: Optional[str] = Field(
        default=None, max_length=MAX_AVATAR_ID_CHARS, json_schema_extra=SERVICE_ONLY,
        description="Dub a prepared avatar (POST /api/lip-sync/avatars) instead of a video: give only the "
                    "audio. Its face track and latents are reused (no face tracking, no VAE encoding); its "
                    "bbox_shift applies. It must be yours and ready (404 / 409 otherwise).")
    # What comes out: applied at encode time, after the blend at the video's own size.
    output_height: Optional[int] = Field(
        default=None, ge=MIN_OUTPUT_HEIGHT, le=MAX_OUTPUT_HEIGHT, multiple_of=2,
        description="Scale the output down to this height in pixels (even); the width follows the aspect ratio, "
                    "rounded to even. Never scales up: a video this high or lower keeps its size. "
                    "Default: the video's own size.")
    quality: Literal["draft", "standard", "high"] = Field(  # QUALITIES
        default="standard",
        description="Encoder rate control. draft: small files, visible loss (x264 CRF +10, VP9 CRF 44); standard: "
                    "the server's CRF (18 unless its operator set another; VP9 CRF 32); high: larger files "
                    "(x264 CRF -4, VP9 CRF 24). Audio: AAC 96/128/192 kbit/s or Opus 48/96/128 kbit/s.")
    output_format: Literal["mp4", "webm"] = Field(
        default="mp4",
        description="mp4: H.264 video and AAC audio; webm: VP9 and Opus (slower to encode; carries no content "
                    "credentials: C2PA defines no WebM embedding). The download's name and type follow it.")

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: Optional[str]) -> Optional[str]:
        return _check_url(value, ("http", "https"))

    @field_validator("video_url", "audio_url")
    @classmethod
    def _input_url(cls, value: Optional[str]) -> Optional[str]:
        return _check_url(value, ("http", "https", "s3"))

    @field_validator("webhook_events", mode="before")
    @classmethod
    def _events_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # a form or a command line: "completed,failed"
            value = [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("webhook_events")
    @classmethod
    def _events_unique(cls, value: Optional[list[WebhookEvent]]) -> Optional[list[WebhookEvent]]:
        if value is None:
            return None
        if not value:
            raise ValueError("name at least one event (or leave it out for the default)")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _events_need_url(self) -> "JobParams":
        if self.webhook_events is not None and self.webhook_url is None:
            raise ValueError("webhook_events needs a webhook_url")
        return self

    @model_validator(mode="after")
    def _avatar_or_video(self) -> "JobParams":
        if self.avatar_id is not None and self.video_url is not None:
            raise ValueError("give avatar_id or video_url, not both (the avatar is the video)")
        return self

    @property
    def selected_webhook_events(self) -> frozenset[WebhookEvent]:
        """The events this job sends (none without a webhook_url)."""
        if self.webhook_url is None:
            return frozenset()
        return frozenset(self.webhook_events or DEFAULT_WEBHOOK_EVENTS)


_INT_RE = re.compile(r"[+-]?\d+")


def field_names(surface: Surface = "service") -> tuple[str, ...]:
    """The parameters a surface takes: all of them on the service, the unmarked ones locally."""
    return tuple(name for name, info in JobParams.model_fields.items()
                 if surface == "service" or not _service_only(info.json_schema_extra))


def _service_only(extra: Any) -> bool:
    return isinstance(extra, dict) and extra.get("surface") == "service"


def avatar_fields() -> tuple[str, ...]:
    """The parameters that shape an avatar's preparation (marked PREPARES_VIDEO)."""
    return tuple(name for name, info in JobParams.model_fields.items()
                 if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get(PREPARES_VIDEO))


#: What POST /avatars takes besides the video file: the preparation's parameters and the video's URL.
def avatar_request_fields() -> tuple[str, ...]:
    return (*avatar_fields(), "video_url")


def parse_avatar_fields(fields: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> JobParams:
    """The parameters of an avatar (POST /avatars) as JobParams; 400 for a field an avatar does not take."""
    allowed = avatar_request_fields()
    other = sorted(name for name, value in fields.items() if name not in allowed and value not in (None, "", "null"))
    if other:
        raise InvalidInputError(f"Invalid parameters: {', '.join(other)}: not a parameter of an avatar (an avatar "
                                f"takes the video and {', '.join(allowed)}; give the rest to each generate)")
    params = parse_fields({k: v for k, v in fields.items() if k in allowed},
                          {k: v for k, v in (defaults or {}).items() if k in allowed})
    if params.face == "speaker":
        raise InvalidInputError("Invalid parameters: face: speaker chooses by the new audio, and an avatar has none; "
                                "choose largest, center, a track id, face_point or face_boxes")
    return params


def _decode_value(raw: str) -> Any:
    """A form value as sent by curl (`bounce`, `5`, `[...]`) or by BentoML's client (JSON: `"bounce"`).

    Only JSON's structured forms are decoded here (strings in quotes, lists, objects, null); a bare
    number or word stays text and the schema parses it by the field's type, so `0E0` or `5.0` are
    not integers and `1e3` is not a word.
    """
    text = raw.strip()
    if text[:1] in ('"', "[", "{") or text == "null":
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def validation_message(exc: ValidationError) -> str:
    """One line naming each bad field and what is wrong with it."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")  # our validators' own words
        if err.get("type") == "extra_forbidden":
            msg = "unknown parameter"
        problems.append(f"{loc}: {msg}" if loc else msg)
    return "Invalid parameters: " + "; ".join(problems)


def parse_fields(fields: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> JobParams:
    """JobParams from form fields (strings) or already-typed values; InvalidInputError (400) if bad.

    Empty strings and JSON `null` mean "not given": the deployment's `defaults`, then the
    schema's default, apply. Unknown names are refused (a typo must not silently do nothing).
    """
    values: dict[str, Any] = dict(defaults or {})
    for name, raw in fields.items():
        if name in REQUEST_FIELDS:
            continue
        value = _decode_value(raw) if isinstance(raw, str) else raw
        if value is None or value == "":
            continue
        info = JobParams.model_fields.get(name)
        if info is not None and info.annotation is int and isinstance(value, str) and not _INT_RE.fullmatch(value):
            # pydantic would read "5.0" as 5; an integer parameter takes integers only
            raise InvalidInputError(f"Invalid parameters: {name}: Input should be a valid integer, got {value[:20]!r}")
        values[name] = value
    try:
        return JobParams.model_validate(values)
    except ValidationError as exc:
        raise InvalidInputError(validation_message(exc)) from None


def form_properties() -> dict[str, Any]:
    """JSON-schema properties of the job parameters, for a multipart/form-data request body."""
    schema = JobParams.model_json_schema()
    defs = schema.get("$defs", {})

    def inline(node: Any) -> Any:  # enums and nested models (segments' items too): form docs have no $defs
        if isinstance(node, dict):
            if "$ref" in node:
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return inline({**defs[node["$ref"].rsplit("/", 1)[-1]], **rest})
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {name: inline(prop) for name, prop in schema["properties"].items()}


# --------------------------------------------------------------------------- command lines


def _cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_cli_arguments(parser: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None, *,
                      surface: Surface, only: Iterable[str] | None = None) -> None:
    """One option per job parameter of ``surface`` (`--bbox-shift N` ...), help text from the schema.

    Values are parsed by `from_cli_args` through the same schema, so the command lines
    accept and refuse exactly what the API does. ``surface="local"`` leaves out the
    service-only fields (see the module's docstring); ``only``: just these fields (an
    avatar's: `avatar_request_fields`).
    """
    group = parser.add_argument_group("job parameters" if only is None else "parameters")
    for name in field_names(surface):
        if only is not None and name not in only:
            continue
        info = JobParams.model_fields[name]
        default = (defaults or {}).get(name, info.default)
        group.add_argument(_cli_flag(name), dest=f"param_{name}", default=None, metavar=name.upper(),
                           help=f"{info.description} (default: {default})")


def from_cli_args(args: argparse.Namespace, defaults: Mapping[str, Any] | None = None) -> JobParams:
    given = {name: getattr(args, f"param_{name}") for name in JobParams.model_fields
             if getattr(args, f"param_{name}", None) is not None}
    return parse_fields(given, defaults)


def cli_fields(args: argparse.Namespace) -> dict[str, str]:
    """The job parameters given on a command line, as raw strings (for a client that sends a form)."""
    return {name: getattr(args, f"param_{name}") for name in JobParams.model_fields
            if getattr(args, f"param_{name}", None) is not None}
