"""Schema-driven and property-based fuzzing of the REST API: no request gets a 5xx.

In process: the FastAPI app from `create_rest_app` (the one the service mounts at
/api/lip-sync, same OpenAPI document as the server's `/api/lip-sync/openapi.json`) over a
real `JobManager` (SQLite store, job files on disk) whose executor is a fake that writes a
tiny output at once. Uploads are really parsed, stored and probed with ffmpeg.

- schemathesis generates valid and invalid requests for every operation from the OpenAPI
  document (bounded: `FUZZ_EXAMPLES` per operation, no deadline);
- Hypothesis fuzzes the upload form itself around real media: file names, extensions,
  `bbox_shift`, `wait`, extra fields, part order; then a route on the job it made.

And on the real server: schemathesis over its whole `/docs.json` (probes, metrics, the BentoML
endpoints), where BentoML's own `/generate` only gets schema-valid forms (see the xfail in
test_hostile_inputs.py).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from lipsync_runner.config import ApiLimits  # noqa: E402
from lipsync_runner.api import create_rest_app
from lipsync_runner.jobs import JobContext, JobManager, JobOutcome, JobStatus  # noqa: E402
from lipsync_runner.media.samples import write_face_video, write_speech_like_audio  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("LIP_SYNC_FUZZ_EXAMPLES", "30"))
SUPPRESS = list(HealthCheck)
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]
SEEN: Counter = Counter()  # (operation, status) -> requests; printed at the end (-s)


class InstantExecutor:
    """Writes a few bytes as the job's output and succeeds; counts its runs."""

    def __init__(self) -> None:
        self.runs = 0
        self._lock = threading.Lock()

    def __call__(self, ctx: JobContext) -> JobOutcome:
        with self._lock:
            self.runs += 1
        tmp = ctx.output_path.with_suffix(".part")
        tmp.write_bytes(b"\x00\x00\x00\x18ftypmp42")
        tmp.replace(ctx.output_path)
        return JobOutcome(output_file=ctx.output_path.name, frames=1)


LIMITS = ApiLimits(max_video_bytes=2 * 2**20, max_audio_bytes=2 * 2**20, wait_timeout_s=10)
_STATE: dict = {}  # the module's JobManager, set by the fuzz_env fixture


async def _health() -> dict:
    manager = _STATE["manager"]
    return {"status": "ready", "models_loaded": True, "device": "cpu", "model_version": "v15", "error": None,
            "jobs": manager.counts()}


# Built at import, as schemathesis wants its schema when tests are collected; the manager behind
# it comes from the fixture (the OpenAPI document does not depend on it).
class _FixtureManager:
    """The fixture's JobManager, behind the app built at import."""

    def __getattr__(self, name: str):
        return getattr(_STATE["manager"], name)

    def submit(self, *args, **kwargs):
        return _STATE["manager"].submit(*args, **kwargs)


APP = create_rest_app(_FixtureManager(), _health, LIMITS)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=FUZZ_EXAMPLES)


@pytest.fixture(scope="module", autouse=True)
def fuzz_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    executor = InstantExecutor()
    manager = JobManager.from_data_dir(root / "data", executor, workers=2, max_queued=10_000,
                                       free_space_floor_bytes=0, sweep_interval_s=3600)
    manager.start()
    _STATE["manager"] = manager
    media = root / "media"
    media.mkdir()
    write_face_video(media / "face.mp4", seconds=0.4, size=(96, 96))
    write_speech_like_audio(media / "speech.wav", seconds=0.4, sample_rate=16000)
    # one finished job, so that status/download/cleanup of a real id are reachable too
    with TestClient(APP) as c:
        r = c.post("/generate?wait=true", files={"video": ("face.mp4", (media / "face.mp4").read_bytes()),
                                                 "audio": ("speech.wav", (media / "speech.wav").read_bytes())})
        assert r.status_code == 200 and r.json()["success"], r.text
    try:
        yield {"app": APP, "manager": manager, "root": root, "media": media, "executor": executor}
    finally:
        manager.close()
        _STATE.clear()


def assert_no_leak(text: str, root: Path) -> None:
    assert str(root) not in text and "Traceback" not in text and "site-packages" not in text, text[:500]


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=SUPPRESS, derandomize=True)
def test_no_operation_answers_a_server_error(case, fuzz_env):
    response = case.call()
    SEEN[(f"{case.method} {case.path}", response.status_code)] += 1
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
    assert_no_leak(response.text, fuzz_env["root"])
    # and the answer is what the OpenAPI document says: a documented status, its content type and schema
    case.validate_response(response, checks=CONFORMANCE)


# ------------------------------------------------------------------ the upload form, by property

_name_chars = st.characters(codec="utf-8", exclude_characters="\r\n\"")
_names = st.one_of(
    st.text(_name_chars, max_size=40),
    st.sampled_from(["../../etc/passwd", "..", ".", "/", "\\..\\x", "a\x00b", "\u202e", " ", "CON", ".mp4"]),
)
_extensions = st.sampled_from(["", ".mp4", ".MP4", ".mov", ".mkv", ".webm", ".avi", ".wav", ".mp3", ".m4a", ".aac",
                               ".ogg", ".txt", ".exe", ".mp4.exe", ".wav\x00.mp4"])
_numbers = st.one_of(st.integers(-1000, 1000).map(str), st.text(max_size=8), st.sampled_from(
    ["", " 5 ", "+5", "-0", "0x10", "1e2", "NaN", "inf", "٣", "9" * 70, "1_0"]))
_flags = st.one_of(st.sampled_from(["true", "false", "1", "0", "yes", "no", "on", "off", "", "TRUE", " true "]),
                   st.text(max_size=6))


