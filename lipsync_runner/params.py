"""Job parameters, declared once.

`JobParams` is the one definition of what a user may ask of a job: each field carries its
type, range and description. Everything that takes job parameters derives from it:

* the REST form and the BentoML `generate` endpoint parse their fields with `parse_fields`;
* the OpenAPI docs of both surfaces use `JobParams.model_json_schema()`;
* both command lines build their options with `add_cli_arguments` / `from_cli_args`;
* the SDK (`lipsync_client`) sends the fields by these names (tests hold it to that);
* the web page renders its controls from `GET /api/lip-sync/params` (this schema).

Light on purpose (pydantic only): the client package imports it.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator

from .errors import InvalidInputError

#: Form fields that are request options, not job parameters.
REQUEST_FIELDS = frozenset({"wait"})
#: JSON-schema keyword on a parameter that only some MuseTalk versions use (health's `model_version`
#: values); the web page offers such a parameter only when the loaded model is one of them.
MODEL_VERSIONS_KEY = "x-model-versions"

#: Segment times are seconds; no video we accept is longer than a day.
MAX_SEGMENT_SECONDS = 86_400.0
MAX_SEGMENTS = 1000


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

    @model_validator(mode="after")
    def _end_after_start(self) -> "Segment":
        if self.end <= self.start:
            raise ValueError(f"end ({self.end:g} s) must be after start ({self.start:g} s)")
        return self


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


class JobParams(BaseModel):
    """What the user asked for: everything that changes the result."""

    model_config = ConfigDict(extra="forbid")

    bbox_shift: int = Field(
        default=0, ge=-100, le=100,
        description="MuseTalk v1.0 only: move the mouth box down (+) or up (-), in pixels. "
                    "v1.5 ignores it, as MuseTalk v1.5 does.",
        json_schema_extra={MODEL_VERSIONS_KEY: ["v1"]})
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
        description='JSON list of {"start", "end"[, "audio_start"]} in seconds: the mouth is re-synced only '
                    "inside these stretches of the output (its timeline is the video's unless the audio is "
                    "longer under bounce, loop or remap); outside, frames pass through untouched. The output "
                    "keeps the new audio; a segment with audio_start plays the audio from there. "
                    "Ordered and non-overlapping. Default: the whole output.")

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
    face: Literal["largest", "center", "speaker"] | Annotated[int, Field(ge=0)] = Field(
        default="largest",
        description="Whose face is dubbed when several are on screen: largest (most screen area over "
                    "the video), center (nearest the frame's centre), speaker (the mouth that moves with "
                    "the new audio), or a track id from an earlier job's status (`faces.tracks[].id`) for "
                    "the same video. Frames where that person is not seen pass through.")
    face_point: Annotated[tuple[float, float] | None, WithJsonSchema(
        {"type": "string", "pattern": _POINT_RE.pattern, "examples": ["320,180"]})] = Field(
        default=None,
        description="x,y in pixels: dub the face under this point, on the first frame that face "
                    "appears in. Instead of `face`.")
    face_boxes: list[FaceBox] | None = Field(
        default=None, min_length=1, max_length=100_000,
        description='Explicit crop boxes, JSON: [{"frame": 0, "box": [x1, y1, x2, y2]}, ...]. No face '
                    "detection runs. A box holds until the next given frame, moving linearly towards its "
                    "box (the last one holds to the end); a null box ends a stretch; frames before the "
                    "first given one pass through. Instead of `face`.")

    @field_validator("face", mode="before")
    @classmethod
    def _face_rule_or_id(cls, value: Any) -> Any:
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

    @field_validator("face_point", mode="before")
    @classmethod
    def _point_from_text(cls, value: Any) -> Any:
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

    @field_validator("face_boxes")
    @classmethod
    def _one_box_per_frame(cls, boxes: list[FaceBox] | None) -> list[FaceBox] | None:
        if boxes is None:
            return None
        frames = [b.frame for b in boxes]
        if len(set(frames)) != len(frames):
            raise ValueError("each frame may have one box only")
        return sorted(boxes, key=lambda b: b.frame)

    @model_validator(mode="after")
    def _one_way_to_choose_a_face(self) -> JobParams:
        given = [name for name, on in (("face", self.face != "largest"), ("face_point", self.face_point is not None),
                                       ("face_boxes", self.face_boxes is not None)) if on]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} both choose the face: give only one of them")
        return self


_INT_RE = re.compile(r"[+-]?\d+")


def field_names() -> tuple[str, ...]:
    return tuple(JobParams.model_fields)


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


def add_cli_arguments(parser: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None) -> None:
    """One option per job parameter (`--bbox-shift N` ...), help text from the schema.

    Values are parsed by `from_cli_args` through the same schema, so the command lines
    accept and refuse exactly what the API does.
    """
    group = parser.add_argument_group("job parameters")
    for name, info in JobParams.model_fields.items():
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
