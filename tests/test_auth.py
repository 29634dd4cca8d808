"""Optional bearer-token auth on both API surfaces, and jobs scoped to the token that made them."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from lipsync_runner.api.auth import AuthSettings, TokenSet, owner_of

from .server import running_server
from .test_service import API, upload, wait_done

A, B = "token-a-0123456789", "token-b-9876543210"


def test_tokens_come_from_the_environment_and_a_rotatable_file(tmp_path: Path):
    file = tmp_path / "tokens"
    file.write_text("# one per line\nfile-token-1\n\n")
    tokens = TokenSet(AuthSettings(api_tokens="env-token", api_tokens_file=file))
    assert tokens.enabled and tokens.match("env-token") and tokens.match("file-token-1")
    assert not tokens.match("") and not tokens.match("# one per line") and not tokens.match("env-token ")
    file.write_text("file-token-2\n")
    import os
    os.utime(file, (time.time() + 5, time.time() + 5))  # a Secret update changes the mtime
    assert tokens.match("file-token-2") and not tokens.match("file-token-1")


def test_auth_is_off_without_tokens():
    assert not TokenSet(AuthSettings(api_tokens="", api_tokens_file=None)).enabled


def test_owner_ids_do_not_reveal_the_token():
    assert owner_of(A) != owner_of(B) and A not in owner_of(A) and len(owner_of(A)) == 24


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    with running_server(tmp_path_factory.mktemp("auth"), models_dir, LIP_SYNC_API_TOKENS=f"{A},{B}",
                        LIP_SYNC_SCOPE_JOBS_TO_TOKEN="true") as srv:
        yield srv


def client(server, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=120)


def test_health_and_probes_stay_open(server):
    with client(server, None) as c:
        assert c.get(f"{API}/health").status_code == 200
        assert c.get("/readyz").status_code == 200 and c.get("/livez").status_code == 200
        assert c.post("/health", json={}).status_code == 200


@pytest.mark.parametrize("token", [None, "wrong-token", A + "x"])
def test_job_endpoints_need_a_valid_token_on_both_surfaces(server, media_dir, token):
    with client(server, token) as c:
        responses = [upload(c, media_dir / "face.mp4", media_dir / "speech_short.wav"),
                     c.get(f"{API}/jobs"), c.get(f"{API}/status/00000000-0000-4000-8000-000000000000"),
                     c.post("/jobs", json={}), c.post("/status", json={"job_id": "x"})]
    for r in responses:
        assert r.status_code == 401, r.text
        assert r.json() == {"error": "Missing or invalid API token"}
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_a_tokens_jobs_are_invisible_to_other_tokens(server, media_dir, tmp_path):
    with client(server, A) as a, client(server, B) as b:
        job_id = upload(a, media_dir / "face.mp4", media_dir / "speech_short.wav").json()["job_id"]
        assert wait_done(a, job_id)["status"] == "completed"
        assert a.get(f"{API}/download/{job_id}").status_code == 200
        # B cannot see, read, download, cancel or delete it: 404 as if it did not exist
        assert b.get(f"{API}/status/{job_id}").status_code == 404
        assert b.get(f"{API}/download/{job_id}").status_code == 404
        assert b.post(f"{API}/cancel/{job_id}").status_code == 404
        assert b.delete(f"{API}/cleanup/{job_id}").status_code == 404
        assert b.post("/status", json={"job_id": job_id}).status_code == 404
        assert job_id not in [j["job_id"] for j in b.get(f"{API}/jobs").json()["jobs"]]
        assert job_id not in [j["job_id"] for j in b.post("/jobs", json={}).json()["jobs"]]
        assert job_id in [j["job_id"] for j in a.get(f"{API}/jobs").json()["jobs"]]
        assert a.delete(f"{API}/cleanup/{job_id}").status_code == 200