_valid_video_ext = st.sampled_from([".mp4", ".MP4", ".mov", ".mkv", ".webm", ".avi"])
_valid_audio_ext = st.sampled_from([".wav", ".WAV", ".mp3", ".m4a", ".aac", ".ogg"])


@given(
    video_name=st.tuples(_names, st.one_of(_valid_video_ext, _extensions)).map("".join),
    audio_name=st.tuples(_names, st.one_of(_valid_audio_ext, _extensions)).map("".join),
    bbox_shift=st.one_of(st.none(), st.integers(-100, 100).map(str), _numbers),
    wait=st.one_of(st.none(), st.sampled_from(["true", "false"]), _flags),
    extra=st.lists(st.tuples(st.sampled_from(["note", "bbox", "video_url", "x" * 100]), st.text(max_size=20)),
                   max_size=2),
    audio_first=st.booleans(),
    then=st.sampled_from(["status", "download", "cancel", "cleanup"]),
)
@settings(max_examples=FUZZ_EXAMPLES * 3, deadline=None, suppress_health_check=SUPPRESS, derandomize=True)
def test_the_upload_form_never_answers_a_server_error(fuzz_env, video_name, audio_name, bbox_shift, wait, extra,
                                                      audio_first, then):
    media = fuzz_env["media"]
    files = [("video", (video_name, (media / "face.mp4").read_bytes(), "video/mp4")),
             ("audio", (audio_name, (media / "speech.wav").read_bytes(), "audio/wav"))]
    if audio_first:
        files.reverse()
    data = dict(extra)
    if bbox_shift is not None:
        data["bbox_shift"] = bbox_shift
    if wait is not None:
        data["wait"] = wait
    with TestClient(fuzz_env["app"]) as c:
        r = c.post("/generate", files=files, data=data)
        SEEN[("form", r.status_code)] += 1
        assert r.status_code in (200, 202, 400), r.text
        assert_no_leak(r.text, fuzz_env["root"])
        if r.status_code == 400:
            assert r.json()["error"]
            return
        shift = (bbox_shift or "0").strip() or "0"
        assert int(shift) in range(-100, 101)  # only a valid shift is accepted
        job_id = r.json()["job_id"]
        # and the job it made answers every route sensibly
        method, expected = {"status": ("GET", {200}), "download": ("GET", {200, 409}),
                            "cancel": ("POST", {200, 409}), "cleanup": ("DELETE", {200})}[then]
        follow = c.request(method, f"/{then}/{job_id}")
        SEEN[(f"form then {then}", follow.status_code)] += 1
        assert follow.status_code in expected, follow.text
        assert_no_leak(follow.text, fuzz_env["root"])


def test_every_job_the_fuzzers_created_is_consistent(fuzz_env):
    """Rejected uploads left no directory; accepted ones have their record and their files."""
    manager: JobManager = fuzz_env["manager"]
    records = {r.job_id: r for r in manager.list(limit=100_000)}
    jobs_dir = fuzz_env["root"] / "data" / "jobs"
    dirs = {p.name for p in jobs_dir.iterdir() if p.is_dir()}
    assert dirs <= set(records), f"upload directories without a job: {sorted(dirs - set(records))[:5]}"
    for rec in records.values():
        if rec.status == JobStatus.completed:
            assert (jobs_dir / rec.job_id / rec.video_file).is_file()
    assert shutil.disk_usage(jobs_dir).free > 0
    if any(op == "form" for op, _ in SEEN):  # the form fuzzer ran: it must have got past validation
        assert SEEN[("form", 202)] + SEEN[("form", 200)] > 0, SEEN
    print("\nfuzz requests by operation and status:")
    for (op, status), n in sorted(SEEN.items()):
        print(f"  {op:<32} {status}  x{n}")


# ------------------------------------------------------------------ the BentoML surface, on the real server

# BentoML's multipart parsing of /generate 500s on malformed forms (test_hostile_inputs.py, xfail): only
# schema-valid forms are sent to it here.
POSITIVE_ONLY = {"/generate"}


def test_the_bentoml_endpoints_never_answer_a_server_error(models_dir, tmp_path):
    """schemathesis over the server's whole `/docs.json` (probes, metrics, BentoML endpoints, REST routes)."""
    from hypothesis import given as given_

    from .server import running_server

    statuses: Counter = Counter()
    with running_server(tmp_path, models_dir) as srv:
        live = schemathesis.openapi.from_url(f"{srv.url}/docs.json")
        live.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
        ops = [op.ok() for op in live.get_all_operations()]
        assert {"/status", "/jobs", "/cancel", "/cleanup", "/download"} <= {op.path for op in ops}
        for op in ops:
            if op.path.startswith("/api/lip-sync/generate"):
                continue  # fuzzed in process above
            mode = GenerationMode.POSITIVE if op.path in POSITIVE_ONLY else None

            @given_(case=op.as_strategy(generation_mode=mode) if mode else op.as_strategy())
            @settings(max_examples=max(5, FUZZ_EXAMPLES // 2), deadline=None, suppress_health_check=SUPPRESS,
                      derandomize=True, database=None)
            def fuzz(case):
                r = case.call(base_url=srv.url, timeout=30)
                statuses[(f"{case.method} {case.path}", r.status_code)] += 1
                assert r.status_code < 500, f"{case.method} {case.formatted_path} {case.body!r}: {r.status_code} {r.text}"
                assert str(srv.data_dir) not in r.text and "Traceback" not in r.text

            fuzz()
    print("\nBentoML surface, requests by operation and status:")
    for (op, status), n in sorted(statuses.items()):
        print(f"  {op:<40} {status}  x{n}")
