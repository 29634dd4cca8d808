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
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InvalidInputError

#: Form fields that are request options, not job parameters.
REQUEST_FIELDS = frozenset({"wait"})
#: JSON-schema keyword on a parameter that only some MuseTalk versions use (health's `model_version`
#: values); the web page offers such a parameter only when the loaded model is one of them.
MODEL_VERSIONS_KEY = "x-model-versions"


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


def field_names() -> tuple[str, ...]:
    return tuple(JobParams.model_fields)


def _decode_value(raw: str) -> Any:
    """A form value as sent by curl (`bounce`, `5`, `[...]`) or by BentoML's client (JSON: `"bounce"`)."""
    text = raw.strip()
    try:
        return json.loads(text)
    except ValueError:
        return text


def validation_message(exc: ValidationError) -> str:
    """One line naming each bad field and what is wrong with it."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid value"))
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
        values[name] = value
    try:
        return JobParams.model_validate(values)
    except ValidationError as exc:
        raise InvalidInputError(validation_message(exc)) from None


def form_properties() -> dict[str, Any]:
    """JSON-schema properties of the job parameters, for a multipart/form-data request body."""
    schema = JobParams.model_json_schema()
    defs = schema.get("$defs", {})
    props = {}
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        if "$ref" in prop:  # inline enums and nested models: form docs have no $defs
            prop = {**defs[prop.pop("$ref").rsplit("/", 1)[-1]], **prop}
        props[name] = prop
    return props


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
