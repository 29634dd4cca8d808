"""Structured logs: one JSON object per line when ``LIP_SYNC_LOG_FORMAT=json``.

Every record becomes ``{"time", "level", "logger", "message", ...extra fields}``; job events
(:func:`log_job_event`) add ``event, job_id, owner, status, stage, attempt, frames`` and the
stage durations, so a log pipeline can follow a job or sum an owner's work without parsing
text. ``owner`` is the job store's owner id (a hash of the token), never the token.

What must never reach a log line is removed from every string in it, whoever logged it:
bearer tokens, ``token=``/``secret=``/``signature=``-style values, URL credentials and query
strings (presigned bucket URLs carry their signature there), the configured secrets
themselves, and the data directory's path (job files of one tenant are not another's business).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, Optional

from pythonjsonlogger.json import JsonFormatter

from lipsync_runner.jobs.records import JobRecord
from lipsync_runner.inputs.netguard import redact_url
from lipsync_runner.config import LogSettings, Settings, split_list

REDACTED = "[redacted]"
ANONYMOUS = "anonymous"  # the owner of jobs when they are not scoped to tokens

_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+")
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]+")
_SECRET_PARAM = re.compile(r"(?i)\b(token|secret|signature|password|passwd|api[_-]?key|x-amz-[a-z-]+)=([^&\s\"',;]+)")


class Redactor:
    """Removes secrets and private paths from text (see the module's docstring)."""

    def __init__(self, secrets: Iterable[str] = (), data_dir: Optional[Path] = None) -> None:
        # longest first, so a secret that contains another is removed whole
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)
        self.data_dir = str(Path(data_dir).resolve()) if data_dir is not None else None

    def text(self, value: str) -> str:
        for secret in self.secrets:
            value = value.replace(secret, REDACTED)
        value = _BEARER.sub(lambda m: m.group(1) + REDACTED, value)
        value = _URL.sub(lambda m: redact_url(m.group(0)), value)
        value = _SECRET_PARAM.sub(lambda m: f"{m.group(1)}={REDACTED}", value)
        if self.data_dir:
            value = value.replace(self.data_dir, "$LIP_SYNC_DATA_DIR")
        return value

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return value


class JsonLogFormatter(JsonFormatter):
    """python-json-logger's formatter with our field names and the redactor over every value."""

    def __init__(self, redactor: Optional[Redactor] = None) -> None:
        super().__init__("%(levelname)s %(name)s %(message)s", timestamp="time",
                         rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception"})
        self.redactor = redactor or Redactor()

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {k: self.redactor.value(v) for k, v in log_data.items()}


def configure_logging(settings: Optional[LogSettings] = None, *, logger: Optional[logging.Logger] = None,
                      stream: Optional[IO[str]] = None, redactor: Optional[Redactor] = None) -> bool:
    """With ``LIP_SYNC_LOG_FORMAT=json``, every handler of ``logger`` (root) writes JSON lines; True if so.

    Existing handlers (BentoML's, uvicorn's) keep their destinations and get our formatter;
    without any, one on stderr (or ``stream``) is added.
    """
    settings = settings or LogSettings()
    if settings.log_format != "json":
        return False
    target = logger or logging.getLogger()
    formatter = JsonLogFormatter(redactor)
    if stream is not None or not target.handlers:
        target.addHandler(logging.StreamHandler(stream or sys.stderr))
    for handler in target.handlers:
        handler.setFormatter(formatter)
    return True


def owner_label(owner: Optional[str]) -> str:
    return owner or ANONYMOUS


def job_event_fields(record: JobRecord, event: str, **extra: Any) -> dict[str, Any]:
    """The structured fields of one job event: ids, state and durations; never paths or file names."""
    fields: dict[str, Any] = {
        "event": event,
        "job_id": record.job_id,
        "owner": owner_label(record.owner),
        "status": record.status.value,
        "stage": record.stage,
        "attempt": record.attempts,
    }
    if record.frames is not None:
        fields["frames"] = record.frames
    if record.avatar_cache is not None:
        fields["avatar_cache"] = record.avatar_cache
    if record.timings:
        fields["durations_s"] = {k: round(float(v), 3) for k, v in record.timings.items()}
    if record.error and record.status.finished:
        fields["error"] = record.error
    fields.update({k: v for k, v in extra.items() if isinstance(v, (str, int, float, bool)) or v is None})
    return fields


def log_job_event(logger: logging.Logger, record: JobRecord, event: str, *, level: int = logging.INFO,
                  **extra: Any) -> None:
    """One line for one job event (``queued``, ``started``, ``stage``, ``completed``, ``failed`` ...)."""
    logger.log(level, "job %s: %s", record.job_id, event, extra=job_event_fields(record, event, **extra))


def configure_service_logging(settings: Settings) -> bool:
    """At service start: JSON lines (``LIP_SYNC_LOG_FORMAT=json``) on BentoML's handlers, job events at INFO.

    The redactor knows the deployment's secrets: the webhook signing secrets and the API tokens.
    """
    tokens = split_list(settings.auth.api_tokens)
    redactor = Redactor([*settings.webhooks.secrets, *tokens], settings.service.data_dir)
    if not configure_logging(settings.logs, redactor=redactor):
        return False
    # BentoML's server config leaves the root logger at WARNING: the job events are INFO lines
    logging.getLogger("lipsync_runner").setLevel(logging.INFO)
    return True
