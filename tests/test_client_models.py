"""The SDK's response models (lipsync_client/models.py) against the server's bodies, field by field.

The client package imports nothing of the server but params (an import contract), so its models are
its own; this keeps the two from drifting: every field the SDK declares is one the server sends,
under the same name and type family, and every field the server sends is either declared by the SDK
or listed here as one it passes through untyped (its models keep unknown fields)."""

from __future__ import annotations

import typing
from datetime import datetime

import pytest
from pydantic import BaseModel

from lipsync_client import models as sdk
from lipsync_runner.integration import usage
from lipsync_runner.jobs import schemas

PAIRS: dict[type[BaseModel], tuple[type[BaseModel], ...]] = {
    sdk.Job: (schemas.JobStatusResponse, schemas.GenerateAccepted, schemas.GenerateResult),
    sdk.WebhookDelivery: (schemas.WebhookDeliveryStatus,),
    sdk.JobSummary: (schemas.JobSummary,),
    sdk.JobList: (schemas.JobListResponse,),
    sdk.Health: (schemas.HealthResponse,),
    sdk.UsageDay: (usage.UsageDay,),
    sdk.Usage: (usage.UsageSummary,),
    sdk.Avatar: (schemas.AvatarStatusResponse, schemas.AvatarAccepted),
    sdk.AvatarList: (schemas.AvatarListResponse,),
}
# Sent by the server, read by SDK users as extra attributes (nested documents the SDK does not model).
PASSED_THROUGH = {
    sdk.Job: {"avatar_cache", "faces", "inputs", "params", "success"},
    sdk.JobSummary: {"inputs"},
    sdk.Avatar: {"faces", "success", "thumbnail_url"},
}


def _family(annotation) -> str:
    """A coarse type family: what JSON carries (a string, a number, a list, an object ...)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return _family(args[0]) if len(args) == 1 else "union"
    if origin in (list, tuple) or annotation in (list, tuple):
        return "list"
    if origin is dict or annotation is dict:
        return "object"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object"
    if annotation in (int, float):
        return "number"
    if annotation is bool:
        return "bool"
    if annotation is datetime:
        return "string"  # a time travels as an ISO string
    if isinstance(annotation, type) and issubclass(annotation, str):
        return "string"  # str enums too
    if typing.get_origin(annotation) is typing.Literal:
        return "string"
    return "string" if annotation is str else repr(annotation)


@pytest.mark.parametrize("model", list(PAIRS), ids=lambda m: m.__name__)
def test_every_sdk_field_is_one_the_server_sends_with_the_same_type(model):
    server = {}
    for body in PAIRS[model]:
        server.update(body.model_fields)
    for name, field in model.model_fields.items():
        assert name in server, f"{model.__name__}.{name}: no server body has it"
        assert _family(field.annotation) == _family(server[name].annotation), f"{model.__name__}.{name}"


@pytest.mark.parametrize("model", list(PAIRS), ids=lambda m: m.__name__)
def test_every_server_field_is_declared_by_the_sdk_or_passed_through(model):
    sent = set().union(*(body.model_fields for body in PAIRS[model]))
    undeclared = sent - set(model.model_fields) - PASSED_THROUGH.get(model, set())
    assert not undeclared, f"{model.__name__} does not declare {sorted(undeclared)}"
    assert model.model_config.get("extra") == "allow"  # what passes through stays readable


def test_a_server_status_body_parses_into_the_sdk_job_whole():
    from lipsync_runner.jobs.records import JobRecord, JobStatus
    from lipsync_runner.params import JobParams

    record = JobRecord(job_id="3f2b2a4e-8c1d-4b7a-9e2f-0c1d2e3f4a5b", status=JobStatus.completed, video_file="v.mp4",
                       audio_file="a.wav", video_filename="clip.mp4", audio_filename="fr.wav", params=JobParams(),
                       frames=50, progress=1.0, stage="done")
    body = schemas.JobStatusResponse.from_record(record, "/api/lip-sync/download/x").model_dump(mode="json")
    job = sdk.Job.model_validate(body)
    assert job.job_id == record.job_id and job.finished and job.frames == 50
    assert job.download_url == "/api/lip-sync/download/x"
